"""Shared fixtures: an isolated cache per test session, the real-data folder, a CLI runner."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("MEDBENCH_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Caches go to a session folder (synthetic data is regenerated once per session);
    compiled DeepSpeed ops keep using the user's cache so they are built once per machine."""
    cache = tmp_path_factory.mktemp("medbench-cache")
    os.environ["MEDBENCH_CACHE"] = str(cache)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("MEDBENCH_OFFLINE", "1")
    os.environ.pop("MEDBENCH_DATA", None)


def shared_data(*parts: str) -> Path:
    """A path under ../shared/data; skips the test when that folder is absent (users' clones)."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real sample data not available: {path} (../shared/data sits beside the repository in CI)")
    return path


PROCESS_GROUP_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")

#: a progress line of ``medbench run`` in a log (medbench.cli.console.LogReporter): date and time first
PROGRESS_LINE = re.compile(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2} ")


def without_progress(err: str) -> str:
    """stderr without the run's progress lines (what the tests of one-line errors look at)."""
    return "".join(ln for ln in err.splitlines(keepends=True) if not PROGRESS_LINE.match(ln))


def run_cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None,
            timeout: float = 900) -> subprocess.CompletedProcess:
    """``medbench ARGS`` in a subprocess, as a user runs it."""
    # in-process DeepSpeed tests set the process-group variables here (and hold MASTER_PORT);
    # a CLI subprocess must choose its own port, as a user's process does
    inherited = {k: v for k, v in os.environ.items() if k not in PROCESS_GROUP_VARS}
    full_env = {**inherited, **(env or {})}
    return subprocess.run([sys.executable, "-m", "medbench.cli", *args], capture_output=True, text=True,
                          env=full_env, cwd=cwd, timeout=timeout)


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The README's main command: the whole smoke suite with its default 2 seeds (trained once per session,
    shared by every test module)."""
    out = tmp_path_factory.mktemp("smoke")
    proc = run_cli("run", "--backbone", "cbr-small", "--suite", "smoke", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"leaderboard: {out / 'leaderboard.json'}" in proc.stdout
    return out
