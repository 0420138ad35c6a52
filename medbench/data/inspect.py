"""``medbench data inspect TASK``: what a task's data stage yields, from the label files alone.

Runs the task's adapter and split (nothing is decoded; images may be absent)
and summarises each split: images, patients, per-label positives / negatives /
missing and prevalence (positives over labelled images), and the count of every
value of the task's subgroup attributes (binned as the task bins them). Image
files are only checked for existence. ``problems`` lists what would stop
``medbench run`` before training (:mod:`medbench.data.checks`: attribute columns,
single-group attributes, one-class splits); the command prints them (``--check``: and exits 2).
Generic over :class:`~medbench.data.base.DatasetIndex`, so it works for every
adapter, the synthetic smoke tasks included.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import polars as pl

from medbench.data.base import DatasetIndex
from medbench.data.checks import SPLIT_ORDER, attribute_counts, task_data_problems
from medbench.data.locate import DataLocations
from medbench.data.task_data import load_task_data
from medbench.spec import AttributeSpec, ResolvedTask

__all__ = ["SPLIT_ORDER", "attribute_counts", "inspect_task", "missing_files", "split_summary"]


def split_summary(table: pl.DataFrame, index: DatasetIndex, attributes: list[AttributeSpec]) -> dict[str, Any]:
    labels = {}
    for name, col in zip(index.label_names, index.label_columns):
        s = table[col]
        pos, neg = int((s == 1).sum()), int((s == 0).sum())
        labels[name] = {"pos": pos, "neg": neg, "missing": int(s.null_count()),
                        "prevalence": pos / (pos + neg) if pos + neg else None}
    attrs = {attr.name: attribute_counts(table, attr) for attr in attributes}
    return {"n": table.height, "patients": int(table["patient_id"].n_unique()), "labels": labels,
            "attributes": attrs}


def missing_files(index: DatasetIndex, examples: int = 10) -> tuple[int, list[str], int]:
    """(missing count, first missing paths, files checked).

    Each folder is listed once; a folder whose parent is absent is not looked up at all, so a
    copy holding only the label files is checked in a moment whatever its size.
    """
    if index.pixels is not None:
        return 0, [], 0
    root = os.fspath(index.root or Path("."))
    listing: dict[str, set[str] | None] = {}

    def entries(folder: str) -> set[str] | None:
        if folder not in listing:
            parent, _, name = folder.rpartition("/")
            above = entries(parent) if folder else set()
            if above is None or (folder and name not in above):
                listing[folder] = None  # absent: so is everything below it
            else:
                try:
                    listing[folder] = set(os.listdir(os.path.join(root, folder) if folder else root))
                except (FileNotFoundError, NotADirectoryError):
                    listing[folder] = None
        return listing[folder]

    paths = index.table["path"].drop_nulls()
    present: set[str] = set()
    for folder in paths.str.extract(r"^(.*)/[^/]*$", 1).fill_null("").unique().to_list():
        names = entries(folder)
        if names:
            present.update(f"{folder}/{n}" if folder else n for n in names)
    missing = paths.filter(~paths.is_in(list(present))) if present else paths
    return missing.len(), missing.head(examples).to_list(), paths.len()


def inspect_task(task: ResolvedTask, locations: DataLocations, *, check_files: bool = True) -> dict[str, Any]:
    """The summary ``medbench data inspect`` prints (JSON-ready)."""
    data = load_task_data(task, locations)
    index = data.index
    spec = task.spec
    table = index.table
    splits = {}
    for name in SPLIT_ORDER:
        part = table.filter(pl.col("split") == name)
        splits[name] = split_summary(part, index, spec.attributes)
    n_missing, examples, checked = missing_files(index) if check_files else (None, [], 0)
    return {
        "task": task.name,
        "task_version": spec.version,
        "dataset": spec.dataset.name,
        "adapter": spec.dataset.adapter,
        "root": str(data.root) if data.root is not None else None,
        "source_files": [str(p) for p in index.source_files],
        "type": spec.type,
        "split_method": spec.splits.method,
        "n": table.height,
        "patients": int(table["patient_id"].n_unique()),
        "splits": splits,
        "images": "in memory" if index.pixels is not None else "files",
        "files_checked": checked,
        "missing_files": n_missing,
        "missing_examples": examples,
        "notes": index.notes,
        "problems": [str(p) for p in task_data_problems(data)],
    }
