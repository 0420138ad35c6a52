"""NIH ChestX-ray14 (Wang et al. 2017), as the NIH Clinical Center ships it.

Layout (``--data nih=DIR``)::

    DIR/Data_Entry_2017_v2020.csv   (or the original Data_Entry_2017.csv; .gz accepted)
    DIR/train_val_list.txt          optional: the official patient-wise split,
    DIR/test_list.txt               one image name per line
    DIR/images_001/images/00000001_000.png ... DIR/images_012/images/...   (as released)
      or DIR/images/00000001_000.png                                         (one folder)

The label file's columns used: ``Image Index``, ``Finding Labels`` (findings
joined by ``|``; ``No Finding`` when none), ``Patient ID``, ``Patient Age``,
``Patient Gender``, ``View Position``. Quirks handled: the 2017 file's trailing
comma (an unnamed empty last column) and its bracketed header names; ages
written as numbers (``58``) or DICOM age strings (``058Y``, ``006M``, ``010W``,
``030D``); impossible ages (the 2017 file's 148 ... 414) become null. A token
outside the 14 findings and ``No Finding`` is an error naming the file.

Labels: a finding is positive when listed, negative otherwise (the NLP labels
carry no uncertainty). A task may declare any of the 14 findings (and ``No
Finding``). Split: when both list files exist, ``train`` / ``test`` from them
(images in neither are left out); otherwise no official split and tasks fall
back to a patient-grouped split. Site ``NIH Clinical Center``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import polars as pl
from pydantic import BaseModel, ConfigDict

from medbench.data.adapters._chest import (
    check_labels_known,
    first_bad_row,
    parse_options,
    plausible_age,
    require_root,
    sex_column,
)
from medbench.data.base import DatasetIndex, data_path, label_column, read_csv_checked
from medbench.errors import DataError

FINDINGS = (
    "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Effusion", "Emphysema", "Fibrosis", "Hernia",
    "Infiltration", "Mass", "Nodule", "Pleural_Thickening", "Pneumonia", "Pneumothorax",
)
NO_FINDING = "No Finding"
REQUIRED = ["Image Index", "Finding Labels", "Patient ID", "Patient Age", "Patient Gender", "View Position"]
LABEL_FILES = ("Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv")


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")

    #: label file name inside the dataset folder; null: Data_Entry_2017_v2020.csv, else Data_Entry_2017.csv
    labels_file: str | None = None
    #: use train_val_list.txt / test_list.txt when present
    official_split: bool = True


def label_file(root: Path, name: str | None) -> Path:
    if name:  # the task's choice: kept inside the dataset folder unless the user allows otherwise
        given = data_path(root, name, field="dataset.options.labels_file")
        candidates = [given, Path(f"{given}.gz")]
    else:
        candidates = [root / f for n in LABEL_FILES for f in (n, f"{n}.gz")]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    names = [name] if name else list(LABEL_FILES)
    raise DataError(f"label file not found: expected {' or '.join(n + '[.gz]' for n in names)} (dataset 'nih')",
                    where=root)


def age_years(raw: pl.Series) -> pl.Series:
    """``58`` -> 58; DICOM age strings ``058Y`` / ``006M`` / ``010W`` / ``030D`` -> years."""
    s = raw.str.strip_chars().str.to_uppercase()
    number = s.str.extract(r"^(\d+(?:\.\d+)?)[YMWD]?$", 1).cast(pl.Float64)
    unit = s.str.extract(r"([YMWD])$", 1).fill_null("Y")
    per_year = unit.replace_strict({"Y": 1.0, "M": 12.0, "W": 52.1775, "D": 365.25}, return_dtype=pl.Float64)
    return plausible_age(number / per_year)


def image_folders(root: Path) -> list[Path]:
    """Where the PNGs are: ``images/``, else ``images_NNN/images/`` (or ``images_NNN/``) in order."""
    flat = root / "images"
    parts = sorted(p for p in root.glob("images_*") if p.is_dir())
    folders = [flat] if flat.is_dir() else []
    for p in parts:
        folders.append(p / "images" if (p / "images").is_dir() else p)
    return folders


def locate_images(root: Path, names: list[str]) -> list[str]:
    """Path of each image relative to ``root``; ``images/<name>`` when it is nowhere (reported as missing later)."""
    folders = image_folders(root)
    if len(folders) == 1:
        rel = folders[0].relative_to(root).as_posix()
        return [f"{rel}/{n}" for n in names]
    where: dict[str, str] = {}
    for folder in folders:
        rel = folder.relative_to(root).as_posix()
        with os.scandir(folder) as it:
            for entry in it:
                where.setdefault(entry.name, rel)
    return [f"{where.get(n, 'images')}/{n}" for n in names]


def read_list(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


class NIHAdapter:
    name = "nih"
    description = "NIH ChestX-ray14: Data_Entry_2017*.csv, 14 findings, official train_val/test lists"
    how_to_get = ("download ChestX-ray14 from https://nihcc.app.box.com/v/ChestXray-NIHCC (NIH Clinical Center); "
                  "point --data nih=DIR at the folder holding Data_Entry_2017_v2020.csv (or Data_Entry_2017.csv), "
                  "train_val_list.txt, test_list.txt and images_001/images/*.png ... images_012/images/ "
                  "(or all PNGs in one images/ folder)")

    def load(self, root: Path | None, options: dict[str, Any], labels: list[str], task_type: str) -> DatasetIndex:
        opts = parse_options(Options, options, self.name)
        check_labels_known(labels, (*FINDINGS, NO_FINDING), dataset=self.name)
        if task_type == "multiclass":
            raise DataError("NIH findings co-occur; use type multilabel or binary", where=f"{self.name} adapter",
                            field="type")
        root = require_root(root, self.name)
        path = label_file(root, opts.labels_file)
        df = read_csv_checked(path, required=REQUIRED, dataset=self.name)
        findings = df["Finding Labels"].str.strip_chars()
        if findings.is_null().any():
            raise DataError(f"empty value on line {first_bad_row(findings.is_null())}; expected findings joined by "
                            "'|' or 'No Finding'", where=path, field="Finding Labels")
        tokens = findings.str.split("|").list.eval(pl.element().str.strip_chars())
        vocab = (*FINDINGS, NO_FINDING)
        bad = ~tokens.list.eval(pl.element().is_in(vocab)).list.all()
        if bad.any():
            row = tokens.filter(bad)[0].to_list()
            token = next(t for t in row if t not in vocab)
            raise DataError(f"unknown finding {token!r} on line {first_bad_row(bad)}; expected {', '.join(vocab)}",
                            where=path, field="Finding Labels")
        names = df["Image Index"].str.strip_chars()
        table = pl.DataFrame({
            "sample_id": names,
            "patient_id": df["Patient ID"].str.strip_chars().cast(pl.Int64, strict=False).cast(pl.Utf8),
            "path": pl.Series(locate_images(root, names.to_list()), dtype=pl.Utf8),
            "sex": sex_column(df["Patient Gender"], {"M": "M", "F": "F"}),
            "age": age_years(df["Patient Age"]),
            "view": df["View Position"].str.strip_chars().str.to_uppercase(),
            "site": pl.Series(["NIH Clinical Center"] * df.height, dtype=pl.Utf8),
            "follow_up": df["Follow-up #"] if "Follow-up #" in df.columns else pl.Series([None] * df.height,
                                                                                       dtype=pl.Utf8),
        })
        if table["patient_id"].is_null().any():
            bad_pid = table["patient_id"].is_null()
            raise DataError(f"value {df['Patient ID'].filter(bad_pid)[0]!r} on line {first_bad_row(bad_pid)}; "
                            "expected an integer patient number", where=path, field="Patient ID")
        table = table.with_columns(
            **{label_column(lab): tokens.list.contains(lab).cast(pl.Int8) for lab in labels})
        sources = [path]
        split_note = "none (patient-grouped by the task)"
        lists = [root / "train_val_list.txt", root / "test_list.txt"]
        if opts.official_split and any(p.is_file() for p in lists):
            for p in lists:
                if not p.is_file():
                    raise DataError(f"{lists[0].name} and {lists[1].name} come as a pair; this one is missing",
                                    where=p)
            train, test = set(read_list(lists[0])), set(read_list(lists[1]))
            both = train & test
            if both:
                raise DataError(f"{len(both)} images (e.g. {sorted(both)[0]!r}) are in both lists", where=lists[1])
            split = [("train" if n in train else "test" if n in test else None) for n in names.to_list()]
            table = table.with_columns(split=pl.Series(split, dtype=pl.Utf8))
            sources += lists
            split_note = "official lists (train_val_list.txt / test_list.txt)"
        return DatasetIndex(name=self.name, table=table, label_names=list(labels), root=root, source_files=sources,
                            notes={"split": split_note, "label_file": path.name})


ADAPTER = NIHAdapter()
