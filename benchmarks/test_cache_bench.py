"""Training reads from the preprocessing cache vs decoding full-size radiographs every epoch.

Not part of the default test run (``pyproject.toml``: ``testpaths = ["tests"]``). Run with::

    PYTHONPATH=. python -m pytest benchmarks/ -n 0 --benchmark-only --benchmark-columns=mean,stddev,rounds

Fixture: ``N_IMAGES`` synthetic 16-bit PNG radiographs of 2000 x 2500 pixels (12 bits stored, as in
PadChest), written once to a temporary folder. Three measurements, same rows, same 240 px storage
size and 224 px random crops as the chest X-ray tasks:

* ``build_cache``: the one-time cost (decode + min-max to 8 bits + resize, written to a memory map);
* ``epoch_decoding``: one training epoch that decodes and resizes every original image again
  (what a loader without the cache does);
* ``epoch_from_cache``: one training epoch of :class:`medbench.data.loader.TrainStream` batches
  from the memory-mapped cache.

The ratio of the two epoch times is the speed-up per epoch; ``test_cache_speedup_side_by_side`` runs
both epochs in turn in one session (min and median, target >= 20x).
"""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch
from PIL import Image

from medbench.data.base import DatasetIndex, label_column
from medbench.data.cache import build_cache, prepare
from medbench.data.loader import Normalization, TrainStream, normalize

N_IMAGES = 12
HEIGHT, WIDTH = 2500, 2000
SIZE, CROP, CHANNELS, BATCH = 240, 224, 3, 4
NORM = Normalization((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
ROUNDS = 3
TARGET_SPEEDUP = 20.0


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
    # grey radiographs are cached with one channel for a 3-channel network (issue 19: a third of the bytes)
    assert images.pixels.shape == (N_IMAGES, 1, SIZE, SIZE) and images.ok.all()


def decoding_epoch(dataset: DatasetIndex) -> int:
    """One epoch that decodes and resizes every original again; crops, flips and normalisation as the stream's."""
    labels = dataset.labels()
    rng = np.random.default_rng(0)
    order = rng.permutation(np.arange(len(dataset)))
    seen = 0
    for start in range(0, len(order), BATCH):
        batch = order[start : start + BATCH]
        pixels = np.stack([prepare(dataset.read_image(int(r)), SIZE, CHANNELS) for r in batch])
        offsets = rng.integers(0, SIZE - CROP + 1, size=(len(batch), 2))
        crops = np.stack([p[:, oy : oy + CROP, ox : ox + CROP] for p, (oy, ox) in zip(pixels, offsets)])
        x, y = normalize(torch.from_numpy(crops), NORM), torch.from_numpy(labels[batch])
        assert x.shape[0] == y.shape[0]
        seen += x.shape[0]
    return seen


def cached_epoch(stream: TrainStream) -> int:
    """One epoch of TrainStream batches from the memory-mapped cache."""
    return sum(stream.batch(step)[0].shape[0] for step in range(N_IMAGES // BATCH))


def test_epoch_decoding(benchmark, dataset: DatasetIndex) -> None:
    """Every step decodes its originals and resizes them; crops, flips and normalisation as the stream's."""
    benchmark.group = "one training epoch"
    assert benchmark.pedantic(decoding_epoch, args=(dataset,), rounds=3, iterations=1) == N_IMAGES


def _stream(dataset: DatasetIndex, cache) -> TrainStream:
    return TrainStream(cache.pixels, dataset.labels(), np.arange(len(dataset)), batch_size=BATCH, crop=CROP,
                       hflip=True, norm=NORM, seed=0)


def test_epoch_from_cache(benchmark, dataset: DatasetIndex, cache) -> None:
    benchmark.group = "one training epoch"
    stream = _stream(dataset, cache)
    assert benchmark.pedantic(cached_epoch, args=(stream,), rounds=20, iterations=1) == N_IMAGES


def test_cache_speedup_side_by_side(benchmark, dataset: DatasetIndex, cache) -> None:
    """Both epochs in turn, round after round (same load on both): the per-epoch speed-up, target >= 20x."""
    from train_common import interleaved, load_average, summary

    benchmark.group = "cache vs decoding, interleaved"
    stream = _stream(dataset, cache)
    result: dict = {}
    variants = {"decoding": lambda: decoding_epoch(dataset), "cache": lambda: cached_epoch(stream)}
    benchmark.pedantic(lambda: result.update(interleaved(variants, rounds=ROUNDS)), rounds=1, iterations=1)
    dec, cac = summary(result["decoding"]), summary(result["cache"])
    info = {"images": N_IMAGES, "original": f"{WIDTH}x{HEIGHT} 16-bit PNG", "size": SIZE, "crop": CROP,
            "load_average": load_average(), "decoding_epoch": dec, "cache_epoch": cac,
            "speedup_min": dec["min"] / cac["min"], "speedup_median": dec["median"] / cac["median"],
            "cache_images_per_second": N_IMAGES / cac["median"],
            "decoding_images_per_second": N_IMAGES / dec["median"]}
    benchmark.extra_info.update(info)
    print(f"\nepoch of {N_IMAGES} {WIDTH}x{HEIGHT} 16-bit PNGs, load {info['load_average']}: decoding min "
          f"{dec['min']:.3f} s median {dec['median']:.3f} s; cache min {cac['min'] * 1e3:.2f} ms median "
          f"{cac['median'] * 1e3:.2f} ms; speed-up min {info['speedup_min']:.0f}x median "
          f"{info['speedup_median']:.0f}x (target {TARGET_SPEEDUP:.0f}x)")
    assert info["speedup_median"] >= TARGET_SPEEDUP
