"""``medbench status OUT``: what is queued, running, done and failed, from the run store and the job records.

Run folders (``OUT/runs/...``): ``result.json`` with ``status: ok`` is done, with
``status: failed`` failed (error line kept); otherwise a held ``.lock`` means a
process is training it (read from ``/proc/locks``, so looking never takes the
lock: on a cluster file system, locks held on other nodes are not visible
there and the job records tell instead), and a checkpoint means it was
interrupted and resumes at that step.

Job records (``OUT/jobs/``, written by :mod:`medbench.run.dispatch`): the
dispatcher's state (``pending``, ``submitted``, the run's outcome, or
``died``) combined with the job's own record (``running`` with host and pid).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from medbench.store import CHECKPOINT, LOCK, RunStore

#: state -> the category ``medbench status`` counts it in
CATEGORY = {
    "pending": "queued", "submitted": "queued",
    "running": "running", "busy": "running",
    "ok": "done", "skipped": "done", "done": "done",
    "failed": "failed", "died": "failed", "interrupted": "failed", "stopped": "failed",
    "unfinished": "running",
}


def _read(path: Path) -> dict | None:
    from medbench.errors import MedbenchError
    from medbench.utils import read_json

    try:
        data = read_json(path)
    except MedbenchError:
        return None
    return data if isinstance(data, dict) else None


def _held_lock_inodes() -> set[int] | None:
    """Inodes with a lock held by any process on this machine (None: not knowable here)."""
    try:
        text = Path("/proc/locks").read_text()
    except OSError:
        return None
    inodes = set()
    for line in text.splitlines():
        parts = line.split()
        dev_inode = next((p for p in parts if p.count(":") == 2), None)
        if dev_inode is not None:
            try:
                inodes.add(int(dev_inode.rsplit(":", 1)[1]))
            except ValueError:
                continue
    return inodes


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def run_states(out: Path) -> list[dict]:
    """One row per run folder: task, backbone, folder, state, step of its checkpoint, error."""
    held = _held_lock_inodes()
    rows = []
    for run in RunStore(out).runs():
        rel = run.path.relative_to(Path(out) / "runs")
        task, backbone = rel.parts[0], rel.parts[1]
        result = run.result() or {}
        ckpt = _read(run.path / CHECKPOINT / "checkpoint.json") or {}
        lock = run.path / LOCK
        locked = None
        if held is not None and lock.exists():
            try:
                locked = lock.stat().st_ino in held
            except OSError:
                locked = None
        if result.get("status") == "ok":
            state = "done"
        elif locked:
            state = "running"
        elif result.get("status") == "failed":
            state = "failed"
        elif locked is None:
            state = "unfinished"  # no result and no way to see the lock from here: running or interrupted
        else:
            state = "interrupted"  # the next run resumes it (from checkpoint_step when there is one)
        rows.append({"task": task, "backbone": backbone, "run": rel.parts[2], "path": str(run.path),
                     "state": state, "category": CATEGORY[state], "checkpoint_step": ckpt.get("step"),
                     "error": result.get("error") if result.get("status") == "failed" else None,
                     "attempt": result.get("attempt")})
    return rows


def job_states(out: Path) -> list[dict]:
    """One row per dispatched job: its name, engine, job id, state and run folder."""
    folder = Path(out) / "jobs"
    rows = []
    host = socket.gethostname()
    for path in sorted(folder.glob("*.json")):
        if path.name.endswith(".worker.json"):
            continue
        job = _read(path)
        if job is None:
            continue
        worker = _read(folder / f"{path.stem}.worker.json") or {}
        state = job.get("state", "pending")
        if state in ("pending", "submitted") and worker.get("state"):
            state = worker["state"]  # the job has started (and maybe finished) while the dispatcher is away
        if state == "running" and worker.get("host") == host and worker.get("pid") and not _pid_alive(worker["pid"]):
            state = "died"
        request = job.get("request") or {}
        rows.append({"name": job.get("name", path.stem), "launcher": job.get("launcher"), "job_id": job.get("job_id"),
                     "task": request.get("task"), "seed": request.get("seed"), "state": state,
                     "category": CATEGORY.get(state, "queued"), "run_dir": job.get("run_dir") or worker.get("run_dir"),
                     "host": worker.get("host"), "pid": worker.get("pid"), "seconds": worker.get("seconds"),
                     "error": job.get("error") or worker.get("error")})
    return rows


def collect(out: Path) -> dict:
    runs, jobs = run_states(out), job_states(out)
    def count(rows):
        out = {c: 0 for c in ("queued", "running", "done", "failed")}
        for row in rows:
            out[row["category"]] += 1
        return out

    return {"out": str(out), "counts": {"jobs": count(jobs), "runs": count(runs)}, "jobs": jobs, "runs": runs}
