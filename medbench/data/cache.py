"""The preprocessing cache: every image decoded and resized once, then memory-mapped.

Training and evaluation read only the cache. An entry holds the rows of a
:class:`~medbench.data.base.DatasetIndex` as one uint8 array
``[N, C, S, S]`` on disk (``<key>.u8``), the image paths of its rows in order
(``<key>.rows.json``) and a JSON sidecar written last (``<key>.json``: shape,
bad images), so a half-written entry is never used.

The key is what fixes the pixels, and nothing else: the pixel source (the
resolved dataset folder and the ordered list of image paths with each file's
stamp, or for in-memory datasets such as synthetic and MedMNIST a hash of the
pixel array), the size, the channels,
:data:`~medbench.data.image_io.DECODER_VERSION` and the cache format version.
A file's stamp (:mod:`medbench.data.fingerprint`) is its size and mtime, or
with ``--verify-pixels`` the sha256 of its bytes: an image replaced under the
same path gets a new entry, never the old pixels. Labels, label policies (CheXpert's U-Ignore vs U-Ones), the
label set and splits are not in it, so tasks that differ only there share one
entry. A task whose images are a subset or a reordering of an existing entry's
(the same folder, size, channels and versions, and each image with the stamp
the entry recorded for it; e.g. ``frontal_only`` after the full CheXpert)
reads that entry through a row map instead of decoding again.

Images wider than 8 bits are min-max scaled per image to 8 bits; images are
squashed to S x S (Pillow, antialiased bilinear), as BiT does. An entry is
built into a temporary ``<key>.u8.<uuid>.<pid>@<host>.partial`` (unique across
the nodes of a shared file system) renamed into place when complete; a partial
file of a build killed on this host is removed by the next build of that key.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from medbench.data.base import DatasetIndex
from medbench.data.image_io import DECODER_VERSION, to_uint8
from medbench.errors import DataError, OutputError
from medbench.paths import cache_dir
from medbench.utils import (
    atomic_write_json,
    atomic_write_text,
    sha256_json,
    usable_cores,
    writer_gone,
    writer_tag,
)

#: bumped when the entry layout or :func:`prepare` changes (2: keyed on the pixel source, rows file; 3: file
#: stamps in the key and the rows file). Grey 1-channel entries for 3-channel networks need no bump: their key
#: has 1 channel and their sidecar ``"grey": true``, which entries of earlier code never have
CACHE_VERSION = 3
#: JPEGs are decoded at the largest DCT-domain reduction (1/2, 1/4, 1/8) keeping both sides at least this many
#: times the cache size, so the antialiased resize after it still reduces by 2x or more: the cached pixels then
#: differ from a full-size decode's by 0.16-0.23 grey levels on average, at most 2 (at 1x: 0.3-2.1, up to 6;
#: docs/performance.md)
JPEG_REDUCE_MARGIN = 2
#: in-memory sources whose prepared images exceed this go through the memory-mapped file instead
#: (TissueMNIST at 160 px would otherwise hold 6 GB in RAM)
IN_MEMORY_LIMIT_BYTES = 1 << 30


class RowMap:
    """Some rows of a cache entry's array, in the order a task needs them, indexed like an array
    ``[len(rows), C, S, S]`` of their own (an int, a slice, an index array or a boolean mask first).
    Reads from the entry's memory map go in ascending order."""

    def __init__(self, base: np.ndarray, rows: np.ndarray):
        self.base = base
        self.rows = np.asarray(rows, dtype=np.int64)
        self.shape = (len(self.rows), *base.shape[1:])
        self.dtype = base.dtype
        self.ndim = base.ndim

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key: Any) -> np.ndarray:
        rest: tuple = ()
        if isinstance(key, tuple):
            key, rest = key[0], key[1:]
        picked = self.rows[key]
        if np.ndim(picked) == 0:
            out = np.asarray(self.base[int(picked)])
        else:
            order = np.argsort(picked, kind="stable")
            out = np.empty((len(picked), *self.shape[1:]), dtype=self.dtype)
            out[order] = self.base[picked[order]]
        return out[rest] if rest else out

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self[:]
        return out if dtype is None else out.astype(dtype, copy=False)


@dataclass
class CachedImages:
    """Row-aligned uint8 images ``[N, C, S, S]`` and which rows decoded."""

    pixels: np.ndarray | RowMap
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


def pixel_source(index: DatasetIndex) -> dict:
    """Where the pixels of ``index`` come from, without its rows: in-memory pixels by content, files by
    their folder (two copies of a dataset with the same file names, e.g. a full and a downsized one,
    must not share cached pixels)."""
    if index.pixels is not None:
        h = hashlib.sha256(f"{index.pixels.shape}|{index.pixels.dtype}".encode())
        h.update(np.ascontiguousarray(index.pixels).view(np.uint8).data)
        return {"memory": h.hexdigest()}
    return {"folder": str(Path(index.root if index.root is not None else ".").resolve())}


def row_paths(index: DatasetIndex) -> list[str | None]:
    """The image path of each row, in order (None for in-memory pixels or a row without a path)."""
    if index.pixels is not None:
        return [None] * len(index)
    return index.table["path"].to_list()


def _family(source: dict, size: int, channels: int) -> str:
    """Entries of one family hold the same pixels for the same path: a subset can read another's rows."""
    return sha256_json({"v": CACHE_VERSION, "decoder": DECODER_VERSION, "source": source, "size": size,
                        "channels": channels})


def cache_key(index: DatasetIndex, size: int, channels: int, *, source: dict | None = None,
              paths: list[str | None] | None = None, stamps: list[str | None] | None = None) -> str:
    """The entry of ``index`` at ``size``/``channels``: pixel source, ordered image paths and their file stamps
    (:func:`medbench.data.fingerprint.file_stamps`), versions.

    Labels, splits and sample metadata do not enter: they do not change the pixels.
    """
    source = pixel_source(index) if source is None else source
    paths = row_paths(index) if paths is None else paths
    rows = hashlib.sha256(json.dumps(paths if stamps is None else [paths, stamps]).encode()).hexdigest()
    return sha256_json({"family": _family(source, size, channels), "rows": rows, "n": len(paths)})[:24]


def is_grey(img: np.ndarray) -> bool:
    """A decoded image whose channels are one grey channel: ``[H, W]``, ``[H, W, 1]``, or colour channels that
    are all equal (grey radiographs stored as RGB); an alpha channel does not count."""
    if img.ndim == 2 or img.shape[-1] == 1:
        return True
    return bool(np.array_equal(img[..., 0], img[..., 1]) and np.array_equal(img[..., 0], img[..., 2]))


#: the dataset and the colour-abort flag of a worker process (set once per process by :func:`_init_worker`, so
#: the dataset index is not pickled with every chunk)
_WORKER: dict = {}


def _init_worker(index: DatasetIndex, abort: Any) -> None:
    _WORKER.update(index=index, abort=abort)


def _decode_rows(index: DatasetIndex, out_path: str, shape: tuple[int, ...], start: int, stop: int, size: int,
                 grey_only: bool = False, abort: Any = None) -> tuple[list[dict], int]:
    """Decode rows ``start``..``stop - 1`` into the memory-mapped file; (bad images, colour images seen).
    ``grey_only``: a 1-channel build for a 3-channel network, given up (``abort`` set) at the first colour image."""
    channels = shape[1]
    out = np.memmap(out_path, dtype=np.uint8, mode="r+", shape=shape)
    bad = []
    colour = 0
    for row in range(start, stop):
        if abort is not None and abort.is_set():
            break
        try:
            img = index.read_image(row, reduce_to=JPEG_REDUCE_MARGIN * size)
            if channels == 1 and not is_grey(img):
                colour += 1
                if grey_only:
                    if abort is not None:
                        abort.set()
                    break
            out[row] = prepare(img, size, channels)
        except DataError as err:
            bad.append({"row": row, "path": str(index.image_path(row) or row), "error": err.message,
                        "field": err.field})
        except Exception as err:  # a decoder's own exception: still the file's fault
            bad.append({"row": row, "path": str(index.image_path(row) or row), "error": f"{type(err).__name__}: {err}"})
    out.flush()
    del out
    return bad, colour


def _worker_decode(job: tuple) -> tuple[list[dict], int]:
    return _decode_rows(_WORKER["index"], *job, abort=_WORKER["abort"])


def build_cache(
    index: DatasetIndex,
    size: int,
    channels: int,
    *,
    on_bad_image: str = "fail",
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    root: Path | None = None,
    notice: Callable[[str], None] | None = None,
    stamps: list[str | None] | None = None,
) -> CachedImages:
    """The cached images of ``index`` at ``size`` x ``size`` for a network taking ``channels``; built when absent.

    For a 3-channel network, grey datasets are cached with **one channel** (a third of the disk, memory and
    transfer; the input path broadcasts it to 3 on the device, giving the same numbers): an existing 3-channel
    entry is used as it is, else a grey 1-channel entry (``"grey": true`` in its sidecar: every image has one
    channel or equal colour channels), else a 1-channel build that gives up at the first colour image, which
    then makes a 3-channel entry. Decoding runs on every core the process may use (``workers``: default all),
    one process each; JPEGs are decoded at reduced scale when ``size`` allows (:data:`JPEG_REDUCE_MARGIN`,
    :func:`~medbench.data.image_io.read_image`). ``progress(done, total)`` is called as rows complete.
    ``stamps``: each row's file stamp (:mod:`medbench.data.fingerprint`), part of the key; None for in-memory
    pixels (hashed instead) and in tests that do not replace files.

    An entry that is damaged (its array file shorter or longer than its sidecar says, e.g. truncated by a
    full disk or a copy, or a sidecar that is not JSON) is not used: it is rebuilt, and ``notice`` gets one
    line naming the file and why.
    """
    if index.pixels is not None and root is None and \
            len(index) * channels * size * size <= IN_MEMORY_LIMIT_BYTES:
        # small in-memory sources (synthetic, MedMNIST) are cheap to prepare: no disk round trip
        stored = 1 if channels == 3 and _all_grey(index.pixels) else channels
        pixels = np.empty((len(index), stored, size, size), dtype=np.uint8)
        for i in range(len(index)):
            pixels[i] = prepare(index.pixels[i], size, stored)
        return CachedImages(pixels=pixels, ok=np.ones(len(index), dtype=bool), bad=[], path=None)
    if channels == 3:
        found = _existing(index, size, 3, on_bad_image, root, stamps, notice) or \
            _existing(index, size, 1, on_bad_image, root, stamps, notice, need_grey=True)
        if found is not None:
            return found
        grey = _build(index, size, 1, on_bad_image=on_bad_image, workers=workers, progress=progress, root=root,
                      stamps=stamps, grey_only=True)
        if grey is not None:
            return grey
    checked = channels == 3  # its entries were looked for above
    return (None if checked else _existing(index, size, channels, on_bad_image, root, stamps, notice)) or \
        _build(index, size, channels, on_bad_image=on_bad_image, workers=workers, progress=progress, root=root,
               stamps=stamps)


def _all_grey(pixels: np.ndarray) -> bool:
    """In-memory images ``[N, H, W]`` or ``[N, H, W, C]`` that are all grey (see :func:`is_grey`)."""
    return pixels.ndim == 3 or (pixels.ndim == 4 and is_grey(pixels))


def _entry(index: DatasetIndex, size: int, channels: int, root: Path | None,
           stamps: list[str | None] | None) -> dict:
    """Where the entry of ``index`` at ``size``/``channels`` lives: folder, pixel source, row paths, family, key."""
    folder = (root or cache_dir() / "images") / index.name
    source, paths = pixel_source(index), row_paths(index)
    family = _family(source, size, channels)
    key = cache_key(index, size, channels, source=source, paths=paths, stamps=stamps)
    return {"folder": folder, "source": source, "paths": paths, "family": family, "key": key,
            "data": folder / f"{key}.u8", "meta": folder / f"{key}.json"}


def _existing(index: DatasetIndex, size: int, channels: int, on_bad_image: str, root: Path | None,
              stamps: list[str | None] | None, notice: Callable[[str], None] | None = None, *,
              need_grey: bool = False) -> CachedImages | None:
    """The complete entry of ``index`` (or one covering its images with the same file stamps), None when there
    is none; ``need_grey``: only a 1-channel entry known to hold grey images (usable for a 3-channel network).
    A damaged entry is not used (``notice`` gets one line naming it)."""
    e = _entry(index, size, channels, root, stamps)
    shape = (len(index), channels, size, size)
    meta = _read_meta(e["meta"])
    if meta is None and e["meta"].is_file() and notice:
        notice(f"{e['meta']}: preprocessing cache sidecar is unreadable; rebuilding the entry")
    if meta is not None and e["data"].is_file() and tuple(meta["shape"]) == shape \
            and (not need_grey or meta.get("grey") is True):
        damage = _size_problem(e["data"], shape)
        if damage is None:
            return _open(e["data"], shape, meta, on_bad_image)
        if notice:
            notice(f"{e['data']}: preprocessing cache entry is damaged ({damage}); rebuilding it")
    covering = _covering_entry(e["folder"], e["family"], e["paths"], shape, stamps, need_grey=need_grey)
    if covering is not None:
        return covering if on_bad_image != "fail" or not covering.bad else _fail_on(covering.bad)
    return None


def _build(index: DatasetIndex, size: int, channels: int, *, on_bad_image: str, workers: int | None,
           progress: Callable[[int, int], None] | None, root: Path | None,
           stamps: list[str | None] | None, grey_only: bool = False) -> CachedImages | None:
    """Decode every image into a new entry; ``grey_only`` (1 channel for a 3-channel network): None, and
    nothing kept, when an image is in colour."""
    e = _entry(index, size, channels, root, stamps)
    folder, key, paths = e["folder"], e["key"], e["paths"]
    n = len(index)
    shape = (n, channels, size, size)
    _remove_dead_partials(folder, key)
    tmp_path = folder / f"{key}.u8.{uuid.uuid4().hex}.{writer_tag()}.partial"
    _allocate(tmp_path, int(np.prod(shape)))
    # in-memory pixels are resized in this process: worker processes would each receive a pickled copy
    workers = 1 if index.pixels is not None else (workers or usable_cores())
    chunk = max(8, min(256, n // (workers * 16) if n else 8))  # small chunks: even load, frequent progress
    jobs = [(str(tmp_path), shape, s, min(n, s + chunk), size, grey_only) for s in range(0, n, chunk)]
    bad: list[dict] = []
    colour = 0
    done = 0
    if progress:
        progress(0, n)  # starts the reporter's clock
    try:
        if workers <= 1 or len(jobs) <= 1:
            for job in jobs:
                b, c = _decode_rows(index, *job)
                bad.extend(b)
                colour += c
                done += job[3] - job[2]
                if progress:
                    progress(done, n)
                if grey_only and colour:
                    break
        else:
            import multiprocessing as mp
            from concurrent.futures import as_completed

            ctx = mp.get_context("fork") if hasattr(os, "fork") else mp.get_context()
            abort = ctx.Event()
            with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=ctx, initializer=_init_worker,
                                     initargs=(index, abort)) as pool:
                futures = {pool.submit(_worker_decode, job): job for job in jobs}
                for f in as_completed(futures):
                    b, c = f.result()
                    bad.extend(b)
                    colour += c
                    done += futures[f][3] - futures[f][2]
                    if grey_only and colour:  # the running chunks stop at the flag, the waiting ones never start
                        for other in futures:
                            other.cancel()
                        break
                    if progress:
                        progress(done, n)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    if grey_only and colour:
        tmp_path.unlink(missing_ok=True)
        return None
    bad.sort(key=lambda b: b["row"])
    if bad and on_bad_image == "fail":
        tmp_path.unlink(missing_ok=True)
        first = bad[0]
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise DataError(f"{first['error']}{more}; set dataset.on_bad_image: skip to leave bad images out",
                        where=first["path"], field=first.get("field"))
    try:
        os.replace(tmp_path, e["data"])
    except OSError as err:
        raise _cache_error(folder, err) from err
    rows_file = folder / f"{key}.rows.json"
    if all(p is not None for p in paths):  # what a later subset looks its rows up in
        atomic_write_text(rows_file, json.dumps({"paths": paths, "stamps": stamps}))
    meta = {"shape": list(shape), "dataset": index.name, "bad": bad, "version": CACHE_VERSION,
            "decoder": DECODER_VERSION, "family": e["family"], "source": e["source"],
            "rows": rows_file.name if all(p is not None for p in paths) else None}
    if channels == 1:  # whether a 3-channel network may read it (every readable image grey)
        meta["grey"] = colour == 0
    atomic_write_json(e["meta"], meta)
    return _open(e["data"], shape, meta, on_bad_image)


def _read_meta(path: Path) -> dict | None:
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):
        return None
    ok = isinstance(meta, dict) and isinstance(meta.get("shape"), list) and len(meta["shape"]) == 4 \
        and all(isinstance(x, int) and x >= 0 for x in meta["shape"]) and isinstance(meta.get("bad", []), list) \
        and all(isinstance(b, dict) and isinstance(b.get("row"), int) and 0 <= b["row"] < meta["shape"][0]
                for b in meta.get("bad", []))
    return meta if ok else None


def _size_problem(data_path: Path, shape: tuple[int, ...]) -> str | None:
    """Why the array file cannot hold ``shape`` uint8 values (truncated, or not the size written), or None."""
    expected = int(np.prod(shape))
    try:
        actual = data_path.stat().st_size
    except OSError as err:
        return f"unreadable: {err.strerror or err}"
    if actual != expected:
        return f"{actual:,} bytes, expected {expected:,}"
    return None


def _covering_entry(folder: Path, family: str, paths: list[str | None], shape: tuple[int, ...],
                    stamps: list[str | None] | None = None, *, need_grey: bool = False) -> CachedImages | None:
    """An existing entry of the same family holding every image of ``paths`` with the same file stamps (the
    smallest such), read through a row map; None when there is none. ``need_grey``: only entries known to
    hold grey images."""
    if not paths or any(p is None for p in paths) or not folder.is_dir():
        return None
    wanted = set(paths)
    candidates = []
    for meta_path in folder.glob("*.json"):
        if meta_path.name.endswith(".rows.json"):
            continue
        meta = _read_meta(meta_path)
        if meta is None or meta.get("family") != family or not meta.get("rows") \
                or tuple(meta["shape"][1:]) != shape[1:] or meta["shape"][0] < len(wanted) \
                or (need_grey and meta.get("grey") is not True):
            continue
        candidates.append((meta["shape"][0], meta_path.name, meta_path, meta))
    for n, _, meta_path, meta in sorted(candidates, key=lambda c: (c[0], c[1])):
        data_path = meta_path.with_suffix(".u8")
        try:
            record = json.loads((folder / meta["rows"]).read_text())
            stored, stored_stamps = record["paths"], record["stamps"]
        except (OSError, ValueError, TypeError, KeyError, RecursionError):
            continue
        if len(stored) != n or not data_path.is_file() or _size_problem(data_path, (n, *shape[1:])) is not None:
            continue
        where: dict[str, int] = {}
        for i, p in enumerate(stored):
            where.setdefault(p, i)
        if not wanted <= where.keys():
            continue
        if (stamps is None) != (stored_stamps is None) or (stamps is not None and any(
                stored_stamps[where[p]] != st for p, st in zip(paths, stamps))):
            continue  # an image changed since that entry was built (or was stamped another way)
        rows = np.fromiter((where[p] for p in paths), dtype=np.int64, count=len(paths))
        base = _open(data_path, (n, *shape[1:]), meta, "skip")
        bad_at = {b["row"]: b for b in base.bad}
        bad = [{**bad_at[int(r)], "row": i} for i, r in enumerate(rows) if int(r) in bad_at]
        return CachedImages(pixels=RowMap(base.pixels, rows), ok=base.ok[rows], bad=bad, path=data_path)
    return None


def _remove_dead_partials(folder: Path, key: str) -> None:
    """Partial files of earlier builds of ``key`` whose process (on this host) is gone: killed builds."""
    if not folder.is_dir():
        return
    for p in folder.glob(f"{key}.u8.*.partial"):
        if writer_gone(p.name):
            p.unlink(missing_ok=True)


def _fail_on(bad: list[dict]) -> CachedImages:
    first = bad[0]
    more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
    raise DataError(f"{first['error']}{more}; set dataset.on_bad_image: skip to leave bad images out",
                    where=first["path"], field=first.get("field"))


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


def _open(data_path: Path, shape: tuple[int, ...], meta: dict, on_bad_image: str) -> CachedImages:
    bad = meta.get("bad", [])
    if bad and on_bad_image == "fail":
        _fail_on(bad)
    ok = np.ones(shape[0], dtype=bool)
    for b in bad:
        ok[b["row"]] = False
    pixels = np.memmap(data_path, dtype=np.uint8, mode="r", shape=shape)
    return CachedImages(pixels=pixels, ok=ok, bad=bad, path=data_path)
