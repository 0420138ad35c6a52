"""A task's data made ready for training: splits, the preprocessing cache, labels and input geometry."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from medbench.data.cache import CachedImages, build_cache
from medbench.data.locate import DataLocations
from medbench.data.task_data import TaskData, load_task_data
from medbench.errors import DataError
from medbench.spec import ResolvedTask
from medbench.train.hyperrule import resolve_input


class Messages(Protocol):
    """What preparing data reports: messages, and (optionally, ``work_progress(label, done, total)``) the rows of a
    preprocessing cache being built, as they complete."""

    def message(self, text: str) -> None: ...


@dataclass
class PreparedData:
    """A task's data ready for training: splits, cached pixels, labels, input geometry."""

    data: TaskData
    images: CachedImages
    labels: np.ndarray  # float32 [N, L], NaN missing
    resize: int
    crop: int
    #: digest of the image files' stamps (medbench.data.fingerprint); None for in-memory pixels
    pixels: str | None = None

    @property
    def channels(self) -> int:
        """The network's input channels (the task's); the cache may hold grey images as one channel."""
        return self.data.task.spec.input.channels

    @property
    def fingerprint(self) -> str:
        """The data fingerprint of the run key: rows, labels, metadata and the image files' stamps."""
        if not hasattr(self, "_fingerprint"):
            self._fingerprint = self.data.index.fingerprint(self.pixels)
        return self._fingerprint

    def rows(self, split: str) -> np.ndarray:
        rows = self.data.rows(split)
        return rows[self.images.ok[rows]]

    def train_rows(self, task_type: str) -> np.ndarray:
        rows = self.rows("train")
        y = self.labels[rows]
        labelled = ~np.isnan(y).all(1) if task_type != "multiclass" else ~np.isnan(y).any(1)
        return rows[labelled]


def native_size(index, tries: int = 20) -> tuple[int, int]:
    """Height and width of the first readable image (a bad image is reported by the cache, per on_bad_image)."""
    first_error = None
    for row in range(min(len(index), tries)):
        try:
            img = index.read_image(row)
        except DataError as err:
            first_error = first_error or err
            continue
        return int(img.shape[0]), int(img.shape[1])
    if first_error is not None:
        raise first_error
    raise DataError("the dataset has no images", where=index.name)


def prepare_data(task: ResolvedTask, locations: DataLocations, reporter: Messages, *,
                 split_store: Path | None = None, resolution: int | None = None) -> PreparedData:
    data = load_task_data(task, locations, split_store=split_store)
    spec = task.spec
    need_native = spec.input.resize is None or spec.input.crop is None
    resize, crop = resolve_input(spec.input, native_size(data.index) if need_native else None)
    if resolution is not None:  # resolution sweep: another crop, the task's resize/crop ratio kept
        resize, crop = max(resolution, int(round(resolution * resize / crop))), resolution
    stamps = pixels = None
    if data.index.pixels is None:  # files: a stamp per image (size + mtime, or sha256 with --verify-pixels)
        from medbench.data.cache import row_paths
        from medbench.data.fingerprint import file_stamps, stamps_digest

        stamps = file_stamps(data.index.root, row_paths(data.index), locations.pixel_check)
        pixels = stamps_digest(locations.pixel_check, stamps)
    report = getattr(reporter, "work_progress", None)
    progress = None if report is None else (
        lambda done, n: report(f"{task.name}: caching {n:,} images at {resize} px", done, n))
    images = build_cache(data.index, resize, spec.input.channels, on_bad_image=spec.dataset.on_bad_image,
                         progress=progress, stamps=stamps, notice=reporter.message)
    if images.bad:
        reporter.message(f"{task.name}: {len(images.bad)} unreadable images left out (first: {images.bad[0]['path']})")
    return PreparedData(data=data, images=images, labels=data.index.labels(), resize=resize, crop=crop,
                        pixels=pixels)
