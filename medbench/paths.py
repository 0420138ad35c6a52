"""Where medbench keeps caches and looks for weights, and the path rule: plain names, paths that stay
inside their folder, folder walks that cannot loop."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterator


def cache_dir() -> Path:
    """Root of every cache (preprocessed images, synthetic data, weights).

    ``MEDBENCH_CACHE`` if set, else ``$XDG_CACHE_HOME/medbench`` or ``~/.cache/medbench``.
    """
    env = os.environ.get("MEDBENCH_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "medbench"


def weights_dir() -> Path:
    """Local weights folder: ``MEDBENCH_WEIGHTS`` or ``<cache>/weights``.

    A file named ``<backbone-name>.{safetensors,pth,pt,bin,npz}`` there is used
    instead of a hub download.
    """
    env = os.environ.get("MEDBENCH_WEIGHTS")
    return Path(env).expanduser() if env else cache_dir() / "weights"


# --------------------------------------------------------------------------- the path rule
#
# Every name a task spec or a label file can turn into a path goes through these: a name that becomes
# one path component (a dataset name under ``--data-root``) must be a plain name, and a path a spec
# declares stays inside its folder (``medbench.data.base.data_path``, which applies the user's
# ``--allow-outside-data-root``). A task file from a plug-in or a colleague cannot grant itself access.

_DRIVE = re.compile(r"^[A-Za-z]:")


def name_problem(name: object) -> str | None:
    """Why ``name`` cannot be one path component, or None when it is a plain name.

    Refused: an empty name, ``.`` and ``..``, a path separator (``/`` or ``\\``), an absolute or
    drive-letter path, a NUL byte. Nothing else is interpreted (``~`` is a character like any other).
    """
    if not isinstance(name, str) or not name.strip():
        return "expected a non-empty plain name"
    if "\x00" in name:
        return "expected a plain name, got a NUL byte"
    if name in (".", ".."):
        return f"expected a plain name, got {name!r}"
    if "/" in name or "\\" in name or os.path.isabs(name) or _DRIVE.match(name):
        return f"expected a plain name (one folder name, no '/', '\\\\', '..' or absolute path), got {name!r}"
    return None


def is_inside(root: Path | str, path: Path | str) -> bool:
    """Does ``path`` (relative paths taken from the working folder) stay inside ``root`` once ``..`` is
    resolved? Symbolic links are not resolved: a link inside the folder is its owner's choice."""
    r = os.path.normpath(os.path.abspath(root))
    q = os.path.normpath(os.path.abspath(path))
    return q == r or q.startswith(r.rstrip(os.sep) + os.sep)


def walk(root: Path | str) -> Iterator[tuple[str, list[str], list[str]]]:
    """``os.walk(root)`` top-down, following folder links (datasets often link their image folders from
    elsewhere) but entering each real folder once, by (device, inode): a link to ``.`` or to a parent
    cannot make it walk forever. Callers may prune or sort the yielded folder list in place."""
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        try:
            st = os.stat(dirpath)
        except OSError:
            dirnames[:] = []
            continue
        if (st.st_dev, st.st_ino) in seen:
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        yield dirpath, dirnames, filenames
