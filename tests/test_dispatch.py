"""A sweep dispatched through submitit's local executor: one job SIGKILLed mid-run, the rerun completes it.

``--max-concurrent 1`` runs the two jobs one after the other (2 shared cores); the smoke-tb job is killed
once its first checkpoint is on disk, the smoke-derm job finishes. The same command again resumes smoke-tb
from its checkpoint, reuses smoke-derm untouched, and writes a complete leaderboard.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import PROCESS_GROUP_VARS, REPO, run_cli

pytestmark = pytest.mark.slow
pytest.importorskip("submitit")

ARGS = ["run", "-b", "cbr-tiny", "-t", "smoke-tb", "-t", "smoke-derm", "--seeds", "1", "--max-steps", "3",
        "--threads", "1", "--launcher", "local", "--max-concurrent", "1", "--checkpoint-every", "1"]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in PROCESS_GROUP_VARS}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _worker_pid(out, task: str) -> int | None:
    for path in (out / "jobs").glob(f"{task}-*.worker.json"):
        try:
            record = json.loads(path.read_text())
        except ValueError:
            continue
        if record.get("state") == "running":
            return int(record["pid"])
    return None


def _status(out) -> dict:
    r = run_cli("status", str(out), "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_local_sweep_survives_a_killed_job(tmp_path):
    out = tmp_path / "out"
    parent = subprocess.Popen([sys.executable, "-m", "medbench.cli", *ARGS, "-o", str(out)], env=_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed = False
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and parent.poll() is None:
            ckpt = list((out / "runs" / "smoke-tb").glob("*/*/checkpoint/checkpoint.json"))
            pid = _worker_pid(out, "smoke-tb")
            if ckpt and pid is not None:  # mid-training: the first step's checkpoint is written
                os.kill(pid, signal.SIGKILL)
                killed = True
                break
            time.sleep(0.02)
        stdout, stderr = parent.communicate(timeout=300)
    finally:
        if parent.poll() is None:
            parent.kill()
    assert killed, "the smoke-tb job finished before it could be killed"
    assert parent.returncode == 1, stdout[-2000:] + stderr[-2000:]  # one run failed, the other finished
    assert "ended without a result" in stdout

    status = _status(out)
    jobs = {j["task"]: j for j in status["jobs"]}
    assert jobs["smoke-tb"]["state"] == "died" and jobs["smoke-derm"]["state"] == "ok"
    runs = {r["task"]: r for r in status["runs"]}
    assert runs["smoke-tb"]["state"] == "interrupted" and runs["smoke-tb"]["checkpoint_step"] >= 1
    assert runs["smoke-derm"]["state"] == "done"
    assert status["counts"]["runs"] == {"queued": 0, "running": 0, "done": 1, "failed": 1}
    board = json.loads((out / "leaderboard.json").read_text())
    assert [e["task"] for e in board["entries"]] == ["smoke-derm"]

    derm_result = next((out / "runs" / "smoke-derm").glob("*/*/result.json"))
    before = (derm_result.stat().st_mtime_ns, derm_result.read_text())
    step_killed = runs["smoke-tb"]["checkpoint_step"]

    again = subprocess.run([sys.executable, "-m", "medbench.cli", *ARGS, "-o", str(out)], env=_env(),
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert "1 run(s) were already complete and reused" in again.stdout
    assert "1 run(s) already complete" in again.stdout  # found by the dispatcher: no job started for it
    assert (derm_result.stat().st_mtime_ns, derm_result.read_text()) == before  # reused, not retrained

    status = _status(out)
    jobs = {j["task"]: j for j in status["jobs"]}
    assert jobs["smoke-derm"]["state"] == "skipped" and jobs["smoke-tb"]["state"] == "ok"
    assert len(list((out / "jobs" / "submitit").glob("*/*_result.pkl"))) == 2  # derm once, tb on the rerun
    assert status["counts"]["runs"] == {"queued": 0, "running": 0, "done": 2, "failed": 0}
    tb = json.loads(next((out / "runs" / "smoke-tb").glob("*/*/result.json")).read_text())
    assert tb["status"] == "ok" and tb["training"]["resumed_from_step"] == step_killed
    board = json.loads((out / "leaderboard.json").read_text())
    assert sorted(e["task"] for e in board["entries"]) == ["smoke-derm", "smoke-tb"]
    assert len(list((out / "runs").glob("*/*/*"))) == 2  # one folder per run, the killed one completed in place


def test_slurm_submission_through_sbatch(tmp_path):
    """--launcher slurm --no-wait on a machine with a stand-in sbatch: one job array, the YAML's settings,
    --max-concurrent as the array's %N, a multi-GPU job as one task per GPU; status shows them queued."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "sbatch.log"
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\nfor a; do f="$a"; done\ncat "$f" >> {log}\n'
                                    'echo "Submitted batch job 4242"\n')
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    config = tmp_path / "slurm.yaml"
    config.write_text("partition: gpu\ngpus_per_node: 4\ntimeout_min: 90\ncpus_per_task: 8\n")
    out = tmp_path / "out"
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    r = run_cli("run", "-b", "cbr-tiny", "-t", "smoke-tb", "-t", "smoke-derm", "--seeds", "1", "--max-steps", "3",
                "--launcher", "slurm", "--cluster-config", str(config), "--max-concurrent", "1", "--no-wait",
                "-o", str(out), env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    script = log.read_text()
    assert script.count("#SBATCH --array=0-1%1") == 1  # one array of two jobs, one at a time
    for line in ("#SBATCH --partition=gpu", "#SBATCH --gpus-per-node=4", "#SBATCH --ntasks-per-node=4",
                 "#SBATCH --time=90", "#SBATCH --cpus-per-task=8"):
        assert line in script, line
    assert not (out / "leaderboard.json").exists()  # --no-wait: nothing to aggregate yet
    status = _status(out)
    assert sorted(j["job_id"] for j in status["jobs"]) == ["4242_0", "4242_1"]
    assert {j["state"] for j in status["jobs"]} == {"submitted"}
    assert status["counts"]["jobs"]["queued"] == 2


def test_status_reads_runs_and_job_records(tmp_path):
    """Run folders: done / failed / running (a held lock, seen without taking it) / interrupted at a
    checkpoint step; job records: the worker's state wins over 'submitted', a dead local pid is 'died'."""
    import fcntl

    from medbench.run.status import collect

    out = tmp_path / "out"
    runs = out / "runs" / "smoke-tb" / "cbr-tiny"
    for name, files in {"done": {"result.json": {"status": "ok"}},
                        "failed": {"result.json": {"status": "failed", "error": "boom", "attempt": 2}},
                        "running": {}, "interrupted": {"checkpoint/checkpoint.json": {"step": 7}}}.items():
        (runs / name / "checkpoint").mkdir(parents=True)
        (runs / name / ".lock").touch()
        for rel, content in files.items():
            (runs / name / rel).write_text(json.dumps(content))
    jobs = out / "jobs"
    jobs.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    records = {"queued": ({"state": "submitted"}, None),
               "started": ({"state": "submitted"}, {"state": "running", "pid": os.getpid()}),
               "killed": ({"state": "submitted"}, {"state": "running", "pid": dead.pid}),
               "finished": ({"state": "ok", "run_dir": str(runs / "done")}, {"state": "ok"})}
    import socket

    for name, (job, worker) in records.items():
        (jobs / f"{name}.json").write_text(json.dumps({"name": name, "launcher": "local", "job_id": "1", **job,
                                                       "request": {"task": "smoke-tb", "seed": 0}}))
        if worker:
            (jobs / f"{name}.worker.json").write_text(json.dumps({"host": socket.gethostname(), **worker}))
    with open(runs / "running" / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        report = collect(out)
    states = {r["run"]: (r["state"], r["checkpoint_step"], r["error"]) for r in report["runs"]}
    assert states == {"done": ("done", None, None), "failed": ("failed", None, "boom"),
                      "running": ("running", None, None), "interrupted": ("interrupted", 7, None)}
    assert {j["name"]: j["state"] for j in report["jobs"]} == {
        "queued": "submitted", "started": "running", "killed": "died", "finished": "ok"}
    assert report["counts"] == {"jobs": {"queued": 1, "running": 1, "done": 1, "failed": 1},
                                "runs": {"queued": 0, "running": 1, "done": 1, "failed": 2}}


def test_local_jobs_share_the_machine_by_default():
    from medbench.run.dispatch import local_sharing

    # CPU: one job per core at one thread each, not every job at once
    assert local_sharing(None, None, None, n_jobs=12, cores=2) == (2, 1)
    assert local_sharing(None, 4, None, n_jobs=12, cores=16) == (4, 4)
    # fewer jobs than slots: the cores are split among the jobs that exist
    assert local_sharing(None, None, None, n_jobs=1, cores=8) == (8, 8)
    # GPUs: one job per GPU set; the user's choices stand
    assert local_sharing(None, None, [(0,), (1,), (2,), (3,)], n_jobs=12, cores=32) == (4, 8)
    assert local_sharing(3, 2, None, n_jobs=12, cores=2) == (3, 2)
