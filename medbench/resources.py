"""Where the files shipped with medbench live, installed or in a source checkout.

A wheel carries ``tasks/`` and ``leaderboards/published/`` under
``medbench/_builtin/``; a source checkout has them at the repository top level.
"""

from __future__ import annotations

from pathlib import Path

_PKG = Path(__file__).resolve().parent


def _shipped(*parts: str) -> Path:
    installed = _PKG.joinpath("_builtin", *parts)
    if installed.is_dir():
        return installed
    return _PKG.parent.joinpath(*parts)


def builtin_tasks_dir() -> Path:
    return _shipped("tasks")


def published_leaderboards_dir() -> Path:
    return _shipped("leaderboards", "published")


def package_data(name: str) -> Path:
    """A data file inside the package (e.g. the leaderboard JSON Schema)."""
    return _PKG / "schemas" / name
