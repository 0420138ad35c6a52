"""Helpers shared by the dataset adapters (not an adapter: the leading ``_`` hides it).

Option validation with errors naming the option, the spellings of sex and age
that real label files use, one-hot labels from a class column, finding files in
the small layout variations real copies have, and keeping official splits free
of patients on both sides.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterable, TypeVar

import polars as pl
from pydantic import BaseModel, ValidationError

from medbench.data.base import label_column
from medbench.errors import DataError
from medbench.paths import walk

M = TypeVar("M", bound=BaseModel)


def parse_options(model: type[M], options: dict[str, Any], adapter: str) -> M:
    """``options`` validated by ``model``; the first problem names ``dataset.options.<field>``."""
    try:
        return model.model_validate(options)
    except ValidationError as err:
        e = err.errors()[0]
        loc = ".".join(str(p) for p in e["loc"])
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = f"unknown option; expected one of: {', '.join(sorted(model.model_fields))}"
        raise DataError(msg, where=f"{adapter} adapter", field=f"dataset.options.{loc}" if loc else "dataset.options") \
            from None


def require_root(root: Path | None, adapter: str) -> Path:
    if root is None:
        raise DataError("no dataset folder given", where=f"{adapter} adapter", field="dataset.name")
    return Path(root)


# --------------------------------------------------------------------------- sex and age

_SEX = {
    "m": "M", "male": "M", "man": "M", "masculine": "M",
    "f": "F", "female": "F", "woman": "F", "feminine": "F",
}


def normalize_sex(value: Any) -> str | None:
    """``"M"``/``"F"`` from the spellings datasets use (``M``, ``male``, ``Male``, ``FEMALE``...);
    anything else (``unknown``, ``O``, blank) is missing."""
    if value is None:
        return None
    return _SEX.get(str(value).strip().strip(".,;:").lower())


_AGE_UNITS_DAYS = {"d": 1.0, "day": 1.0, "days": 1.0,
                   "w": 7.0, "wk": 7.0, "wks": 7.0, "week": 7.0, "weeks": 7.0,
                   "m": 30.4375, "mo": 30.4375, "mos": 30.4375, "mon": 30.4375, "month": 30.4375,
                   "months": 30.4375,
                   "y": 365.25, "yr": 365.25, "yrs": 365.25, "year": 365.25, "years": 365.25, "yo": 365.25,
                   "y/o": 365.25, "yearsold": 365.25, "yearold": 365.25}
#: up to three significant digits, any leading zeros (DICOM AS ``058Y``; some exports pad to ``0023Y``)
_AGE_RE = re.compile(r"(?<![\d.])(0*\d{1,3}(?:\.\d+)?)\s*(y/o|[a-z]+)?(?![\w/])", re.IGNORECASE)


def parse_age(value: Any, *, default_unit: str = "y") -> float | None:
    """Age in years from ``35``, ``"35"``, ``"035Y"`` (DICOM AS), ``"0023Y"``, ``"35yrs"``, ``"35 years"``,
    ``"6M"``/``"6 months"``, ``"16month"``, ``"10D"``...; ``None`` when there is no plausible age."""
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value) if 0 <= float(value) <= 130 else None
    text = str(value).strip()
    if not text:
        return None
    for m in _AGE_RE.finditer(text):
        number, unit = float(m.group(1)), (m.group(2) or default_unit).lower().replace(" ", "")
        days = _AGE_UNITS_DAYS.get(unit)
        if days is None:
            continue
        years = number * days / 365.25
        if 0 <= years <= 130:
            return round(years, 4)
    return None


# --------------------------------------------------------------------------- labels


def class_labels(values: pl.Series, labels: list[str], task_type: str, *, aliases: dict[str, list[str]] | None = None,
                 negatives: Iterable[str] | None = None, unmatched: str = "error", where: str | Path,
                 field: str) -> tuple[pl.DataFrame, pl.Series]:
    """Label columns from one categorical column.

    ``aliases`` maps a task label to the raw values meaning it (default: the label itself).
    Multiclass: one-hot; a value matching no label is an error (``unmatched="error"``) or its row
    is dropped (``"drop"``). Binary (one label): 1 for the label's values, 0 for ``negatives``
    (default: every other non-blank value). Blank values are missing. Returns the label columns
    and a boolean ``keep`` mask.
    """
    aliases = aliases or {}
    lookup: dict[str, str] = {}
    for lab in labels:
        for v in aliases.get(lab, [lab]):
            lookup[str(v).strip()] = lab
    df = pl.DataFrame({"raw": values.cast(pl.Utf8).str.strip_chars()})
    df = df.with_columns(mapped=pl.col("raw").replace_strict(lookup, default=None, return_dtype=pl.Utf8),
                         blank=pl.col("raw").is_null() | (pl.col("raw") == ""))
    if task_type == "binary":
        (lab,) = labels
        is_pos = (pl.col("mapped") == lab).fill_null(False)
        is_neg = ~pl.col("blank") & ~is_pos
        if negatives is not None:
            is_neg = is_neg & pl.col("raw").is_in([str(v).strip() for v in negatives])
        out = df.select(pl.when(is_pos).then(1).when(is_neg).then(0).otherwise(None).cast(pl.Int8)
                        .alias(label_column(lab)))
        return out, pl.Series([True] * df.height)
    unknown = df.select((~pl.col("blank") & pl.col("mapped").is_null()).alias("u"))["u"]
    if unknown.any() and unmatched == "error":
        bad = sorted(set(df["raw"].filter(unknown).to_list()))
        raise DataError(f"{int(unknown.sum())} rows have values {bad[:5]} that are none of the task's labels "
                        f"{labels}", where=where, field=field)
    out = df.select(**{label_column(lab): pl.when(pl.col("blank")).then(None)
                       .otherwise((pl.col("mapped") == lab).fill_null(False)).cast(pl.Int8) for lab in labels})
    return out, ~unknown


def check_task_labels(labels: list[str], task_type: str, allowed: list[str], *, adapter: str,
                      what: str = "labels") -> None:
    unknown = [lab for lab in labels if lab not in allowed]
    if unknown:
        from medbench.utils import did_you_mean

        raise DataError(f"{adapter} has no label {unknown[0]!r}{did_you_mean(unknown[0], allowed)}; "
                        f"expected {what} from: {', '.join(allowed)}", where=f"{adapter} adapter", field="labels")


# --------------------------------------------------------------------------- files


def find_first(root: Path, names: Iterable[str]) -> Path | None:
    """The first of ``names`` (relative paths) that exists under ``root``."""
    for n in names:
        p = root / n
        if p.is_file():
            return p
    return None


def find_file(root: Path, names: Iterable[str], *, max_depth: int = 2) -> Path | None:
    """``root/<name>`` or the same name up to ``max_depth`` folders below (copies are often unpacked
    one folder deeper, e.g. ``physionet.org/files/<set>/1.0.0/``)."""
    names = list(names)
    hit = find_first(root, names)
    if hit is not None:
        return hit
    wanted = {n.lower() for n in names}
    for dirpath, dirnames, filenames in walk(root):
        depth = len(Path(dirpath).relative_to(root).parts)
        if depth >= max_depth:
            dirnames[:] = []
        dirnames.sort()
        for f in sorted(filenames):
            if f.lower() in wanted:
                return Path(dirpath) / f
    return None


def index_files(folders: Iterable[Path], suffixes: Iterable[str]) -> dict[str, Path]:
    """``{stem: path}`` for every file with one of ``suffixes`` (case-insensitive) below ``folders``."""
    sfx = {s.lower() for s in suffixes}
    out: dict[str, Path] = {}
    for folder in folders:
        if not folder.is_dir():
            continue
        for dirpath, dirnames, filenames in walk(folder):
            dirnames.sort()
            for f in sorted(filenames):
                p = Path(dirpath) / f
                if p.suffix.lower() in sfx and p.stem not in out:
                    out[p.stem] = p
    return out


def subdirs_ci(root: Path, names: Iterable[str]) -> list[Path]:
    """Sub-folders of ``root`` whose name matches one of ``names`` ignoring case (Kaggle copies
    lower-case folder names)."""
    wanted = {n.lower() for n in names}
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.lower() in wanted)


def relative(paths: Iterable[Path | None], root: Path) -> list[str | None]:
    out: list[str | None] = []
    for p in paths:
        if p is None:
            out.append(None)
        else:
            try:
                out.append(Path(p).relative_to(root).as_posix())
            except ValueError:
                out.append(str(p))
    return out


# --------------------------------------------------------------------------- splits


def drop_train_groups_in_test(table: pl.DataFrame, *, group: str = "patient_id", train: str = "train",
                              test: str = "test") -> tuple[pl.DataFrame, int]:
    """Remove training rows whose group also has test rows (the test set stays as published).

    Some releases put images of one patient in both official splits; medbench never lets a
    patient be on two sides. Returns the table and the number of rows removed.
    """
    test_groups = table.filter(pl.col("split") == test)[group].unique()
    leak = (pl.col("split") == train) & pl.col(group).is_in(test_groups.to_list())
    n = int(table.select(leak.sum()).item())
    return table.filter(~leak), n
