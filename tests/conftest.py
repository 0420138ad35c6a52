"""Shared fixtures: an isolated cache per test session, the real-data folder, a CLI runner.

The suite runs in parallel (pytest-xdist, ``-n auto --dist loadgroup`` in pyproject.toml). Every test is
in the group of its file, so a file runs on one worker and its module fixtures are built once; the tests
of every file that use the smoke suite's run store (``smoke_run``) form one group, so one worker trains
it while the others run other files. :func:`built_once` builds a session-wide result once for all
workers (a file lock), should tests of two workers ever need it.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable, Iterator

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


#: tests using these session fixtures run on one worker, whatever their file (see the module docstring)
SHARED_FIXTURE_GROUPS = {"smoke_run": "smoke-run-store"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        group = next((g for f, g in SHARED_FIXTURE_GROUPS.items() if f in fixtures), item.nodeid.split("::")[0])
        item.add_marker(pytest.mark.xdist_group(group))


def session_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The temporary folder of the whole test session, shared by every xdist worker."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@contextlib.contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    from filelock import FileLock

    with FileLock(str(path) + ".lock"):
        yield


def built_once(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], None]) -> Path:
    """``<session>/name``, made by ``build(folder)`` once for the whole session: the first worker that asks
    builds it while the others wait on a file lock; a marker written after ``build`` returns says it is
    complete (a failed build is tried again by the next worker that asks, and fails there too)."""
    folder = session_root(tmp_path_factory) / name
    with _exclusive(folder):
        if not (folder / ".built").is_file():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            build(folder)
            (folder / ".built").touch()
    return folder


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The README's main command: the whole smoke suite with its default 2 seeds (trained once per session,
    shared by every test module and every worker)."""

    def build(out: Path) -> None:
        proc = run_cli("run", "--backbone", "cbr-small", "--suite", "smoke", "--out", str(out))
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert f"leaderboard: {out / 'leaderboard.json'}" in proc.stdout

    return built_once(tmp_path_factory, "smoke", build)
