"""Building the preprocessing cache: every core, JPEGs decoded at reduced scale, 16-bit scaling by lookup table,
grey images stored with one channel for 3-channel networks, progress as rows complete."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from conftest import shared_data
from PIL import Image

from medbench.data import cache as cache_mod
from medbench.data.base import DatasetIndex, label_column
from medbench.data.cache import build_cache
from medbench.data.image_io import read_image, to_uint8


def _radiograph(h: int, w: int, seed: int, bits: int = 8) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    body = np.exp(-(((yy - h / 2) / (0.45 * h)) ** 2 + ((xx - w / 2) / (0.4 * w)) ** 2))
    top = 2 ** bits - 1
    img = 0.1 * top + 0.7 * top * body + rng.normal(0, top / 200, (h, w))
    return np.clip(img, 0, top).astype(np.uint8 if bits == 8 else np.uint16)


def _index(root: Path, names: list[str], name: str = "build-test") -> DatasetIndex:
    table = pl.DataFrame({"sample_id": names, "patient_id": names, "path": names,
                          label_column("y"): pl.Series([i % 2 for i in range(len(names))], dtype=pl.Int8)})
    return DatasetIndex(name, table, ["y"], root=root)


def _by_hand(path: Path, size: int, mode: str) -> np.ndarray:
    """Pillow alone: full decode, convert, squash to size x size (antialiased bilinear); [C, S, S]."""
    with Image.open(path) as im:
        arr = np.asarray(im.convert(mode).resize((size, size), Image.BILINEAR))
    return arr[None] if arr.ndim == 2 else np.transpose(arr, (2, 0, 1))


def test_16_bit_scaling_by_table_equals_the_float_formula() -> None:
    rng = np.random.default_rng(1)
    for arr in (rng.integers(600, 4096, size=(300, 200)).astype(np.uint16), np.full((4, 4), 7, np.uint16),
                np.array([[0, 65535], [1, 32768]], np.uint16), rng.integers(0, 65536, size=(64, 64)).astype(np.uint16)):
        a = arr.astype(np.float64)
        lo, hi = a.min(), a.max()
        want = np.zeros(arr.shape, np.uint8) if hi == lo else np.floor((a - lo) * 255.0 / (hi - lo) + 0.5)
        got = to_uint8(arr).astype(np.float64)
        # float32 rounding of the scale can move an exact .5 by one step; nothing else
        assert np.abs(got - want).max() <= 1 and (got == want).mean() > 0.999


def test_jpeg_is_decoded_at_the_largest_reduction_the_size_allows(tmp_path: Path) -> None:
    img = _radiograph(2828, 2320, 0)
    Image.fromarray(img).save(tmp_path / "cxr.jpg", quality=90)
    full = read_image(tmp_path / "cxr.jpg")
    assert full.shape == (2828, 2320)
    for size in (240, 320, 512, 1500, 3000):
        k = max(f for f in (1, 2, 4, 8) if f <= min(2320 // size, 2828 // size) or f == 1)
        reduced = read_image(tmp_path / "cxr.jpg", reduce_to=size)
        assert reduced.shape == (math.ceil(2828 / k), math.ceil(2320 / k)), size
        assert min(reduced.shape) >= min(size, 2320)
    # what the cache does (twice its size): after the squash the pixels are within 2 grey levels of a full decode's
    for size in (240, 512):
        small = cache_mod.prepare(read_image(tmp_path / "cxr.jpg", reduce_to=2 * size), size, 1).astype(int)
        diff = np.abs(small - _by_hand(tmp_path / "cxr.jpg", size, "L").astype(int))
        assert diff.mean() < 0.3 and diff.max() <= 2, size
    # other formats are not affected
    Image.fromarray(img).save(tmp_path / "cxr.png")
    assert np.array_equal(read_image(tmp_path / "cxr.png", reduce_to=240), read_image(tmp_path / "cxr.png"))


@pytest.fixture
def grey_and_colour(tmp_path: Path) -> tuple[Path, list[str], list[str]]:
    rng = np.random.default_rng(3)
    names = []
    for i in range(9):
        g = _radiograph(90 + i, 70, i)
        name = f"g{i}.png"
        if i % 3 == 0:
            Image.fromarray(np.repeat(g[..., None], 3, axis=2)).save(tmp_path / name)  # grey saved as RGB
        elif i % 3 == 1:
            Image.fromarray(np.dstack([g, g, g, np.full_like(g, 255)])).save(tmp_path / name)  # RGBA, equal channels
        else:
            Image.fromarray(g).save(tmp_path / name)  # L
        names.append(name)
    colour = rng.integers(0, 256, size=(80, 60, 3), dtype=np.uint8)
    Image.fromarray(colour).save(tmp_path / "c.png")
    return tmp_path, names, names[:4] + ["c.png"] + names[4:]


def test_grey_images_are_cached_with_one_channel_for_a_three_channel_network(grey_and_colour, tmp_path: Path,
                                                                             monkeypatch) -> None:
    root, grey, _ = grey_and_colour
    cache_root = tmp_path / "cache"
    entry = build_cache(_index(root, grey), 32, 3, root=cache_root, workers=1)
    assert entry.channels == 1 and entry.pixels.shape == (9, 1, 32, 32)
    for i, name in enumerate(grey):  # broadcast to 3 channels it is Pillow's own RGB squash of the file
        assert np.array_equal(np.repeat(entry.pixels[i], 3, axis=0), _by_hand(root / name, 32, "RGB")), name
    # the next request reads the entry (nothing decoded), and a 1-channel network shares it
    monkeypatch.setattr(DatasetIndex, "read_image", lambda *a, **k: pytest.fail("decoded again"))
    again = build_cache(_index(root, grey), 32, 3, root=cache_root, workers=1)
    assert again.path == entry.path and again.channels == 1
    assert build_cache(_index(root, grey), 32, 1, root=cache_root, workers=1).path == entry.path


@pytest.mark.parametrize("workers", [1, 2])
def test_one_colour_image_makes_a_three_channel_entry(grey_and_colour, tmp_path: Path, workers: int) -> None:
    root, _, mixed = grey_and_colour
    cache_root = tmp_path / "cache"
    entry = build_cache(_index(root, mixed), 32, 3, root=cache_root, workers=workers)
    assert entry.channels == 3
    for i, name in enumerate(mixed):
        assert np.array_equal(entry.pixels[i], _by_hand(root / name, 32, "RGB")), name
    leftovers = [p.name for p in (cache_root / "build-test").iterdir() if p.suffix == ".partial"]
    assert leftovers == []  # the abandoned 1-channel build left nothing
    # a 1-channel network still gets grey pixels of every image (the colour one converted), marked not grey
    one = build_cache(_index(root, mixed), 32, 1, root=cache_root, workers=workers)
    assert one.channels == 1 and np.array_equal(one.pixels[4], _by_hand(root / "c.png", 32, "L"))
    import json

    assert json.loads(one.path.with_suffix(".json").read_text())["grey"] is False


def test_parallel_build_equals_serial_and_reports_progress(tmp_path: Path) -> None:
    names = []
    for i in range(40):
        Image.fromarray(_radiograph(120, 100 + i, i, bits=16)).save(tmp_path / f"{i:02d}.png")
        Image.fromarray(_radiograph(300, 260, i)).save(tmp_path / f"{i:02d}.jpg", quality=85)
        names += [f"{i:02d}.png", f"{i:02d}.jpg"]
    seen: list[tuple[int, int]] = []
    serial = build_cache(_index(tmp_path, names), 24, 1, root=tmp_path / "a", workers=1)
    parallel = build_cache(_index(tmp_path, names), 24, 1, root=tmp_path / "b", workers=2,
                           progress=lambda done, total: seen.append((done, total)))
    assert np.array_equal(np.asarray(serial.pixels), np.asarray(parallel.pixels))
    assert [d for d, _ in seen] == sorted(d for d, _ in seen) and seen[-1] == (80, 80) and len(seen) > 2
    # JPEGs were decoded at reduced scale: a full-size decode differs slightly, PNGs not at all
    for i, name in enumerate(names):
        full = cache_mod.prepare(read_image(tmp_path / name), 24, 1)
        diff = np.abs(full.astype(int) - np.asarray(serial.pixels[i]).astype(int))
        assert diff.max() == 0 if name.endswith(".png") else (diff.mean() < 0.3 and diff.max() <= 2)


def test_in_memory_grey_pixels_stay_one_channel() -> None:
    pixels = np.random.default_rng(0).integers(0, 256, size=(5, 20, 20), dtype=np.uint8)
    table = pl.DataFrame({"sample_id": list("abcde"), "patient_id": list("abcde"),
                          label_column("y"): pl.Series([0, 1, 0, 1, 0], dtype=pl.Int8)})
    grey = build_cache(DatasetIndex("mem", table, ["y"], pixels=pixels), 16, 3)
    colour = build_cache(DatasetIndex("mem", table, ["y"], pixels=np.stack([pixels, pixels, pixels[::-1]], -1)), 16, 3)
    assert grey.channels == 1 and colour.channels == 3
    for i in range(5):  # broadcast to 3 channels: Pillow's RGB squash of the grey image
        rgb = np.asarray(Image.fromarray(np.stack([pixels[i]] * 3, -1)).resize((16, 16), Image.BILINEAR))
        assert np.array_equal(np.repeat(grey.pixels[i], 3, axis=0), np.transpose(rgb, (2, 0, 1)))


def test_real_nih_sample_rgb_files_are_grey(tmp_path: Path) -> None:
    root = shared_data("nih-cxr-1000", "images")
    names = sorted(p.name for p in root.glob("*.png"))[:24]
    entry = build_cache(_index(root, names, "nih-sample"), 48, 3, root=tmp_path, workers=2)
    assert entry.channels == 1
    for i in (0, 7, 23):
        assert np.array_equal(np.repeat(entry.pixels[i], 3, axis=0), _by_hand(root / names[i], 48, "RGB"))


def test_cache_progress_without_a_terminal_is_lines_with_a_rate(capsys: pytest.CaptureFixture, monkeypatch) -> None:
    import time

    from medbench.cli.console import progress_reporter

    clock = {"t": 1000.0}
    monkeypatch.setattr(time, "monotonic", lambda: clock["t"])
    monkeypatch.delenv("MEDBENCH_PROGRESS", raising=False)
    label = "big: caching 9,000 images at 32 px"
    with progress_reporter() as reporter:  # under pytest stderr is not a terminal: no bar, plain lines
        reporter.work_progress(label, 0, 9000)
        clock["t"] += 20
        reporter.work_progress(label, 2000, 9000)  # 20 s: no line yet
        clock["t"] += 20
        reporter.work_progress(label, 4000, 9000)  # 40 s: a line, 100 images/s, 50 s left
        clock["t"] += 50
        reporter.work_progress(label, 9000, 9000)  # the last line
        reporter.work_progress("small: caching 10 images", 0, 10)
        reporter.work_progress("small: caching 10 images", 10, 10)  # seconds: nothing printed
    # each line after its timestamp (YYYY-MM-DD HH:MM:SS)
    lines = [li[20:] for li in capsys.readouterr().err.splitlines() if "caching" in li]
    assert lines == [f"{label}: 4,000/9,000 (44%), 100.0/s, 50s left", f"{label}: 9,000/9,000 (100%), 100.0/s"]


def test_colour_found_early_stops_the_other_workers(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    Image.fromarray(rng.integers(0, 256, size=(40, 30, 3), dtype=np.uint8)).save(tmp_path / "000.png")
    names = ["000.png"]
    for i in range(1, 60):  # 8 chunks for 2 workers: the ones not started are cancelled
        Image.fromarray(_radiograph(40, 30, i)).save(tmp_path / f"{i:03d}.png")
        names.append(f"{i:03d}.png")
    entry = build_cache(_index(tmp_path, names), 16, 3, root=tmp_path / "cache", workers=2)
    assert entry.channels == 3 and entry.ok.all()
    for i in (0, 1, 59):
        assert np.array_equal(entry.pixels[i], _by_hand(tmp_path / names[i], 16, "RGB"))
    assert not list((tmp_path / "cache").rglob("*.partial"))
