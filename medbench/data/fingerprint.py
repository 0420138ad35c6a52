"""What identifies the pixels of a dataset's image files: a stamp per file.

Image content enters the preprocessing cache key
(:func:`medbench.data.cache.cache_key`) and the data fingerprint of the run key
(:meth:`medbench.data.base.DatasetIndex.fingerprint`, through
``medbench.run.prepare.PreparedData.fingerprint``), so replacing images (same
paths, same labels) decodes them again and trains new runs instead of reusing
cached pixels and stored results.

Two ways to stamp a file, chosen by the user:

* ``stat`` (default): its size and modification time in nanoseconds
  (``os.stat``): one metadata read per file, no image byte read. A file
  rewritten in place changes its mtime; a copy that preserves mtimes
  (``cp -a``, ``rsync -a``) keeps the stamps, a plain ``cp`` does not (the
  runs are then retrained once).
* ``content`` (``medbench run --verify-pixels`` or
  ``MEDBENCH_VERIFY_PIXELS=1``): the sha256 of its bytes: every file read in
  full at every invocation. It catches what the cheap check cannot (a tool that
  restores mtimes, a file system with coarse timestamps) and stays equal when
  the data is copied or moved. The two modes give different keys: a run store
  keyed on one does not reuse runs of the other, so pick one per store.

In-memory datasets (synthetic, MedMNIST) are hashed by their pixel array instead.
A missing file stamps as ``absent`` (the cache then reports it per
``on_bad_image``).
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

PIXEL_CHECKS = ("stat", "content")
ENV = "MEDBENCH_VERIFY_PIXELS"
_CHUNK = 1 << 20
THREADED_FROM = 20_000


def pixel_check_mode(verify: bool = False) -> str:
    """``content`` when asked (``--verify-pixels`` or ``MEDBENCH_VERIFY_PIXELS=1``), else ``stat``."""
    env = (os.environ.get(ENV) or "").strip().lower() in {"1", "true", "yes", "on"}
    return "content" if verify or env else "stat"


def _stat_stamp(path: str) -> str:
    try:
        st = os.stat(path)
    except OSError:
        return "absent"
    return f"{st.st_size}:{st.st_mtime_ns}"


def _content_stamp(path: str) -> str:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(_CHUNK), b""):
                h.update(block)
    except OSError:
        return "absent"
    return h.hexdigest()


def file_stamps(root: Path | None, paths: list[str | None], mode: str = "stat", *, workers: int = 8,
                threaded_from: int = THREADED_FROM) -> list[str | None]:
    """One stamp per path (None where a row has no path), relative paths under ``root``.

    Large datasets (``threaded_from`` files or more) are stamped by ``workers`` threads: on a network file
    system each ``stat`` waits for a round trip, not for the CPU. Below that one thread is faster on a local
    disk (``benchmarks/test_pixel_stamps_bench.py``, docs/performance.md)."""
    if mode not in PIXEL_CHECKS:
        raise ValueError(f"pixel check {mode!r}; expected one of {PIXEL_CHECKS}")
    stamp = _stat_stamp if mode == "stat" else _content_stamp
    base = os.fspath(root if root is not None else Path("."))
    full = [None if p is None else os.path.join(base, p) for p in paths]
    todo = [p for p in full if p is not None]
    if len(todo) < threaded_from or workers <= 1:
        done = [stamp(p) for p in todo]
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            done = list(pool.map(stamp, todo, chunksize=64))
    it = iter(done)
    return [None if p is None else next(it) for p in full]


def stamps_digest(mode: str, stamps: list[str | None]) -> str:
    """sha256 of the ordered stamps and how they were taken."""
    h = hashlib.sha256(mode.encode())
    for s in stamps:
        h.update(b"\0" + (s or "-").encode())
    return h.hexdigest()
