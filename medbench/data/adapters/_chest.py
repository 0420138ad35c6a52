"""Helpers shared by the chest X-ray adapters (``chexpert``, ``mimic-cxr``, ``nih``, ``padchest``).

Not an adapter itself: modules whose name starts with ``_`` are skipped by
:func:`medbench.data.base.list_adapters`.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from medbench.data.adapters._common import parse_options  # noqa: F401  (re-exported for the chest adapters)
from medbench.errors import DataError

#: the 14 observations of the CheXpert labeler (CheXpert ``train.csv`` and MIMIC-CXR-JPG's label files)
CHEXPERT_OBSERVATIONS = (
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
    "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
    "Fracture", "Support Devices",
)

#: CheXpert-labeler cell -> value; blank (null) is handled by the policy
_LABELER_VALUES = {"1.0": 1, "1": 1, "0.0": 0, "0": 0, "-1.0": -1, "-1": -1}
UNCERTAINTY_POLICIES = ("U-Ignore", "U-Zeros", "U-Ones")


def require_root(root: Path | None, adapter: str) -> Path:
    if root is None:
        raise DataError("needs a dataset folder", where=f"{adapter} adapter", field="dataset.name")
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"dataset folder not found (adapter {adapter!r})", where=root)
    return root


def find_file(root: Path, names: list[str], *, dataset: str, what: str) -> Path:
    """The first of ``names`` (each also tried with ``.gz``) that exists under ``root``."""
    for name in names:
        for candidate in (name, f"{name}.gz") if not name.endswith(".gz") else (name,):
            path = root / candidate
            if path.is_file():
                return path
    expected = " or ".join(f"{n}[.gz]" for n in names)
    raise DataError(f"{what} not found: expected {expected} (dataset {dataset!r})", where=root)


def check_labels_known(labels: list[str], known: tuple[str, ...] | list[str], *, dataset: str) -> None:
    unknown = [lab for lab in labels if lab not in known]
    if unknown:
        from medbench.utils import did_you_mean

        raise DataError(f"label {unknown[0]!r}{did_you_mean(unknown[0], list(known))} is not a {dataset} label; "
                        f"expected names from: {', '.join(known)}", where=f"{dataset} adapter", field="labels")


def first_bad_row(mask: pl.Series) -> int:
    """1-based line number in the CSV (header is line 1) of the first true entry of ``mask``."""
    return int(mask.arg_true()[0]) + 2


def labeler_column(df: pl.DataFrame, column: str, policy: str, *, file: Path) -> pl.Series:
    """A CheXpert-labeler column (``1`` / ``0`` / ``-1`` uncertain / blank) as Int8 1/0/null.

    Blank (not mentioned) is a negative. ``-1`` (uncertain) follows ``policy``:
    ``U-Ignore`` -> missing (masked from loss and metric), ``U-Zeros`` -> 0,
    ``U-Ones`` -> 1.
    """
    raw = df[column].str.strip_chars()
    mapped = raw.replace_strict(_LABELER_VALUES, default=None, return_dtype=pl.Int8)
    bad = raw.is_not_null() & (raw != "") & mapped.is_null()
    if bad.any():
        value = raw.filter(bad)[0]
        raise DataError(f"value {value!r} on line {first_bad_row(bad)}; expected 1.0, 0.0, -1.0 or blank",
                        where=file, field=column)
    uncertain = {"U-Ignore": None, "U-Zeros": 0, "U-Ones": 1}[policy]
    out = mapped.fill_null(0)
    out = pl.select(pl.when(out == -1).then(pl.lit(uncertain, dtype=pl.Int8)).otherwise(out).alias(column)).to_series()
    return out.cast(pl.Int8)


def sex_column(values: pl.Series, mapping: dict[str, str]) -> pl.Series:
    """Canonical ``M`` / ``F``; anything not in ``mapping`` (unknown, other, blank) is null."""
    return values.str.strip_chars().replace_strict(mapping, default=None, return_dtype=pl.Utf8).alias("sex")


def plausible_age(values: pl.Series) -> pl.Series:
    """Ages in years; unparsable values and values outside [0, 120] (entry errors such as NIH 2017's 414) are null."""
    v = values.cast(pl.Float64, strict=False)
    return pl.select(pl.when((v >= 0) & (v <= 120)).then(v).otherwise(None).alias("age")).to_series()

