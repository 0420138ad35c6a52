"""From a task spec to its dataset with splits: the data stage's one entry point."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from medbench.data.base import DatasetIndex, get_adapter, paths_outside_root_allowed
from medbench.data.locate import DataLocations, env_name
from medbench.data.splits import assign_splits
from medbench.errors import DataError
from medbench.specs import ResolvedTask


@dataclass
class TaskData:
    task: ResolvedTask
    #: rows of every split (``drop`` rows removed); column ``split`` holds train/val/test
    index: DatasetIndex
    root: Path | None

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


def load_task_data(task: ResolvedTask, locations: DataLocations) -> TaskData:
    with paths_outside_root_allowed(locations.allow_outside_root):
        return _load_task_data(task, locations)


def _load_task_data(task: ResolvedTask, locations: DataLocations) -> TaskData:
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
    if list(index.label_names) != list(spec.labels):
        raise DataError(f"adapter returned labels {index.label_names}, the task declares {spec.labels}",
                        where=str(task.path), field="labels")
    split = assign_splits(index, spec.splits, where=str(task.path))
    table = index.table.with_columns(split)
    keep = (table["split"] != "drop").to_numpy()
    index = DatasetIndex(name=index.name, table=table, label_names=index.label_names, root=index.root,
                         pixels=index.pixels, source_files=index.source_files, notes=index.notes).subset(keep)
    for name in ("train", "test"):
        if not (index.table["split"] == name).any():
            raise DataError(f"the {name} split is empty", where=str(task.path), field="splits")
    return TaskData(task=task, index=index, root=root)
