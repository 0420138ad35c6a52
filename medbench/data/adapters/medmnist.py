"""MedMNIST v2/v3 2D sets (Yang et al. 2023, Sci Data 10:41; medmnist.com), any of the 12, any size.

Layout as released on Zenodo (record 10519652), all sets in one folder::

    medmnist/pneumoniamnist.npz          # 28 x 28
    medmnist/pneumoniamnist_64.npz       # MedMNIST+ sizes 64, 128, 224
    medmnist/chestmnist.npz ...

Each ``.npz`` holds ``train_images``, ``train_labels``, ``val_images``,
``val_labels``, ``test_images``, ``test_labels``: images ``[N, H, W]`` (grey) or
``[N, H, W, 3]``, uint8; labels ``[N, 1]`` class indices (binary, multi-class,
ordinal) or ``[N, L]`` 0/1 (multi-label ChestMNIST). The official split is used.
Label names are MedMNIST's ``INFO`` (:mod:`medbench.data.medmnist_info`); a
binary task names the positive class (label 1). MedMNIST carries no patient
identifiers: each image is its own group, and the publisher's split is taken
as is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
import polars as pl
from pydantic import BaseModel, ConfigDict

from medbench.data.adapters._common import parse_options, require_root
from medbench.data.base import DatasetIndex, label_column
from medbench.data.medmnist_info import SETS
from medbench.errors import DataError

SPLITS = ("train", "val", "test")


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")

    #: the MedMNIST set, e.g. ``pneumoniamnist``
    flag: Literal[tuple(SETS)]  # type: ignore[valid-type]
    #: image size of the file: 28 (``<flag>.npz``) or 64/128/224 (``<flag>_<size>.npz``)
    size: Literal[28, 64, 128, 224] = 28


def read_npz(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise DataError("MedMNIST file not found", where=path)
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = set(z.files)
            need = [f"{s}_{k}" for s in SPLITS for k in ("images", "labels")]
            missing = [k for k in need if k not in keys]
            if missing:
                raise DataError(f"array {missing[0]!r} is missing; expected {need}", where=path, field=missing[0])
            return {k: z[k] for k in need}
    except DataError:
        raise
    except Exception as err:  # zipfile/ValueError for a truncated or foreign file
        raise DataError(f"not a readable .npz file: {err}", where=path) from err


class MedmnistAdapter:
    name = "medmnist"
    description = "MedMNIST 2D sets (.npz with train/val/test images and labels), official split, any size"
    how_to_get = ("open download (medbench data download medmnist) or https://zenodo.org/records/10519652 ; expected "
                  "layout: medmnist/<flag>.npz (28 px) or medmnist/<flag>_<64|128|224>.npz, e.g. "
                  "medmnist/pneumoniamnist.npz")

    def load(self, root: Path | None, options: dict[str, Any], labels: list[str], task_type: str) -> DatasetIndex:
        opts = parse_options(Options, options, self.name)
        root = require_root(root, self.name)
        info = SETS[opts.flag]
        if task_type != info.medbench_type:
            raise DataError(f"{opts.flag} is {info.medbench_type}, the task says {task_type}",
                            where="medmnist adapter", field="type")
        if list(labels) != info.task_labels():
            raise DataError(f"{opts.flag} has labels {info.task_labels()} (MedMNIST INFO)", where="medmnist adapter",
                            field="labels")
        path = root / info.filename(opts.size)
        arrays = read_npz(path)
        images, ys, splits = [], [], []
        for s in SPLITS:
            x, y = arrays[f"{s}_images"], arrays[f"{s}_labels"]
            if x.ndim not in (3, 4) or x.shape[1:3] != (opts.size, opts.size):
                raise DataError(f"images of shape {x.shape}; expected [N, {opts.size}, {opts.size}(, 3)]", where=path,
                                field=f"{s}_images")
            if (x.ndim == 4) != (info.channels == 3):
                raise DataError(f"images of shape {x.shape}; {opts.flag} has {info.channels} channel(s)", where=path,
                                field=f"{s}_images")
            y = y.reshape(len(y), -1)
            if len(y) != len(x):
                raise DataError(f"{len(y)} labels for {len(x)} images", where=path, field=f"{s}_labels")
            images.append(x)
            ys.append(y)
            splits += [s] * len(x)
        y = np.concatenate(ys).astype(np.int64)
        n_classes = len(info.labels)
        if info.medbench_type == "multilabel":
            if y.shape[1] != n_classes or not np.isin(y, (0, 1)).all():
                raise DataError(f"labels must be [N, {n_classes}] of 0/1", where=path, field="train_labels")
            onehot = y
        else:
            if y.shape[1] != 1 or y.min() < 0 or y.max() >= n_classes:
                raise DataError(f"labels must be [N, 1] class indices 0..{n_classes - 1}", where=path,
                                field="train_labels")
            onehot = np.eye(n_classes, dtype=np.int64)[y[:, 0]]
            if info.medbench_type == "binary":
                onehot = onehot[:, 1:]  # the positive class
        ids = [f"{s}-{i:06d}" for s in SPLITS for i in range(len(arrays[f"{s}_images"]))]
        table = pl.DataFrame({"sample_id": ids, "patient_id": ids, "split": splits,
                              "site": [opts.flag] * len(ids),
                              **{label_column(lab): pl.Series(onehot[:, k], dtype=pl.Int8)
                                 for k, lab in enumerate(labels)}})
        counts = {s: splits.count(s) for s in SPLITS}
        return DatasetIndex(name=f"medmnist-{opts.flag}-{opts.size}", table=table, label_names=list(labels),
                            root=root, pixels=np.concatenate(images), source_files=[path],
                            notes={"counts": counts, "official_counts": info.n_samples,
                                   "official_counts_match": counts == info.n_samples})


ADAPTER = MedmnistAdapter()
