"""Cached loading vs decoding the originals each epoch (pytest-benchmark).

One epoch = every training image at the cache resolution (160 px, 3 channels).
``decode`` reads and resizes every original file, as a loader without a cache
does each epoch; ``cached`` reads the memory-mapped cache; ``cached_stream`` also
assembles the training batches (crop, flip, normalise) as medbench trains.
The originals are the real HAM10000 sample (56 JPEGs, 600 x 450) when
../shared/data is present, otherwise 56 generated JPEGs of the same size.

    python -m pytest benchmarks/ -n 0 --benchmark-only
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from medbench.data.base import DatasetIndex, label_column
from medbench.data.cache import build_cache, prepare

SIZE, CHANNELS, BATCH = 160, 3, 16


@pytest.fixture(scope="module")
def originals(tmp_path_factory: pytest.TempPathFactory) -> DatasetIndex:
    shared = Path(os.environ.get("MEDBENCH_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    real = shared / "ham10000-mini" / "HAM10000_images_part_1"
    if real.is_dir():
        root, files = real, sorted(p.name for p in real.glob("*.jpg"))
    else:
        from PIL import Image

        root = tmp_path_factory.mktemp("originals")
        rng = np.random.default_rng(0)
        files = []
        for i in range(56):
            arr = (rng.random((450, 600, 3)) * 255).astype(np.uint8)
            Image.fromarray(arr).save(root / f"{i:03d}.jpg", quality=90)
            files.append(f"{i:03d}.jpg")
    table = pl.DataFrame({"sample_id": files, "patient_id": files, "path": files,
                          label_column("y"): [i % 2 for i in range(len(files))]})
    return DatasetIndex("bench", table, ["y"], root=root)


def _decode_epoch(index: DatasetIndex) -> np.ndarray:
    return np.stack([prepare(index.read_image(i), SIZE, CHANNELS) for i in range(len(index))])


def test_decode_originals_each_epoch(benchmark, originals: DatasetIndex) -> None:
    out = benchmark.pedantic(_decode_epoch, args=(originals,), rounds=3, iterations=1)
    assert out.shape == (len(originals), CHANNELS, SIZE, SIZE)


def test_cached_epoch(benchmark, originals: DatasetIndex, tmp_path: Path) -> None:
    cached = build_cache(originals, SIZE, CHANNELS, workers=1, root=tmp_path)
    rows = np.arange(len(originals))

    def epoch() -> int:
        total = 0
        for s in range(0, len(rows), BATCH):
            total += int(np.asarray(cached.pixels[rows[s:s + BATCH]]).shape[0])
        return total

    assert benchmark.pedantic(epoch, rounds=5, iterations=1) == len(originals)


def test_cached_stream_epoch(benchmark, originals: DatasetIndex, tmp_path: Path) -> None:
    from medbench.data.loader import Normalization, TrainStream

    cached = build_cache(originals, SIZE, CHANNELS, workers=1, root=tmp_path)
    stream = TrainStream(cached.pixels, originals.labels(), np.arange(len(originals)), batch_size=BATCH, crop=128,
                         hflip=True, norm=Normalization((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)), seed=0)
    steps = len(originals) // BATCH

    def epoch() -> int:
        return sum(int(stream.batch(step)[0].shape[0]) for step in range(steps))

    assert benchmark.pedantic(epoch, rounds=5, iterations=1) == steps * BATCH
