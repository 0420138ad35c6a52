"""The preprocessing cache: every image decoded and resized once, then memory-mapped.

Training and evaluation read only the cache. An entry holds the rows of a
:class:`~medbench.data.base.DatasetIndex` as one uint8 array
``[N, C, S, S]`` on disk (``<key>.u8``) and a JSON sidecar written last, so a
half-written entry is never used. The key is the dataset fingerprint (file
list + labels + metadata, or in-memory pixels), the size, the channels and the
cache format version.

Images wider than 8 bits are min-max scaled per image to 8 bits; images are
squashed to S x S (Pillow, antialiased bilinear), as BiT does.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from medbench.data.base import DatasetIndex
from medbench.data.image_io import to_uint8
from medbench.errors import DataError, OutputError
from medbench.paths import cache_dir
from medbench.utils import atomic_write_json, sha256_json

CACHE_VERSION = 1
#: in-memory sources whose prepared images exceed this go through the memory-mapped file instead
#: (TissueMNIST at 160 px would otherwise hold 6 GB in RAM)
IN_MEMORY_LIMIT_BYTES = 1 << 30


@dataclass
class CachedImages:
    """Row-aligned uint8 images ``[N, C, S, S]`` and which rows decoded."""

    pixels: np.ndarray
    ok: np.ndarray  # bool [N]
    bad: list[dict]  # {"row", "path", "error"}
    path: Path | None

    @property
    def size(self) -> int:
        return int(self.pixels.shape[-1])

    @property
    def channels(self) -> int:
        return int(self.pixels.shape[1])


def prepare(img: np.ndarray, size: int, channels: int) -> np.ndarray:
    """One decoded image -> uint8 ``[C, size, size]``."""
    from PIL import Image

    img = to_uint8(img)
    if img.ndim == 3 and img.shape[-1] == 4:
        img = img[..., :3]
    if img.ndim == 3 and img.shape[-1] == 1:
        img = img[..., 0]
    if channels == 1 and img.ndim == 3:
        img = np.asarray(Image.fromarray(img).convert("L"))
    if img.shape[0] != size or img.shape[1] != size:
        img = np.asarray(Image.fromarray(img).resize((size, size), Image.BILINEAR))
    if img.ndim == 2:
        img = np.repeat(img[None], channels, axis=0)
    else:
        img = np.transpose(img, (2, 0, 1))
    return np.ascontiguousarray(img, dtype=np.uint8)


def cache_key(index: DatasetIndex, size: int, channels: int) -> str:
    # the folder is part of the key: two copies of a dataset with the same file names (e.g. a full and a
    # downsized one) must not share cached pixels
    root = str(Path(index.root).resolve()) if index.root is not None else None
    return sha256_json({"v": CACHE_VERSION, "data": index.fingerprint(), "size": size, "channels": channels,
                        "root": root})[:24]


def _decode_rows(args: tuple[DatasetIndex, str, tuple[int, ...], int, int, int]) -> list[dict]:
    index, out_path, shape, start, stop, size = args
    channels = shape[1]
    out = np.memmap(out_path, dtype=np.uint8, mode="r+", shape=shape)
    bad = []
    for row in range(start, stop):
        try:
            out[row] = prepare(index.read_image(row), size, channels)
        except DataError as err:
            bad.append({"row": row, "path": str(index.image_path(row) or row), "error": err.message,
                        "field": err.field})
        except Exception as err:  # a decoder's own exception: still the file's fault
            bad.append({"row": row, "path": str(index.image_path(row) or row), "error": f"{type(err).__name__}: {err}"})
    out.flush()
    del out
    return bad


def build_cache(
    index: DatasetIndex,
    size: int,
    channels: int,
    *,
    on_bad_image: str = "fail",
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    root: Path | None = None,
) -> CachedImages:
    """The cached images of ``index`` at ``size`` x ``size`` with ``channels``; built when absent."""
    n = len(index)
    shape = (n, channels, size, size)
    if index.pixels is not None and root is None and n * channels * size * size <= IN_MEMORY_LIMIT_BYTES:
        # small in-memory sources (synthetic, MedMNIST) are cheap to prepare: no disk round trip
        pixels = np.empty(shape, dtype=np.uint8)
        for i in range(n):
            pixels[i] = prepare(index.pixels[i], size, channels)
        return CachedImages(pixels=pixels, ok=np.ones(n, dtype=bool), bad=[], path=None)

    folder = (root or cache_dir() / "images") / index.name
    key = cache_key(index, size, channels)
    data_path = folder / f"{key}.u8"
    meta_path = folder / f"{key}.json"
    if meta_path.is_file() and data_path.is_file():
        meta = json.loads(meta_path.read_text())
        if tuple(meta["shape"]) == shape:
            return _open(data_path, shape, meta, on_bad_image, index)
    tmp_path = folder / f"{key}.u8.partial-{os.getpid()}"
    _allocate(tmp_path, int(np.prod(shape)))
    # in-memory pixels are resized in this process: worker processes would each receive a pickled copy
    workers = 1 if index.pixels is not None else (workers or min(os.cpu_count() or 1, 8))
    chunk = max(64, n // (workers * 8) if n else 64)
    jobs = [(index, str(tmp_path), shape, s, min(n, s + chunk), size) for s in range(0, n, chunk)]
    bad: list[dict] = []
    done = 0
    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            bad.extend(_decode_rows(job))
            done += job[4] - job[3]
            if progress:
                progress(done, n)
    else:
        import multiprocessing as mp

        ctx = mp.get_context("fork") if hasattr(os, "fork") else mp.get_context()
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            for job, result in zip(jobs, pool.map(_decode_rows, jobs)):
                bad.extend(result)
                done += job[4] - job[3]
                if progress:
                    progress(done, n)
    bad.sort(key=lambda b: b["row"])
    if bad and on_bad_image == "fail":
        tmp_path.unlink(missing_ok=True)
        first = bad[0]
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise DataError(f"{first['error']}{more}; set dataset.on_bad_image: skip to leave bad images out",
                        where=first["path"], field=first.get("field"))
    try:
        os.replace(tmp_path, data_path)
    except OSError as err:
        raise _cache_error(folder, err) from err
    meta = {"shape": list(shape), "dataset": index.name, "bad": bad, "version": CACHE_VERSION}
    atomic_write_json(meta_path, meta)
    return _open(data_path, shape, meta, on_bad_image, index)


def _cache_error(folder: Path, err: OSError) -> OutputError:
    return OutputError(f"cannot write the preprocessing cache ({err.strerror or err}); set MEDBENCH_CACHE to a "
                       "writable folder with enough space", where=folder)


def _allocate(path: Path, nbytes: int) -> None:
    """Create ``path`` with ``nbytes`` reserved on disk: a full disk fails here with a clear error, not
    later with SIGBUS when a memory-mapped page cannot be written."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o666)
        try:
            if nbytes and hasattr(os, "posix_fallocate"):
                os.posix_fallocate(fd, 0, nbytes)
            else:
                os.ftruncate(fd, nbytes)
        finally:
            os.close(fd)
    except OSError as err:
        try:
            path.unlink()
        except OSError:
            pass
        raise _cache_error(path.parent, err) from err


def _open(data_path: Path, shape: tuple[int, ...], meta: dict, on_bad_image: str, index: DatasetIndex) -> CachedImages:
    bad = meta.get("bad", [])
    if bad and on_bad_image == "fail":
        first = bad[0]
        raise DataError(f"{first['error']}; set dataset.on_bad_image: skip to leave bad images out",
                        where=first["path"], field=first.get("field"))
    ok = np.ones(shape[0], dtype=bool)
    for b in bad:
        ok[b["row"]] = False
    pixels = np.memmap(data_path, dtype=np.uint8, mode="r", shape=shape)
    return CachedImages(pixels=pixels, ok=ok, bad=bad, path=data_path)
