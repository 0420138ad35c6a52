"""Shared fixtures: an isolated cache per test session, the real-data folder, a CLI runner.

The suite runs in parallel (pytest-xdist, ``-n auto --dist loadfile`` in pyproject.toml): a file runs on one
worker, so its module fixtures are built once; the longest files are handed out first (``LONG_FILES``).
:func:`built_once` builds a session-wide result once for all workers (a file lock): the smoke suite's run
store (``smoke_run``) is trained once and read by the tests of every file. :func:`run_cli` runs each command in
a process of its own forked from a per-worker server that imported the heavy libraries once
(tests/cli_server.py; ``fresh=True`` for a new interpreter).
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


def _share_the_cores() -> None:
    """Under pytest-xdist, each worker's threads are its share of the cores: torch's and BLAS's in this process
    (``OMP_NUM_THREADS``, read when torch and NumPy load, hence at import of this file), and every ``medbench``
    command it starts (``MEDBENCH_THREADS``, the default of ``--threads``), launched ranks included. Two workers
    each starting a thread per core on 2 cores made every training test several times slower (OpenMP threads
    spin-wait on a core the other worker holds: the real-data transfusion test took 368 s in the suite and 40-53 s
    alone; two copies of its command at once took 308 s with 2 threads each, 95 s with one). A variable the user
    set stands."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers < 2:
        return
    from medbench.utils import usable_cores  # light: no torch, no NumPy

    share = str(max(1, usable_cores() // workers))
    os.environ.setdefault("OMP_NUM_THREADS", share)
    os.environ.setdefault("MEDBENCH_THREADS", share)


_share_the_cores()


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


_SERVER: dict[str, object] = {}


def _cli_server(env: dict[str, str]):
    """This worker's :class:`cli_server.CliServer`, started on first use; None when it cannot start (then every
    command gets a fresh interpreter, slower but the same) or when MEDBENCH_TEST_FRESH_CLI=1."""
    if os.environ.get("MEDBENCH_TEST_FRESH_CLI") == "1" or not hasattr(os, "fork"):
        return None
    if "server" not in _SERVER:
        from cli_server import CliServer

        try:
            _SERVER["server"] = CliServer(env, Path.cwd())
        except Exception as err:  # pragma: no cover - e.g. a preloaded module started a thread
            import warnings

            warnings.warn(f"CLI server not started, every command starts Python: {err}", stacklevel=2)
            _SERVER["server"] = None
    return _SERVER["server"]


def pytest_unconfigure(config: pytest.Config) -> None:
    server = _SERVER.pop("server", None)
    if server is not None:
        server.close()


def run_cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None,
            timeout: float = 900, fresh: bool = False) -> subprocess.CompletedProcess:
    """``medbench ARGS`` in a process of its own, as a user runs it: forked from this worker's CLI server
    (tests/cli_server.py: torch and the rest imported once), or ``python -m medbench.cli`` in a fresh
    interpreter when ``fresh`` is set or ``env`` changes a variable read at import time."""
    # in-process DeepSpeed tests set the process-group variables here (and hold MASTER_PORT);
    # a CLI subprocess must choose its own port, as a user's process does
    inherited = {k: v for k, v in os.environ.items() if k not in PROCESS_GROUP_VARS}
    full_env = {**inherited, **(env or {})}
    server = None if fresh else _cli_server(inherited)
    if server is not None and server.forkable(full_env):
        return server.run(list(args), full_env, cwd, timeout)
    return subprocess.run([sys.executable, "-m", "medbench.cli", *args], capture_output=True, text=True,
                          env=full_env, cwd=cwd, timeout=timeout)


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """torch on one thread for the test (tiny steps: threads only add overhead on a shared 2-core machine);
    the previous count restored. Files use it with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def cli():
    return run_cli


#: the files that take longest on one worker (a file with a long fixture is one serial chain), handed out first
#: so that the short files fill the other worker meanwhile and both end together; the rest keep file order
#: (``--no-loadscope-reorder`` in pyproject.toml: xdist would otherwise sort files by their number of tests).
#: Longest first, as measured with ``python -m pytest -n 2 --durations=0``. test_cli.py trains the session's
#: smoke store (``smoke_run``): first, so that the other file reading it (test_leaderboard_board.py, later)
#: finds it built instead of waiting on its lock. A new long file belongs here.
LONG_FILES = ("tests/test_cli.py", "tests/test_walkthrough.py", "tests/test_transfusion.py", "tests/test_data_cxr.py",
              "tests/test_dispatch.py", "tests/test_axes_cli.py", "tests/test_kill_resume.py",
              "tests/test_data_parallel.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Each file's tests together (``--dist loadfile`` hands a file to one worker where it first appears), the
    long files first. (Not xdist_group markers: xdist 3.8 renames the node ids for ``--dist loadgroup``, which
    pytest 9 ignores, so every test was scheduled on its own and module fixtures were built on both workers.)"""
    rank = {f: i for i, f in enumerate(LONG_FILES)}
    first_seen: dict[str, int] = {}
    for item in items:
        first_seen.setdefault(item.nodeid.split("::")[0], len(first_seen))

    def key(item: pytest.Item) -> tuple[int, int]:
        path = item.nodeid.split("::")[0]
        return rank.get(path, len(rank)), first_seen[path]

    items.sort(key=key)


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
