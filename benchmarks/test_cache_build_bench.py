"""Building the preprocessing cache from full-size images: images/s, one process vs every core, before and after.

Run with ``PYTHONPATH=. python -m pytest benchmarks/test_cache_build_bench.py --benchmark-only -s``.

Generated originals (``MEDBENCH_BENCH_IMAGES`` of each, default 16), as the protocol's datasets ship them:

* ``jpeg``: 8-bit grey JPEGs of CheXpert's original size (2,320 x 2,828, quality 90), cached at 240 px
  (the chest X-ray tasks);
* ``png16``: 16-bit PNGs of 2,560 x 3,328 (12 bits used, as PadChest / NIH-style radiographs and mammograms
  exported to PNG), cached at 512 px (HyperRule's size for large images);
* ``dicom``: 16-bit MONOCHROME2 DICOMs of 3,328 x 4,084 (CBIS-DDSM's size), uncompressed, cached at 512 px.

Variants, in turn round after round (``train_common.interleaved``):

* ``before_1`` / ``before_all``: the cache build as it was (tests/legacy_input.py ``prepare_file``: a full-size
  decode, 16-bit scaling in float32), in this process / in a pool of processes, one per core (as the old
  ``build_cache`` did, up to 8);
* ``after_1`` / ``after_all``: :func:`medbench.data.cache.build_cache` with ``workers=1`` / every core (JPEGs
  decoded at DCT-domain reduced scale, 16-bit scaling by table), each round into a fresh cache folder.

Reported: images/s (best / median round), the per-core rate, and for the JPEGs the pixel difference between
the new cache and a full-size decode (mean and max absolute grey levels).
"""

from __future__ import annotations

import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from train_common import interleaved, load_average, summary

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import legacy_input  # noqa: E402  (the "before")

from medbench.data.base import DatasetIndex, label_column  # noqa: E402
from medbench.data.cache import build_cache  # noqa: E402

N_IMAGES = int(os.environ.get("MEDBENCH_BENCH_IMAGES", "16"))
ROUNDS = int(os.environ.get("MEDBENCH_BENCH_ROUNDS", "2"))
CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
FORMATS = {"jpeg": ((2828, 2320), 240), "png16": ((3328, 2560), 512), "dicom": ((4084, 3328), 512)}


def _radiograph(h: int, w: int, rng: np.random.Generator, top: int) -> np.ndarray:
    """A smooth field with ribs-like stripes and noise: compresses like a radiograph, not like white noise."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    cy, cx = rng.uniform(0.4, 0.6, 2) * (h, w)
    body = np.exp(-(((yy - cy) / (0.45 * h)) ** 2 + ((xx - cx) / (0.4 * w)) ** 2))
    img = top * (0.12 + 0.65 * body + 0.06 * body * np.sin(yy / 37.0)) + rng.normal(0, top / 150, (h, w))
    return np.clip(img, 0, top)


def _write(fmt: str, path: Path, rng: np.random.Generator) -> None:
    from PIL import Image

    (h, w), _ = FORMATS[fmt]
    if fmt == "jpeg":
        Image.fromarray(_radiograph(h, w, rng, 255).astype(np.uint8)).save(path, quality=90)
    elif fmt == "png16":
        Image.fromarray(_radiograph(h, w, rng, 4095).astype(np.uint16)).save(path)
    else:
        from pydicom.dataset import Dataset, FileMetaDataset
        from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.Rows, ds.Columns = h, w
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = _radiograph(h, w, rng, 4095).astype(np.uint16).tobytes()
        ds.save_as(path, enforce_file_format=True)


@pytest.fixture(scope="module")
def originals(tmp_path_factory: pytest.TempPathFactory) -> dict:
    rng = np.random.default_rng(0)
    out = {}
    for fmt in FORMATS:
        root = tmp_path_factory.mktemp(fmt)
        suffix = {"jpeg": "jpg", "png16": "png", "dicom": "dcm"}[fmt]
        names = [f"{i:03d}.{suffix}" for i in range(N_IMAGES)]
        for name in names:
            _write(fmt, root / name, rng)
        table = pl.DataFrame({"sample_id": names, "patient_id": names, "path": names,
                              label_column("y"): pl.Series([i % 2 for i in range(N_IMAGES)], dtype=pl.Int8)})
        out[fmt] = (root, names, DatasetIndex(f"bench-{fmt}", table, ["y"], root=root))
    return out


def _before_chunk(args: tuple) -> int:
    paths, size = args
    for p in paths:
        legacy_input.prepare_file(p, size, 1)
    return len(paths)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_cache_build_rate(benchmark, originals: dict, fmt: str, tmp_path: Path) -> None:
    benchmark.group = "cache build"
    root, names, index = originals[fmt]
    size = FORMATS[fmt][1]
    paths = [root / n for n in names]
    counter = {"i": 0}

    def after(workers: int):
        def go() -> None:
            counter["i"] += 1
            entry = build_cache(index, size, 1, workers=workers, root=tmp_path / f"c{counter['i']}")
            assert entry.ok.all()
        return go

    def before_all() -> None:
        parts = [(paths[i::CORES], size) for i in range(CORES)]
        with ProcessPoolExecutor(CORES) as pool:
            assert sum(pool.map(_before_chunk, parts)) == len(paths)

    variants = {"before_1": lambda: _before_chunk((paths, size)), "before_all": before_all,
                "after_1": after(1), "after_all": after(CORES)}
    result: dict = {}
    benchmark.pedantic(lambda: result.update(interleaved(variants, rounds=ROUNDS)), rounds=1, iterations=1)
    (h, w), _ = FORMATS[fmt]
    info = {"format": fmt, "original": f"{w}x{h}", "size": size, "images": N_IMAGES, "cores": CORES,
            "load_average": load_average()}
    print(f"\n{fmt} {w}x{h} -> {size} px, {N_IMAGES} images, {CORES} cores, load {info['load_average']}:")
    for name in variants:
        t = summary(result[name])
        rate = {"best": N_IMAGES / t["min"], "median": N_IMAGES / t["median"]}
        info[name] = {"seconds": t, "images_per_second": rate}
        per_core = rate["median"] / (CORES if name.endswith("all") else 1)
        print(f"  {name:10s} {rate['median']:7.1f} images/s median ({rate['best']:.1f} best; {per_core:.1f} per core)")
    if fmt == "jpeg":  # what reduced-scale decoding changes in the cached pixels
        entry = build_cache(index, size, 1, workers=CORES, root=tmp_path / "diff")
        full = np.stack([legacy_input.prepare_file(p, size, 1) for p in paths]).astype(int)
        diff = np.abs(np.asarray(entry.pixels).astype(int) - full)
        info["pixel_difference"] = {"mean": float(diff.mean()), "max": int(diff.max()),
                                    "share_changed": float((diff > 0).mean())}
        print(f"  cached pixels vs a full-size decode: mean |difference| {diff.mean():.3f} grey levels, max "
              f"{diff.max()}, {(diff > 0).mean():.1%} of pixels changed")
    benchmark.extra_info.update(info)
