"""From a task spec to its dataset with splits: the data stage's one entry point.

Splits are a pure function of the task's split spec and the dataset, and a run
store keeps them: with ``split_store`` (the runner passes ``<out>/splits``), the
first run writes ``<store>/<dataset>/<key>.parquet`` (sample, patient, split;
``key`` hashes the split spec and the dataset's fingerprint: rows, patients,
labels, publisher split) and every later run with the same split spec on the
same data reuses it (another backbone, seed or a variant task such as a lower
resolution), even after a medbench upgrade that would split differently, so
all results in one folder are scored on the same test images. The reused split
is checked again for patient leakage and for covering exactly the dataset's
rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from medbench.data.base import DatasetIndex, get_adapter, paths_outside_root_allowed
from medbench.data.locate import DataLocations, env_name
from medbench.data.splits import assign_splits, leaking_groups
from medbench.errors import DataError
from medbench.spec import ResolvedTask
from medbench.utils import atomic_write_bytes, sha256_json


@dataclass
class TaskData:
    task: ResolvedTask
    #: rows of every split (``drop`` rows removed); column ``split`` holds train/val/test
    index: DatasetIndex
    root: Path | None
    #: where the split came from: {"file": path or None, "reused": bool, "differs_from_recomputed": int}
    split_source: dict | None = None
    #: how the split was made: ``official`` (the publisher's) or ``grouped`` (ours, also an official task's
    #: ``fallback: grouped`` on a copy without the official split)
    split_method: str = "grouped"

    def rows(self, split: str) -> np.ndarray:
        return np.nonzero((self.index.table["split"] == split).to_numpy())[0]

    def split_table(self) -> pl.DataFrame:
        return self.index.table.select("sample_id", "patient_id", "split")


def dataset_root(task: ResolvedTask, locations: DataLocations) -> Path | None:
    """The dataset folder of ``task``; a clear error when it is needed and absent."""
    spec = task.spec.dataset
    adapter = get_adapter(spec.adapter, where=str(task.path))
    if not getattr(adapter, "needs_root", True):
        return None
    root, how = locations.resolve(spec.name)
    if root is None:
        raise DataError(
            f"dataset {spec.name!r} of task {task.name!r} is not configured: pass --data {spec.name}=PATH, set "
            f"{env_name(spec.name)}, or --data-root DIR holding {spec.name}/; {adapter.how_to_get}",
            where=str(task.path), field="dataset.name",
        )
    if not root.is_dir():
        raise DataError(f"dataset folder of {spec.name!r} not found (from {how}); {adapter.how_to_get}",
                        where=root, field="dataset.name")
    return root


def missing_dataset(task: ResolvedTask, locations: DataLocations) -> str | None:
    """Why ``task``'s dataset is unavailable (not configured, or its folder absent); None when it is there."""
    spec = task.spec.dataset
    if not getattr(get_adapter(spec.adapter, where=str(task.path)), "needs_root", True):
        return None
    root, how = locations.resolve(spec.name)
    if root is None:
        return (f"dataset {spec.name!r} is not configured (--data {spec.name}=PATH, {env_name(spec.name)} "
                "or --data-root)")
    if not root.is_dir():
        return f"{root}: dataset folder of {spec.name!r} not found (from {how})"
    return None


def stored_split_path(store: Path, task: ResolvedTask, index: DatasetIndex) -> Path:
    from medbench.utils import safe_name

    key = sha256_json({"splits": task.spec.splits.model_dump(mode="json"), "data": index.fingerprint()})[:16]
    return Path(store) / safe_name(task.spec.dataset.name) / f"{key}.parquet"


def _reuse_or_store(path: Path, index: DatasetIndex, split: pl.Series, group_by: str) -> tuple[pl.Series, dict]:
    """The stored split at ``path`` when there is one (checked), else ``split``, written to ``path``."""
    import io

    if not path.is_file():
        buf = io.BytesIO()
        pl.DataFrame({"sample_id": index.table["sample_id"], "patient_id": index.table["patient_id"],
                      "split": split}).write_parquet(buf)
        atomic_write_bytes(path, buf.getvalue())
        return split, {"file": str(path), "reused": False, "differs_from_recomputed": 0}
    try:
        stored = pl.read_parquet(path, columns=["sample_id", "split"])
    except Exception as err:
        raise DataError(f"stored split is unreadable ({type(err).__name__}); delete it to split again", where=path
                        ) from err
    mapping = dict(zip(stored["sample_id"].to_list(), stored["split"].to_list()))
    ids = index.table["sample_id"].to_list()
    if stored.height != len(ids) or any(i not in mapping for i in ids):
        raise DataError("stored split does not cover this dataset's samples; delete it to split again", where=path,
                        field="sample_id")
    reused = pl.Series("split", [mapping[i] for i in ids], dtype=pl.Utf8)
    leak = leaking_groups(index.table[group_by].cast(pl.Utf8), reused)
    if leak:
        raise DataError(f"stored split puts {group_by} {leak[0]!r} on two sides; delete it to split again", where=path,
                        field="split")
    differs = int((reused != split).sum())
    return reused, {"file": str(path), "reused": True, "differs_from_recomputed": differs}


def load_task_data(task: ResolvedTask, locations: DataLocations, *, split_store: Path | None = None) -> TaskData:
    with paths_outside_root_allowed(locations.allow_outside_root):
        return _load_task_data(task, locations, split_store)


def _load_task_data(task: ResolvedTask, locations: DataLocations, split_store: Path | None) -> TaskData:
    spec = task.spec
    root = dataset_root(task, locations)
    adapter = get_adapter(spec.dataset.adapter, where=str(task.path))
    try:
        index = adapter.load(root, dict(spec.dataset.options), list(spec.labels), spec.type)
    except DataError as err:
        if err.where is None or not Path(err.where).exists():  # about the spec, not a data file: name the spec
            prefix = f"{err.where}: " if err.where else ""
            raise DataError(prefix + err.message, where=str(task.path), field=err.field) from err
        raise
    if len(index) == 0:
        where = index.source_files[0] if len(index.source_files) == 1 else str(task.path)
        raise DataError("the dataset lists no images; expected at least one labelled image", where=where,
                        field=None if len(index.source_files) == 1 else "dataset")
    if list(index.label_names) != list(spec.labels):
        raise DataError(f"adapter returned labels {index.label_names}, the task declares {spec.labels}",
                        where=str(task.path), field="labels")
    no_official = index.table["split"].null_count() == index.table.height
    method = "grouped" if spec.splits.method == "grouped" or (no_official and spec.splits.fallback == "grouped") \
        else "official"
    split = assign_splits(index, spec.splits, where=str(task.path), task_type=spec.type)
    source = None
    if split_store is not None:
        split, source = _reuse_or_store(stored_split_path(split_store, task, index), index, split,
                                        spec.splits.group_by)
    notes = dict(index.notes)
    unsplit = int((index.table["split"].is_null() & (split == "drop")).sum()) if spec.splits.method == "official" \
        else 0
    if unsplit:  # the publisher's split names no side for them (an image in neither NIH list, a blank cell)
        notes["rows_without_official_split"] = f"{unsplit} left out (no official split)"
    table = index.table.with_columns(split)
    keep = (table["split"] != "drop").to_numpy()
    index = DatasetIndex(name=index.name, table=table, label_names=index.label_names, root=index.root,
                         pixels=index.pixels, source_files=index.source_files, notes=notes).subset(keep)
    needed = ("test",) if spec.splits.evaluation_only else ("train", "test")
    for name in needed:
        if not (index.table["split"] == name).any():
            hint = "" if name == "test" else ("; an external test set is declared evaluation-only with splits: "
                                              "{method: grouped, fractions: {test: 1}}")
            raise DataError(f"the {name} split is empty{hint}", where=str(task.path), field="splits")
    return TaskData(task=task, index=index, root=root, split_source=source, split_method=method)
