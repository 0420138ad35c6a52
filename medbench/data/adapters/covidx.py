"""COVIDx CXR (Wang et al. 2020, COVID-Net; github.com/lindawangg/COVID-Net/docs/COVIDx.md).

Layout as released on Kaggle (andyczhao/covidx-cxr2) or built with the COVID-Net scripts::

    covidx/train.txt      # or train_COVIDx9A.txt, train_COVIDx_CXR-3A.txt, ...
    covidx/test.txt
    covidx/val.txt        # COVIDx CXR-4 only
    covidx/train/<filename>
    covidx/test/<filename>
    covidx/val/<filename>

Each line of a split file is ``patient_id filename label data_source`` separated by
spaces. Two label vocabularies exist: ``normal`` / ``pneumonia`` / ``COVID-19``
(COVIDx "A" files, COVIDx5 and earlier) and ``positive`` / ``negative`` (COVIDx
"B" files, CXR-3B and CXR-4). A three-class task needs the first; a binary task
with the label ``COVID-19`` reads both (COVID-19/positive = 1).

The patient id is prefixed with the data source (ids restart per source). The
test split is kept as published; training images of a patient who is also in the
test file are left out (and counted), so no patient is on two sides.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl
from pydantic import BaseModel, ConfigDict

from medbench.data.adapters._common import (
    check_task_labels,
    class_labels,
    drop_train_groups_in_test,
    parse_options,
    require_root,
)
from medbench.data.base import DatasetIndex, data_path
from medbench.errors import DataError

THREE_CLASS = ["normal", "pneumonia", "COVID-19"]
BINARY_VOCAB = {"positive", "negative"}
SPLITS = ("train", "val", "test")


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")

    #: split files inside the dataset folder (relative to it); null: ``<split>.txt``, else the one ``<split>*.txt``
    train_file: str | None = None
    test_file: str | None = None
    val_file: str | None = None
    #: leave out training images of patients that also appear in the test file
    drop_test_patients_from_train: bool = True


def _split_file(root: Path, split: str, given: str | None) -> Path | None:
    if given:
        p = data_path(root, given, field=f"dataset.options.{split}_file")
        if not p.is_file():
            raise DataError(f"{split} split file not found", where=p, field=f"dataset.options.{split}_file")
        return p
    exact = root / f"{split}.txt"
    if exact.is_file():
        return exact
    candidates = sorted(p for p in root.glob(f"{split}*.txt") if p.is_file())
    if split == "train":
        candidates = [p for p in candidates if not p.name.startswith("train_val")]
    if len(candidates) > 1:
        raise DataError(f"several {split} split files ({', '.join(p.name for p in candidates)}); choose one",
                        where=root, field=f"dataset.options.{split}_file")
    return candidates[0] if candidates else None


def read_split_file(path: Path, split: str) -> list[dict[str, Any]]:
    """Rows of one COVIDx split file; a malformed line is an error naming file and line."""
    rows = []
    text = path.read_bytes().decode("utf-8-sig", errors="replace")
    for n, line in enumerate(text.splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) < 4:
            raise DataError(f"expected 'patient_id filename label data_source', got {line.strip()!r}", where=path,
                            field=f"line {n}")
        # file names may contain spaces: the first token is the patient, the last two label and source
        pid, label, source = parts[0], parts[-2], parts[-1]
        filename = " ".join(parts[1:-2])
        rows.append({"patient": pid, "filename": filename, "label": label, "source": source, "split": split,
                     "line": n})
    return rows


class CovidxAdapter:
    name = "covidx"
    description = "COVIDx CXR: train.txt/test.txt ('patient_id filename label data_source'), images in train/ test/"
    how_to_get = ("Kaggle https://www.kaggle.com/datasets/andyczhao/covidx-cxr2 (account needed) or the COVID-Net "
                  "scripts (github.com/lindawangg/COVID-Net, docs/COVIDx.md); expected layout: covidx/train.txt, "
                  "covidx/test.txt (lines 'patient_id filename label data_source'), covidx/train/<filename>, "
                  "covidx/test/<filename>")

    def load(self, root: Path | None, options: dict[str, Any], labels: list[str], task_type: str) -> DatasetIndex:
        opts = parse_options(Options, options, self.name)
        root = require_root(root, self.name)
        files = {s: _split_file(root, s, getattr(opts, f"{s}_file")) for s in SPLITS}
        for s in ("train", "test"):
            if files[s] is None:
                raise DataError(f"no {s} split file ({s}.txt or {s}_COVIDx*.txt); {self.how_to_get}", where=root,
                                field=f"dataset.options.{s}_file")
        rows = [r for s in SPLITS if files[s] is not None for r in read_split_file(files[s], s)]
        df = pl.DataFrame(rows)
        vocab = set(df["label"].unique().to_list())
        if task_type == "multiclass":
            check_task_labels(labels, task_type, THREE_CLASS, adapter=self.name)
            if vocab & BINARY_VOCAB:
                raise DataError("this COVIDx release uses the positive/negative vocabulary (a 'B' file); a "
                                f"{len(labels)}-class task needs normal/pneumonia/COVID-19 ('A' files) — choose them "
                                "with dataset.options.train_file/test_file or use a binary task",
                                where=files["train"], field="label")
            aliases = None
        elif task_type == "binary":
            if labels != ["COVID-19"]:
                raise DataError("a binary COVIDx task has the label 'COVID-19' (COVID-19/positive vs the rest)",
                                where="covidx adapter", field="labels")
            aliases = {"COVID-19": ["COVID-19", "positive"]}
        else:
            raise DataError("COVIDx tasks are multiclass or binary", where="covidx adapter", field="type")
        unknown = vocab - set(THREE_CLASS) - BINARY_VOCAB
        if unknown:
            first = df.filter(pl.col("label").is_in(sorted(unknown))).row(0, named=True)
            raise DataError(f"unknown label {first['label']!r}; expected normal, pneumonia, COVID-19, positive or "
                            "negative", where=files[first["split"]], field=f"line {first['line']}")
        label_df, _ = class_labels(df["label"], labels, task_type, aliases=aliases, where=files["train"], field="label")
        table = pl.concat([
            df.select(
                sample_id=pl.col("split") + "/" + pl.col("filename"),
                patient_id=pl.col("source") + ":" + pl.col("patient"),
                path=pl.col("split") + "/" + pl.col("filename"),
                site=pl.col("source"),
                split=pl.col("split"),
                covidx_label=pl.col("label"),
            ),
            label_df,
        ], how="horizontal")
        n = table.height
        table = table.unique(subset=["sample_id"], keep="first", maintain_order=True)  # a file listed twice
        duplicates = n - table.height
        table, dropped = drop_train_groups_in_test(table) if opts.drop_test_patients_from_train else (table, 0)
        return DatasetIndex(name="covidx", table=table, label_names=list(labels), root=root,
                            source_files=[p for p in files.values() if p is not None],
                            notes={"train_rows_dropped_patient_in_test": dropped, "duplicate_lines": duplicates})


ADAPTER = CovidxAdapter()
