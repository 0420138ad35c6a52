"""SIGKILL a suite at random points, rerun the same command: nothing lost, nothing trained twice,
the final leaderboard equal to an uninterrupted run's."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, run_cli
from tiny_tasks import RUNS, STEPS_PER_RUN, write_tiny_tasks


def suite_args(tasks_dir: Path, out: Path) -> list[str]:
    # one thread: with 2 cores shared, oversubscribed threads make tiny steps 10x slower
    return ["run", "--backbone", "cbr-tiny", "--suite", "tiny", "--tasks-dir", str(tasks_dir), "--threads", "1",
            "--checkpoint-every", "1", "--out", str(out)]


def run_dirs(out: Path) -> list[Path]:
    return sorted(p for p in (out / "runs").glob("*/*/*") if p.is_dir())


def complete_results(out: Path) -> dict[str, str]:
    """run folder -> sha256 of its result.json, for every complete run."""
    found = {}
    for run in run_dirs(out):
        result = run / "result.json"
        if result.is_file():
            data = result.read_bytes()
            if json.loads(data).get("status") == "ok":
                found[str(run)] = hashlib.sha256(data).hexdigest()
    return found


def progress(out: Path) -> int:
    """Optimiser steps done over the whole suite, as the run store shows them."""
    total = 0
    for run in run_dirs(out):
        if str(run) in complete_results(out):
            total += STEPS_PER_RUN
            continue
        index = run / "checkpoint" / "checkpoint.json"
        try:
            total += json.loads(index.read_text())["step"]
        except (OSError, ValueError, KeyError):
            pass
    return total


def board_numbers(path: Path) -> list[tuple]:
    board = json.loads(path.read_text())
    return [(e["task"], e["backbone"], e["init"], e["seeds"], e["headline"], e["metrics"], e["ood"])
            for e in board["entries"]]


def suite_env() -> dict[str, str]:
    """This process's environment without the process-group variables in-process tests may have set
    (a child inheriting MASTER_PORT would try to listen on a port this process holds)."""
    launcher = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"}
    return {**{k: v for k, v in os.environ.items() if k not in launcher}, "PYTHONPATH": str(REPO)}


def start_suite(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "medbench.cli", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=suite_env(), cwd=REPO, start_new_session=True)


def run_suite(args: list[str]) -> subprocess.CompletedProcess:
    """The suite to its end: a command of its own (conftest.run_cli), as the killed ones are."""
    return run_cli(*args, cwd=REPO, timeout=600)


def kill_when(proc: subprocess.Popen, condition, timeout: float = 240) -> bool:
    """SIGKILL the suite's process group as soon as ``condition()`` holds; False if it ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        if condition():
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    raise AssertionError("the suite made no progress")


@pytest.mark.slow
def test_sigkill_at_random_points_then_rerun(tmp_path: Path) -> None:
    tasks = write_tiny_tasks(tmp_path / "tasks")
    reference = tmp_path / "uninterrupted"
    proc = run_suite(suite_args(tasks, reference))
    assert proc.returncode == 0, proc.stderr[-3000:]

    out = tmp_path / "killed"
    rng = random.Random(20240611)
    # kill points: after a random number of optimiser steps over the suite (increasing), one just after a
    # run's result.json appears (before its checkpoint is removed), one at a random instant of start-up
    step_points = sorted(rng.sample(range(1, RUNS * STEPS_PER_RUN), 3))
    points = [("steps", step_points[0]), ("startup", rng.uniform(0.5, 3.0)), ("steps", step_points[1]),
              ("result", None), ("steps", step_points[2])]
    seen: dict[str, str] = {}
    kills = 0
    for kind, value in points:
        before = complete_results(out)
        started = time.monotonic()
        proc = start_suite(suite_args(tasks, out))
        if kind == "steps":
            killed = kill_when(proc, lambda: progress(out) >= value)
        elif kind == "startup":
            killed = kill_when(proc, lambda: time.monotonic() - started >= value)
        else:
            killed = kill_when(proc, lambda: len(complete_results(out)) > len(before))
        kills += killed
        now = complete_results(out)
        # a completed run is never rewritten (so never trained again)
        assert {k: now[k] for k in seen} == seen
        seen.update(now)
    assert kills >= 4
    assert 0 < len(seen) < RUNS  # the kills left some runs complete and some not

    final = run_suite(suite_args(tasks, out))
    assert final.returncode == 0, final.stderr[-3000:]
    assert f"{len(seen)} run(s) were already complete and reused" in final.stdout
    now = complete_results(out)
    assert len(now) == RUNS and {k: now[k] for k in seen} == seen
    assert board_numbers(out / "leaderboard.json") == board_numbers(reference / "leaderboard.json")
    results = [json.loads((Path(r) / "result.json").read_text()) for r in now]
    assert any(r["training"]["resumed_from_step"] > 0 for r in results)  # a kill mid-run resumed, not restarted
    assert not any((Path(r) / "checkpoint").exists() for r in now)  # checkpoints go once a run is complete
