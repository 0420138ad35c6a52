"""Where medbench keeps caches and looks for data, from flags and environment."""

from __future__ import annotations

import os
from pathlib import Path


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
