"""Train / val / test splits that never put one patient (or lesion) on two sides.

``grouped``: groups are ordered by a keyed hash of (split seed, group id), and
cut at the cumulative fractions of images. The result depends only on the set
of groups and the seed, not on row order, so a rerun, another backbone or a
reshuffled CSV sees the same split.

``official``: the publisher's ``split`` column, renamed per the spec; when the
publisher ships no validation split, ``val_fraction`` of the official training
groups is held out the same way. With ``fallback: grouped``, a copy without the
official split (every ``split`` null) is split ``grouped`` instead.
"""

from __future__ import annotations

import hashlib

import numpy as np
import polars as pl

from medbench.data.base import DatasetIndex
from medbench.errors import DataError
from medbench.spec import SplitSpec

SPLITS = ("train", "val", "test")


def _group_order(groups: list[str], seed: int) -> list[str]:
    key = f"medbench-split:{seed}:".encode()
    return sorted(groups, key=lambda g: hashlib.blake2b(g.encode(), key=key[:64], digest_size=8).digest())


def _cut(groups: list[str], sizes: dict[str, int], fractions: dict[str, float], seed: int) -> dict[str, str]:
    """Assign ordered groups to splits so each split's image share approaches its fraction."""
    order = _group_order(groups, seed)
    total = sum(sizes[g] for g in order)
    names = [s for s in SPLITS if fractions.get(s, 0) > 0]
    bounds = np.cumsum([fractions[s] for s in names]) * total
    out: dict[str, str] = {}
    acc = 0
    k = 0
    for g in order:
        # a group goes to split k while the running count stays within its bound
        while k < len(names) - 1 and acc + sizes[g] / 2 > bounds[k]:
            k += 1
        out[g] = names[k]
        acc += sizes[g]
    return out


def assign_splits(index: DatasetIndex, spec: SplitSpec, *, where: str) -> pl.Series:
    """The split name per row (``train``/``val``/``test``; ``drop`` rows are excluded later)."""
    table = index.table
    if spec.group_by not in table.columns:
        raise DataError(f"column {spec.group_by!r} not in the dataset table", where=where, field="splits.group_by")
    group = table[spec.group_by].cast(pl.Utf8)
    if group.null_count():
        raise DataError(f"{group.null_count()} rows have no {spec.group_by!r}", where=where, field="splits.group_by")

    no_official = table["split"].null_count() == table.height
    if spec.method == "grouped" or (no_official and spec.fallback == "grouped"):
        counts = group.value_counts()
        sizes = dict(zip(counts[spec.group_by].to_list(), counts["count"].to_list()))
        mapping = _cut(list(sizes), sizes, dict(spec.fractions), spec.seed)
        return group.replace_strict(mapping, return_dtype=pl.Utf8).alias("split")

    # official
    official = table["split"]
    if no_official:
        raise DataError("the dataset has no official split; use splits.method: grouped (or splits.fallback: grouped)",
                        where=where, field="splits.method")
    renamed = official.replace(spec.rename) if spec.rename else official
    unknown = set(renamed.drop_nulls().unique().to_list()) - {*SPLITS, "drop"}
    if unknown:
        raise DataError(f"official split names {sorted(unknown)} are not train/val/test; map them with splits.rename",
                        where=where, field="splits.rename")
    if "val" not in set(renamed.drop_nulls().to_list()) and spec.val_fraction > 0:
        is_train = (renamed == "train").to_numpy()
        train_groups = group.filter(pl.Series(is_train))
        counts = train_groups.value_counts()
        sizes = dict(zip(counts[spec.group_by].to_list(), counts["count"].to_list()))
        held = _cut(list(sizes), sizes, {"train": 1 - spec.val_fraction, "val": spec.val_fraction}, spec.seed)
        values = renamed.to_list()
        groups = group.to_list()
        renamed = pl.Series("split", [held[g] if v == "train" else v for v, g in zip(values, groups)], dtype=pl.Utf8)
    leak = leaking_groups(group, renamed)
    if leak:
        raise DataError(f"{len(leak)} {spec.group_by} values (e.g. {leak[0]!r}) occur in more than one official split",
                        where=where, field="splits")
    return renamed.fill_null("drop").alias("split")


def leaking_groups(group: pl.Series, split: pl.Series) -> list[str]:
    df = pl.DataFrame({"g": group, "s": split}).drop_nulls().filter(pl.col("s") != "drop")
    multi = df.group_by("g").agg(pl.col("s").n_unique().alias("n")).filter(pl.col("n") > 1)
    return sorted(multi["g"].to_list())
