"""``medbench data inspect TASK``: what a task's data stage yields, from the label files alone.

Runs the task's adapter and split (nothing is decoded; images may be absent)
and summarises each split: images, patients, per-label positives / negatives /
missing, and the count of every value of the task's subgroup attributes (binned
as the task bins them). Image files are only checked for existence.
Generic over :class:`~medbench.data.base.DatasetIndex`, so it works for every
adapter, the synthetic smoke tasks included.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from medbench.data.base import DatasetIndex
from medbench.data.locate import DataLocations
from medbench.data.task_data import load_task_data
from medbench.specs import AttributeSpec, ResolvedTask

SPLIT_ORDER = ("train", "val", "test")
UNKNOWN = "unknown"


def _edge(v: float) -> str:
    return f"{v:g}"


def attribute_values(table: pl.DataFrame, attr: AttributeSpec) -> list[str]:
    """Each row's value of ``attr`` as text: binned ``[lo, hi)`` when the attribute has bins; nulls are ``unknown``."""
    col = attr.source_column
    if col not in table.columns:
        return [UNKNOWN] * table.height
    values = table[col]
    if attr.bins is None:
        return [UNKNOWN if v is None else str(v) for v in values.to_list()]
    edges = attr.bins
    x = values.cast(pl.Float64, strict=False).to_numpy()
    idx = np.digitize(x, edges) - 1  # bin k holds edges[k] <= v < edges[k+1]
    names = [f"[{_edge(lo)}, {_edge(hi)})" for lo, hi in zip(edges, edges[1:])]
    out = []
    for v, k in zip(x, idx):
        if np.isnan(v):
            out.append(UNKNOWN)
        elif 0 <= k < len(names):
            out.append(names[k])
        else:
            out.append("outside bins")
    return out


def split_summary(table: pl.DataFrame, index: DatasetIndex, attributes: list[AttributeSpec]) -> dict[str, Any]:
    labels = {}
    for name, col in zip(index.label_names, index.label_columns):
        s = table[col]
        labels[name] = {"pos": int((s == 1).sum()), "neg": int((s == 0).sum()), "missing": int(s.null_count())}
    attrs: dict[str, dict[str, int]] = {}
    for attr in attributes:
        counts: dict[str, int] = {}
        for v in attribute_values(table, attr):
            counts[v] = counts.get(v, 0) + 1
        attrs[attr.name] = dict(sorted(counts.items()))
    return {"n": table.height, "patients": int(table["patient_id"].n_unique()), "labels": labels,
            "attributes": attrs}


def missing_files(index: DatasetIndex, examples: int = 10) -> tuple[int, list[str], int]:
    """(missing count, first missing paths, files checked); a folder that is absent is not listed file by file."""
    if index.pixels is not None:
        return 0, [], 0
    root = index.root or Path(".")
    paths = [p for p in index.table["path"].to_list() if p is not None]
    folder_entries: dict[str, set[str] | None] = {}
    missing: list[str] = []
    for rel in paths:
        parent, _, name = rel.rpartition("/")
        if parent not in folder_entries:
            try:
                folder_entries[parent] = set(os.listdir(root / parent))
            except (FileNotFoundError, NotADirectoryError):
                folder_entries[parent] = None  # the whole folder is absent
        entries = folder_entries[parent]
        if entries is None or name not in entries:
            missing.append(rel)
    return len(missing), missing[:examples], len(paths)


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
    }
