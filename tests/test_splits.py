"""Splits: grouped by patient, deterministic, order-independent; official lists respected."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from medbench.data.base import DatasetIndex, label_column
from medbench.data.splits import assign_splits
from medbench.errors import DataError
from medbench.spec import SplitSpec


def make_index(n_patients: int = 300, seed: int = 0, official: list[str | None] | None = None) -> DatasetIndex:
    rng = np.random.default_rng(seed)
    per = rng.integers(1, 6, n_patients)
    pid = np.repeat([f"p{i:04d}" for i in range(n_patients)], per)
    n = len(pid)
    table = pl.DataFrame({"sample_id": [f"s{i}" for i in range(n)], "patient_id": pid,
                          label_column("y"): rng.integers(0, 2, n).astype(np.int8)})
    if official is not None:
        table = table.with_columns(split=pl.Series(official[:n]))
    return DatasetIndex("toy", table, ["y"])


def test_grouped_split_has_no_patient_on_two_sides() -> None:
    index = make_index()
    split = assign_splits(index, SplitSpec(method="grouped"), where="t")
    df = pl.DataFrame({"p": index.table["patient_id"], "s": split})
    assert df.group_by("p").agg(pl.col("s").n_unique()).get_column("s").max() == 1
    share = df["s"].value_counts(normalize=True).sort("s")
    got = dict(zip(share["s"], share["proportion"]))
    assert got["train"] == pytest.approx(0.7, abs=0.03) and got["test"] == pytest.approx(0.2, abs=0.03)


def test_grouped_split_is_deterministic_and_independent_of_row_order() -> None:
    index = make_index()
    spec = SplitSpec(method="grouped", seed=3)
    a = dict(zip(index.table["sample_id"], assign_splits(index, spec, where="t")))
    shuffled = DatasetIndex("toy", index.table.sample(fraction=1.0, shuffle=True, seed=1), ["y"])
    b = dict(zip(shuffled.table["sample_id"], assign_splits(shuffled, spec, where="t")))
    assert a == b
    c = dict(zip(index.table["sample_id"], assign_splits(index, SplitSpec(method="grouped", seed=4), where="t")))
    assert a != c


def test_adding_patients_moves_no_existing_patient_to_test_from_train_in_bulk() -> None:
    """Hash ordering: most existing patients keep their split when the dataset grows."""
    small, big = make_index(200), make_index(260)
    spec = SplitSpec(method="grouped")
    sa = dict(zip(small.table["patient_id"], assign_splits(small, spec, where="t")))
    sb = dict(zip(big.table["patient_id"], assign_splits(big, spec, where="t")))
    same = np.mean([sa[p] == sb[p] for p in sa])
    assert same > 0.8


def test_official_split_with_validation_carved_from_train() -> None:
    base = make_index(100)
    pids = base.table["patient_id"].to_list()
    official = ["test" if int(p[1:]) % 5 == 0 else "train" for p in pids]
    index = make_index(100, official=official)
    split = assign_splits(index, SplitSpec(method="official", val_fraction=0.2), where="t")
    assert (split == "test").to_list() == [o == "test" for o in official]
    assert set(split.unique()) == {"train", "val", "test"}
    df = pl.DataFrame({"p": index.table["patient_id"], "s": split})
    assert df.group_by("p").agg(pl.col("s").n_unique()).get_column("s").max() == 1


def test_official_split_leak_and_unknown_names_are_errors() -> None:
    base = make_index(50)
    n = base.table.height
    leaky = ["train" if i % 2 else "test" for i in range(n)]
    with pytest.raises(DataError, match="occur in more than one official split"):
        assign_splits(make_index(50, official=leaky), SplitSpec(method="official"), where="t.yaml")
    with pytest.raises(DataError, match=r"t.yaml: splits.rename: .*'valid'"):
        assign_splits(make_index(50, official=["valid"] * n), SplitSpec(method="official"), where="t.yaml")
    renamed = assign_splits(make_index(50, official=["valid"] * n),
                            SplitSpec(method="official", rename={"valid": "test"}, val_fraction=0.0), where="t")
    assert set(renamed.unique()) == {"test"}
