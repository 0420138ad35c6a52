"""Training reads from the preprocessing cache vs decoding full-size radiographs every epoch.

Not part of the default test run (``pyproject.toml``: ``testpaths = ["tests"]``). Run with::

    PYTHONPATH=. python -m pytest benchmarks/ --benchmark-only --benchmark-columns=mean,stddev,rounds

Fixture: ``N_IMAGES`` synthetic 16-bit PNG radiographs of 2000 x 2500 pixels (12 bits stored, as in
PadChest), written once to a temporary folder. Three measurements, same rows, same 240 px storage
size and 224 px random crops as the chest X-ray tasks:

* ``build_cache``: the one-time cost (decode + min-max to 8 bits + resize, written to a memory map);
* ``epoch_decoding``: one training epoch that decodes and resizes every original image again
  (what a loader without the cache does);
* ``epoch_from_cache``: one training epoch of :class:`medbench.data.loader.TrainStream` batches
  from the memory-mapped cache.

The ratio of the two epoch means is the speed-up per epoch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from PIL import Image

from medbench.data.base import DatasetIndex, label_column
from medbench.data.cache import build_cache, prepare
from medbench.data.loader import Normalization, TrainStream, to_model_input

N_IMAGES = 12
HEIGHT, WIDTH = 2500, 2000
SIZE, CROP, CHANNELS, BATCH = 240, 224, 3, 4
NORM = Normalization((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def radiograph(rng: np.random.Generator) -> np.ndarray:
    """A smooth 12-bit field with mild noise: compresses like a real radiograph, not like white noise."""
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
    cy, cx = rng.uniform(0.3, 0.7, 2) * (HEIGHT, WIDTH)
    body = np.exp(-(((yy - cy) / (0.45 * HEIGHT)) ** 2 + ((xx - cx) / (0.4 * WIDTH)) ** 2))
    img = 600 + 3000 * body + rng.normal(0, 20, (HEIGHT, WIDTH))
    return np.clip(img, 0, 4095).astype(np.uint16)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> DatasetIndex:
    root = tmp_path_factory.mktemp("radiographs")
    rng = np.random.default_rng(0)
    names = []
    for i in range(N_IMAGES):
        name = f"{i:04d}.png"
        Image.fromarray(radiograph(rng)).save(root / name)
        names.append(name)
    table = pl.DataFrame({"sample_id": names, "patient_id": [f"p{i}" for i in range(N_IMAGES)], "path": names,
                          label_column("finding"): pl.Series([i % 2 for i in range(N_IMAGES)], dtype=pl.Int8)})
    return DatasetIndex("bench-radiographs", table, ["finding"], root=root)


@pytest.fixture(scope="module")
def cache(dataset: DatasetIndex, tmp_path_factory: pytest.TempPathFactory):
    return build_cache(dataset, SIZE, CHANNELS, root=tmp_path_factory.mktemp("cache"), workers=1)


def test_build_cache_once(benchmark, dataset: DatasetIndex, tmp_path_factory: pytest.TempPathFactory) -> None:
    benchmark.group = "preprocessing cache"

    def build():
        return build_cache(dataset, SIZE, CHANNELS, root=tmp_path_factory.mktemp("cache-build"), workers=1)

    images = benchmark.pedantic(build, rounds=2, iterations=1)
    assert images.pixels.shape == (N_IMAGES, CHANNELS, SIZE, SIZE) and images.ok.all()


def test_epoch_decoding(benchmark, dataset: DatasetIndex) -> None:
    """Every step decodes its originals and resizes them; crops, flips and normalisation as the stream's."""
    benchmark.group = "one training epoch"
    labels = dataset.labels()
    rows = np.arange(len(dataset))

    def epoch() -> int:
        rng = np.random.default_rng(0)
        order = rng.permutation(rows)
        seen = 0
        for start in range(0, len(order), BATCH):
            batch = order[start : start + BATCH]
            pixels = np.stack([prepare(dataset.read_image(int(r)), SIZE, CHANNELS) for r in batch])
            offsets = rng.integers(0, SIZE - CROP + 1, size=(len(batch), 2))
            crops = np.stack([p[:, oy : oy + CROP, ox : ox + CROP] for p, (oy, ox) in zip(pixels, offsets)])
            x, y = to_model_input(crops, NORM), torch.from_numpy(labels[batch])
            assert x.shape[0] == y.shape[0]
            seen += x.shape[0]
        return seen

    assert benchmark.pedantic(epoch, rounds=3, iterations=1) == N_IMAGES


def test_epoch_from_cache(benchmark, dataset: DatasetIndex, cache) -> None:
    benchmark.group = "one training epoch"
    stream = TrainStream(cache.pixels, dataset.labels(), np.arange(len(dataset)), batch_size=BATCH, crop=CROP,
                         hflip=True, norm=NORM, seed=0)
    steps = N_IMAGES // BATCH

    def epoch() -> int:
        return sum(stream.batch(step)[0].shape[0] for step in range(steps))

    assert benchmark.pedantic(epoch, rounds=20, iterations=1) == N_IMAGES
