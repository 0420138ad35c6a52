"""``medbench run --launcher local|slurm``: a sweep's independent runs as jobs of an existing engine (submitit).

One job per :class:`~medbench.run.request.RunRequest`. The parent checks every
request first (``Runner.preflight``: specs, data loaded and cached, engine
settings), so bad input stops the sweep before anything is queued and the
jobs find the preprocessing cache built. Each job is a fresh Python process
started by submitit (``local``: its ``LocalExecutor``, processes on this
machine; ``slurm``: ``sbatch``) that runs :func:`run_job`: an ordinary
:class:`~medbench.run.runner.Runner` on that one request, writing into the same
run store. Runs are keyed and locked there, so a rerun of the same command
skips what finished (the job returns ``skipped`` at once), resumes what was
interrupted from its checkpoint, and two jobs never train the same run.

Job records (``OUT/jobs/``), one writer per file:

* ``<name>.json``: written by the dispatcher: the request, engine, job id, submission time,
  and at the end the job's outcome (or why the job died);
* ``<name>.worker.json``: written by the job's rank 0: host, pid, start time, state
  (``running``, then the run's outcome ``ok|skipped|failed|busy``) and the run folder.

``medbench status OUT`` (:mod:`medbench.run.status`) reads them with the run store.

With ``gpus_per_node: N`` in the cluster YAML a SLURM job starts N tasks
(``tasks_per_node`` = N): :func:`run_job` turns submitit's job environment
into the launcher variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT), so the run is data-parallel exactly as under torchrun.
"""

from __future__ import annotations

import math
import os
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from medbench.errors import UsageError
from medbench.utils import atomic_write_json, sha256_json, usable_cores

LAUNCHERS = ("inline", "local", "slurm")
JOBS = "jobs"
#: how often the dispatcher looks at its jobs (seconds)
POLL_SECONDS = 1.0


@dataclass(frozen=True)
class JobSpec:
    """Everything a job needs to run one request into the store (pickled by submitit)."""

    request: Any  # RunRequest
    name: str
    out: Path
    tasks_dir: list[Path]
    locations: Any  # DataLocations
    checkpoints: Any  # CheckpointPolicy
    threads: int | None = None
    execution: Any = None  # medbench.train.finetune.Execution (layout, compile: in the run key when on)


def job_name(request) -> str:
    """A stable, readable name for a request's job (its record file name)."""
    from medbench.utils import safe_name

    variant = f"-{request.folder_suffix}" if request.folder_suffix else ""
    digest = sha256_json({k: str(v) for k, v in asdict(request).items() if v is not None})[:8]
    return safe_name(f"{request.task}-{request.backbone}-{request.init or 'default'}-seed{request.seed}{variant}-{digest}")


def jobs_dir(out: Path) -> Path:
    return Path(out) / JOBS


def _write_record(path: Path, record: dict) -> None:
    atomic_write_json(path, record)


def _worker_record(spec: JobSpec, **fields) -> None:
    path = jobs_dir(spec.out) / f"{spec.name}.worker.json"
    _write_record(path, {"name": spec.name, "host": socket.gethostname(), "pid": os.getpid(), **fields})


def _launcher_environment() -> None:
    """Inside a multi-task submitit job: the variables torchrun would set (a single task: nothing)."""
    try:
        import submitit

        env = submitit.JobEnvironment()
    except (ImportError, RuntimeError):
        return
    if env.num_tasks <= 1:
        return
    # SLURM_JOB_ID differs between the elements of an array (submitit's job_id is "<array>_<index>")
    unique = os.environ.get("SLURM_JOB_ID") or "".join(c for c in str(env.job_id) if c.isdigit()) or "0"
    os.environ.update(RANK=str(env.global_rank), WORLD_SIZE=str(env.num_tasks), LOCAL_RANK=str(env.local_rank),
                      LOCAL_WORLD_SIZE=str(max(1, env.num_tasks // max(1, env.num_nodes))),
                      MASTER_ADDR=env.hostnames[0], MASTER_PORT=str(20000 + int(unique) % 20000))


def run_job(spec: JobSpec) -> dict:
    """One job: run one request into the store; returns (and records) its outcome."""
    _launcher_environment()
    from medbench.run.runner import Runner, configure_torch
    from medbench.spec.catalog import Catalog
    from medbench.store import RunStore
    from medbench.train.distributed import cores_per_rank, prepare_environment

    main = prepare_environment().is_main
    configure_torch(spec.threads or cores_per_rank())
    started = time.time()
    if main:
        _worker_record(spec, state="running", started=started)
    runner = Runner(Catalog(spec.tasks_dir), spec.locations, RunStore(spec.out), checkpoints=spec.checkpoints,
                    execution=spec.execution)
    try:
        (outcome,) = runner.run_all([spec.request])
    except BaseException as err:
        if main:
            _worker_record(spec, state="stopped" if isinstance(err, KeyboardInterrupt) else "failed",
                           started=started, seconds=time.time() - started,
                           error=" ".join(str(err).split()) or type(err).__name__)
        raise
    summary = {"state": outcome.status, "run_dir": str(outcome.run_dir.path) if outcome.run_dir else None,
               "error": outcome.error}
    if main:
        _worker_record(spec, started=started, seconds=time.time() - started, **summary)
    return summary


@dataclass
class ClusterConfig:
    """submitit parameters for the engine (``--cluster-config YAML``), e.g. for SLURM::

        slurm_partition: gpu
        gpus_per_node: 8          # one job = one 8-GPU data-parallel run (8 tasks)
        timeout_min: 720
        cpus_per_task: 8
        mem_gb: 200
        slurm_additional_parameters: {account: myproject}
    """

    parameters: dict = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path | None) -> "ClusterConfig":
        if path is None:
            return cls()
        from medbench.errors import SpecError
        from medbench.yamlio import read_yaml

        # the one YAML reader: safe, no duplicate keys, bounded aliases and nesting; one line naming the file
        data = read_yaml(Path(path), where=str(path), error=SpecError, field="--cluster-config") or {}
        if not isinstance(data, dict):
            raise SpecError("expected a mapping of submitit parameters (slurm_partition, gpus_per_node, "
                            "timeout_min, ...)", where=str(path), field="--cluster-config")
        bad = [k for k, v in data.items() if isinstance(v, float) and not math.isfinite(v)]
        if bad:
            raise SpecError(f"{bad[0]}: expected a finite number, got {data[bad[0]]}", where=str(path),
                            field="--cluster-config")
        return cls(dict(data))


def _executor(launcher: str, folder: Path, config: ClusterConfig, max_concurrent: int | None, source: Path | None):
    try:
        import submitit
    except ImportError:
        raise UsageError(f"--launcher {launcher} needs submitit: pip install 'medbench[cluster]'",
                         field="--launcher") from None
    from medbench.errors import SpecError

    params = dict(config.parameters)
    gpus = int(params.get("gpus_per_node", 0) or 0)
    if gpus > 1:
        params.setdefault("tasks_per_node", gpus)  # one process per GPU, as torchrun would start
    if launcher == "local":
        executor = submitit.LocalExecutor(folder=folder)
        local_keys = ("timeout_min", "gpus_per_node", "tasks_per_node", "visible_gpus")
        slurm_keys = {*submitit.SlurmExecutor._valid_parameters(), "cpus_per_task", "mem_gb", "nodes", "name"}
        unknown = [k for k in params if k not in local_keys and k.removeprefix("slurm_") not in slurm_keys]
        if unknown:
            raise SpecError(f"unknown submitit parameter {unknown[0]!r} (local: {', '.join(local_keys)}; SLURM "
                            "ones are ignored here)", where=str(source or "--cluster-config"), field=unknown[0])
        params = {k: v for k, v in params.items() if k in local_keys}  # a SLURM YAML also runs locally
        params.setdefault("timeout_min", 24 * 60)
    else:
        try:
            executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
        except RuntimeError as err:  # no srun/sbatch on this machine
            raise UsageError(f"no SLURM here ({' '.join(str(err).split())}); run on a login node, or use "
                             "--launcher local", field="--launcher") from None
        params = {k if k in ("timeout_min", "gpus_per_node", "tasks_per_node", "nodes", "cpus_per_task", "mem_gb",
                             "name") or k.startswith("slurm_") else f"slurm_{k}": v for k, v in params.items()}
        if max_concurrent:
            params["slurm_array_parallelism"] = max_concurrent
    try:
        executor.update_parameters(**params)
    except (ValueError, TypeError, NameError) as err:
        raise SpecError(f"submitit refused a parameter ({' '.join(str(err).split())[:300]})",
                        where=str(source or "--cluster-config"), field="--cluster-config") from None
    return executor


def _gpu_slots(executor) -> list[tuple[int, ...]] | None:
    """Local jobs asking for GPUs: the machine's GPUs cut into disjoint sets, one per concurrent job
    (None: the jobs use no GPU)."""
    per_job = int(executor.parameters.get("gpus_per_node", 0) or 0)
    if per_job <= 0:
        return None
    import torch

    count = torch.cuda.device_count()
    if count < per_job:
        raise UsageError(f"each job asks for {per_job} GPU(s) (gpus_per_node) but this machine has {count}",
                         field="--cluster-config")
    return [tuple(range(i * per_job, (i + 1) * per_job)) for i in range(count // per_job)]


def local_sharing(max_concurrent: int | None, threads: int | None, slots: list | None, n_jobs: int,
                  cores: int) -> tuple[int, int]:
    """(jobs at once, torch threads per job) for local jobs sharing one machine. Unset, the jobs at once
    are one per GPU set (``slots``), or on CPU one per ``threads`` cores (one per core when ``threads`` is
    unset too); unset threads split the cores among the jobs that run at once."""
    if max_concurrent is None:
        max_concurrent = len(slots) if slots is not None else max(1, cores // (threads or 1))
    if threads is None:
        threads = max(1, cores // max(1, min(max_concurrent, n_jobs)))
    return max_concurrent, threads


def dispatch(requests: list, *, launcher: str, out: Path, tasks_dir: list[Path], locations, checkpoints,
             threads: int | None, max_concurrent: int | None = None, wait: bool = True,
             config: ClusterConfig | None = None, config_path: Path | None = None, message=print,
             preflight=None, locate=None, execution=None) -> list:
    """Submit one job per request; with ``wait``, return a RunOutcome per request once all ended.

    ``preflight()`` (checks of every request) runs once the engine and its parameters are accepted,
    before anything is submitted. ``locate(request, world_size)`` gives a request's run folder: a
    complete one is reused without starting a job (no queueing on a cluster just to skip)."""
    from medbench.provenance import now_utc

    if launcher not in LAUNCHERS[1:]:
        raise UsageError(f"unknown launcher {launcher!r}; expected one of {', '.join(LAUNCHERS)}", field="--launcher")
    if not wait and launcher == "local":
        raise UsageError("--no-wait needs a cluster (--launcher slurm): local jobs are children of this process",
                         field="--no-wait")
    folder = jobs_dir(out)
    folder.mkdir(parents=True, exist_ok=True)
    executor = _executor(launcher, folder / "submitit" / "%j", config or ClusterConfig(), max_concurrent,
                         config_path)
    if preflight is not None:
        preflight()
    slots = _gpu_slots(executor) if launcher == "local" else None
    if launcher == "local":
        max_concurrent, threads = local_sharing(max_concurrent, threads, slots, len(requests), usable_cores())
    specs = [JobSpec(request=r, name=job_name(r), out=Path(out), tasks_dir=list(tasks_dir), locations=locations,
                     checkpoints=checkpoints, threads=threads, execution=execution) for r in requests]
    records: dict[str, dict] = {}

    def record(spec: JobSpec, **fields) -> None:
        records[spec.name] = {**records.get(spec.name, {}), **fields}
        _write_record(folder / f"{spec.name}.json", records[spec.name])

    from medbench.run.runner import RunOutcome

    world = _job_world_size(config or ClusterConfig())
    reused: dict[str, Any] = {}
    for spec in specs:
        run = locate(spec.request, world) if locate is not None else None
        if run is not None and run.complete:  # finished before: its records stay as they are
            reused[spec.name] = RunOutcome(spec.request, run, "skipped", result=run.result())
            record(spec, name=spec.name, launcher=launcher, state="skipped", run_dir=str(run.path),
                   ended=now_utc(), request=_request_record(spec.request))
            continue
        (folder / f"{spec.name}.worker.json").unlink(missing_ok=True)  # a fresh attempt
        record(spec, name=spec.name, launcher=launcher, state="pending", request=_request_record(spec.request))
    if reused:
        message(f"{len(reused)} run(s) already complete in {out}: reused, no job started")
    pending_specs = [s for s in specs if s.name not in reused]

    jobs: dict[str, Any] = {}

    job_slot: dict[str, tuple[int, ...]] = {}

    def submit(batch: list[JobSpec]) -> None:
        if launcher == "local" and slots is not None:  # this job's own GPUs (CUDA_VISIBLE_DEVICES)
            busy = {job_slot[n] for n, j in jobs.items() if n in job_slot and not j.done()}
            job_slot[batch[0].name] = slot = next(s for s in slots if s not in busy)
            executor.update_parameters(visible_gpus=slot)
        if launcher == "slurm":
            with executor.batch():  # one array job; slurm_array_parallelism caps how many run at once
                pending = [(s, executor.submit(run_job, s)) for s in batch]
        else:
            pending = [(s, executor.submit(run_job, s)) for s in batch]
        for s, job in pending:
            jobs[s.name] = job
            record(s, state="submitted", job_id=str(job.job_id), submitted=now_utc())

    limit = len(pending_specs)
    if launcher == "local":
        limit = min(max_concurrent, len(slots) if slots is not None else limit)
    queue = list(pending_specs)
    if launcher == "slurm":
        if queue:
            submit(queue)  # one array; SLURM enforces --max-concurrent
    else:
        for spec in queue[:limit]:
            submit([spec])
    queue = queue[limit:]
    message(f"{len(jobs)} job(s) submitted to {launcher} ({len(queue)} waiting for a slot); "
            f"records in {folder}; 'medbench status {out}' shows progress")
    if not wait:
        return []
    from medbench.run.failures import GracefulStop

    try:
        with GracefulStop():  # SIGTERM too becomes a KeyboardInterrupt (StopRequested) here
            done = _wait(jobs, pending_specs, queue, submit, record)
    except KeyboardInterrupt:  # Ctrl-C / SIGTERM: local jobs are asked to checkpoint and stop
        if launcher == "local":
            for name, job in jobs.items():
                if not job.done():
                    _stop_local_job(folder, name, job)
        raise
    outcomes = {**reused, **{s.name: o for s, o in zip(pending_specs, done)}}
    return [outcomes[s.name] for s in specs]


def _request_record(request) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(request).items()}


def _job_world_size(config: ClusterConfig) -> int:
    """Processes per job (its run's world size, part of the run key): tasks per node x nodes."""
    params = config.parameters
    gpus = int(params.get("gpus_per_node", 0) or 0)
    tasks = int(params.get("tasks_per_node") or params.get("slurm_ntasks_per_node") or (gpus if gpus > 1 else 1))
    return tasks * int(params.get("nodes") or params.get("slurm_nodes") or 1)


def _stop_local_job(folder: Path, name: str, job) -> None:
    """SIGINT to the job's rank 0 (its stop reaches the other ranks at the next step, and it checkpoints);
    submitit's own cancel (SIGINT to the job's controller) kills the tasks after a second."""
    import signal

    worker = {}
    try:
        from medbench.errors import MedbenchError
        from medbench.utils import read_json

        worker = read_json(folder / f"{name}.worker.json")
    except MedbenchError:
        pass
    if not isinstance(worker, dict):
        worker = {}
    if worker.get("state") == "running" and worker.get("host") == socket.gethostname() and worker.get("pid"):
        try:
            os.kill(int(worker["pid"]), signal.SIGINT)
            return
        except ProcessLookupError:
            return
    job.cancel(check=False)  # not started yet


def _wait(jobs: dict, specs: list[JobSpec], queue: list[JobSpec], submit, record) -> list:
    """Poll the jobs until every spec has an outcome, submitting waiting specs as slots free up."""
    from medbench.provenance import now_utc
    from medbench.run.runner import RunOutcome
    from medbench.store import RunDir

    outcomes: dict[str, Any] = {}
    by_name = {s.name: s for s in specs}
    while len(outcomes) < len(specs):
        for name, job in list(jobs.items()):
            if name in outcomes or not job.done():
                continue
            spec = by_name[name]
            try:
                summary = job.results()[0]  # rank 0 of the job (one entry per task)
            except Exception as err:  # killed, crashed, timed out: submitit's error carries the log tail
                reason = " ".join(str(err).split())[-300:] or type(err).__name__
                outcomes[name] = RunOutcome(spec.request, None, "failed",
                                            error=f"job {job.job_id} ended without a result: {reason}")
                record(spec, state="died", error=reason, ended=now_utc())
            else:
                run_dir = RunDir(Path(summary["run_dir"])) if summary.get("run_dir") else None
                outcomes[name] = RunOutcome(spec.request, run_dir, summary["state"],
                                            result=run_dir.result() if run_dir else None, error=summary.get("error"))
                record(spec, state=summary["state"], run_dir=summary.get("run_dir"), error=summary.get("error"),
                       ended=now_utc())
            if queue:
                submit([queue.pop(0)])
        if len(outcomes) < len(specs):
            time.sleep(POLL_SECONDS)
    return [outcomes[s.name] for s in specs]
