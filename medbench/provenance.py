"""Where a number came from: versions, code revision, machine, date."""

from __future__ import annotations

import datetime as _dt
import platform
import subprocess
import sys
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import medbench

LIBRARIES = ("torch", "torchvision", "timm", "deepspeed", "polars", "numpy", "scipy", "scikit-learn", "pydantic",
             "pillow", "pydicom")


def library_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for lib in LIBRARIES:
        try:
            out[lib] = version(lib)
        except PackageNotFoundError:
            out[lib] = None
    return out


@lru_cache(maxsize=1)
def git_sha() -> str | None:
    """The medbench source revision when running from a git checkout (with ``-dirty`` if modified)."""
    src = Path(medbench.__file__).resolve().parent.parent
    if not (src / ".git").exists():
        return None
    try:
        sha = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(src), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{sha}-dirty" if dirty else sha


def now_utc() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def code_provenance() -> dict:
    return {
        "medbench_version": medbench.__version__,
        "git_sha": git_sha(),
        "libraries": library_versions(),
        "platform": platform.platform(),
        "argv": sys.argv[1:],
    }
