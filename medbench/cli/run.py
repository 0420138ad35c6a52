"""``medbench run``: tasks x seeds of one backbone, inline or dispatched; ``--dry-run`` prints the plan."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from medbench.cli.app import (
    ALLOW_OUTSIDE_OPT,
    TASKS_DIR_OPT,
    VERIFY_PIXELS_OPT,
    EngineChoice,
    LauncherChoice,
    PrecisionChoice,
    app,
    finite,
)
from medbench.limits import MAX_BATCH, MAX_JOBS, MAX_SEEDS, MAX_STEPS, MAX_THREADS
from medbench.cli.console import (
    console,
    fail,
    interrupted,
    print_board,
    print_plan,
    progress_reporter,
    safe,
)


@app.command()
def run(
    backbone: str = typer.Option(..., "--backbone", "-b", help="Registered backbone name (see 'medbench list backbones')."),
    suite: Optional[List[str]] = typer.Option(None, "--suite", "-s", help="Suite to run (repeatable)."),
    task: Optional[List[str]] = typer.Option(None, "--task", "-t", help="Task to run (repeatable)."),
    seeds: Optional[int] = typer.Option(None, "--seeds", min=1, max=MAX_SEEDS, help="Seeds 0..N-1 per task (default: the task's)."),
    data_root: Optional[Path] = typer.Option(None, "--data-root", help="Folder with one sub-folder per dataset."),
    data: Optional[List[str]] = typer.Option(None, "--data", help="NAME=PATH for one dataset (repeatable)."),
    out: Path = typer.Option(Path("medbench-results"), "--out", "-o", help="Output folder (run store + leaderboard)."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", min=1, max=MAX_STEPS, help="Cap the schedule at N steps."),
    init: Optional[str] = typer.Option(None, "--init", help="pretrained | random | mean-var | transfusion:K | gabor (default: pretrained if the backbone has weights)."),
    weights: Optional[Path] = typer.Option(None, "--weights", help="Pre-trained weights file for the backbone."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan and its cost; train nothing."),
    tasks_dir: Optional[List[Path]] = TASKS_DIR_OPT,
    engine: EngineChoice = typer.Option(EngineChoice.deepspeed, "--engine", help="deepspeed, or plain torch (explicit only)."),
    zero_stage: int = typer.Option(0, "--zero-stage", min=0, max=2, help="DeepSpeed ZeRO stage."),
    precision: Optional[PrecisionChoice] = typer.Option(None, "--precision", help="fp32 | bf16 | fp16 (CUDA). Default: bf16 autocast (fp32 BatchNorm) on GPUs that support it, else fp32; always fp32 on CPU."),
    micro_batch: Optional[str] = typer.Option(None, "--micro-batch", help="Per-device micro-batch N (gradient accumulation keeps the batch) or 'auto': the largest that fits the device, confirmed by a trial step, halved on an out-of-memory error. Default: auto on GPUs, the whole batch on CPU."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, max=MAX_THREADS, envvar="MEDBENCH_THREADS", show_envvar=True, help="CPU threads for torch (default: this process's share of the cores: launched ranks of a node split them; set MEDBENCH_THREADS when several processes share a machine)."),
    compile_model: bool = typer.Option(False, "--compile", help="torch.compile the network (docs/performance.md)."),
    channels_last: Optional[bool] = typer.Option(None, "--channels-last/--no-channels-last", help="Channels-last memory layout (default: on GPUs)."),
    assume_memory: float = typer.Option(80.0, "--assume-memory", min=0.001, max=1e9, callback=finite, help="GB free per device for --dry-run's --micro-batch auto (default 80)."),
    fail_fast: bool = typer.Option(False, "--fail-fast", help="Stop at the first failed run."),
    assume_tflops: float = typer.Option(100.0, "--assume-tflops", min=0.001, max=1e9, callback=finite, help="Sustained TFLOP/s for --dry-run time estimates."),
    checkpoint_every: Optional[List[str]] = typer.Option(
        None, "--checkpoint-every", help="Checkpoint every N steps (500) and/or every duration (90s, 10m, 2h; "
        "repeatable), or 'off'. Default: 10m. An interrupted run resumes from its last checkpoint."),
    allow_outside_data_root: bool = ALLOW_OUTSIDE_OPT,
    verify_pixels: bool = VERIFY_PIXELS_OPT,
    fractions: Optional[str] = typer.Option(None, "--fractions", help="Data efficiency: also fine-tune on these percentages of the training images, e.g. 1,5,10,25,50 ('default': 1,5,10,25,50,100)."),
    shots: Optional[str] = typer.Option(None, "--shots", help="Data efficiency: also fine-tune on k images per class, e.g. 1,5,10 ('default': 1,5,10,100,500)."),
    resolutions: Optional[str] = typer.Option(None, "--resolutions", help="Resolution sweep: also fine-tune at these crop sizes (px), e.g. 64,128."),
    freeze: Optional[str] = typer.Option(None, "--freeze", help="Frozen features: 'head' (train the head only) or L (freeze the first L blocks)."),
    similarity: Optional[str] = typer.Option(None, "--similarity", help="Per-layer similarity initial vs fine-tuned: cka | svcca | cka,svcca."),
    protocol: Optional[List[str]] = typer.Option(None, "--protocol", help="finetune | linear | knn, comma-separated or repeated (default: the suite's or task's protocols, else finetune). linear/knn: a probe on frozen features, cached in OUT/features (docs/probes.md)."),
    pooling: Optional[str] = typer.Option(None, "--pooling", help="Probes: cls | mean | cls+mean (default: the model's own pooling)."),
    launcher: LauncherChoice = typer.Option(LauncherChoice.inline, "--launcher", help="inline: the runs one after another in this process; local: one submitit job (process) per run on this machine; slurm: one SLURM job per run (docs/scaling.md)."),
    max_concurrent: Optional[int] = typer.Option(None, "--max-concurrent", min=1, max=MAX_JOBS, help="With --launcher local|slurm: at most N jobs at once (local default: one per GPU set, or one per core / --threads cores)."),
    no_wait: bool = typer.Option(False, "--no-wait", help="With --launcher slurm: submit and return (then 'medbench status OUT', rerun to write the leaderboard)."),
    cluster_config: Optional[Path] = typer.Option(None, "--cluster-config", help="YAML of submitit parameters (slurm_partition, gpus_per_node, timeout_min, cpus_per_task, mem_gb, ...)."),
) -> None:
    """Fine-tune (or probe, --protocol) BACKBONE on every task of the suites/tasks and write the leaderboard."""
    try:
        variants = _variants(fractions, shots, resolutions)
        _run(backbone=backbone, suites=suite or [], tasks=task or [], seeds=seeds, data_root=data_root,
             data=data or [], out=out, max_steps=max_steps, init=init, weights=weights, dry_run=dry_run,
             tasks_dir=tasks_dir or [], engine=engine.value, zero_stage=zero_stage, precision=precision.value if precision else None,
             micro_batch=_micro_batch(micro_batch), threads=threads, fail_fast=fail_fast, assume_tflops=assume_tflops,
             compile_model=compile_model, channels_last=channels_last, assume_memory=assume_memory,
             checkpoint_every=checkpoint_every or [], allow_outside_data_root=allow_outside_data_root,
             verify_pixels=verify_pixels, variants=variants, freeze=freeze, similarity=similarity, protocols=protocol,
             pooling=pooling,
             dispatch={"launcher": launcher.value, "max_concurrent": max_concurrent, "wait": not no_wait,
                       "cluster_config": cluster_config, "threads": threads, "tasks_dir": tasks_dir or []})
    except typer.Exit:
        raise
    except KeyboardInterrupt as err:
        interrupted(err)
    except Exception as err:
        fail(err)


def _micro_batch(text: str | None) -> int | str | None:
    """``--micro-batch``: None (the device's default), ``auto``, or a positive number."""
    from medbench.errors import UsageError

    if text is None or text.strip().lower() == "auto":
        return None if text is None else "auto"
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= MAX_BATCH:
        raise UsageError(f"expected a number from 1 to {MAX_BATCH} or 'auto', got {text!r}", field="--micro-batch")
    return value


def _runs_on_gpus(dispatch: dict | None) -> bool:
    """Whether the runs will train on GPUs: the SLURM cluster config asks for GPUs, else this machine has one."""
    if dispatch and dispatch["launcher"] == "slurm":
        from medbench.run.dispatch import ClusterConfig

        return int(ClusterConfig.load(dispatch.get("cluster_config")).parameters.get("gpus_per_node", 0) or 0) > 0
    import torch

    return torch.cuda.is_available()


def device_defaults(precision: str | None, micro_batch: int | str | None, channels_last: bool | None,
                    gpus: bool, launcher: str = "inline", zero_stage: int = 0) -> tuple[str, int | str | None, bool]:
    """(precision, micro-batch, channels-last) with the documented defaults filled in: on GPUs bf16 autocast
    where supported (a SLURM job's GPUs are assumed to support it; --precision fp32 for older ones),
    ``--micro-batch auto`` and channels-last (with ZeRO stage 0); on CPU fp32, the whole batch per step, NCHW."""
    if precision is None:
        if not gpus:
            precision = "fp32"
        elif launcher == "slurm":
            precision = "bf16"
        else:
            from medbench.train.finetune import default_precision

            precision = default_precision("cuda:0")
    if micro_batch is None and gpus:
        micro_batch = "auto"
    return precision, micro_batch, (gpus and zero_stage == 0) if channels_last is None else channels_last


DEFAULT_FRACTIONS = "1,5,10,25,50,100"
DEFAULT_SHOTS = "1,5,10,100,500"


def _number_list(text: str | None, option: str, default: str | None, cast) -> list:
    from medbench.errors import UsageError

    if text is None:
        return []
    if text.strip() == "default" and default is not None:
        text = default
    try:
        values = [cast(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise UsageError(f"expected comma-separated numbers, got {text!r}", field=option) from None
    if not values:
        raise UsageError("expected at least one number", field=option)
    return list(dict.fromkeys(values))


def _variants(fractions: str | None, shots: str | None, resolutions: str | None) -> list[dict]:
    """Variant runs asked for on the command line (the 100 % fraction is the plain run itself)."""
    from pydantic import ValidationError

    from medbench.errors import UsageError
    from medbench.spec import VariantRuns

    values = {"fractions": _number_list(fractions, "--fractions", DEFAULT_FRACTIONS, float),
              "shots": _number_list(shots, "--shots", DEFAULT_SHOTS, int),
              "resolutions": _number_list(resolutions, "--resolutions", None, int)}
    try:
        return VariantRuns(**values).runs()
    except ValidationError as err:
        first = err.errors()[0]
        raise UsageError(first["msg"].removeprefix("Value error, "), field=f"--{first['loc'][0]}") from None


def _task_variants(catalog, names: list[str], suites: list[str], variants: list[dict]) -> dict[str, list[dict]]:
    """Per task, its variant runs: the command line's for every task, then those its suites declare; no
    repeats, and no resolution point at the task's own crop (that is the plain run)."""
    declared: dict[str, list[dict]] = {}
    for suite in suites:
        for task, vs in catalog.suite_variants(suite).items():
            declared.setdefault(task, []).extend(vs)
    out = {}
    for name in names:
        crop = catalog.task(name).spec.input.crop
        unique = [dict(v) for v in dict.fromkeys(tuple(sorted(v.items())) for v in [*variants, *declared.get(name, [])])]
        out[name] = [v for v in unique if v.get("resolution") is None or v["resolution"] != crop]
    return out


def _task_protocols(catalog, names: list[str], suites: list[str], protocols: list[str] | None) -> dict[str, list[str]]:
    """Per task, its protocols: ``--protocol``, else those of the suites naming it, else the task's own
    ``protocols:``, else fine-tuning."""
    from medbench.probe.protocols import FINETUNE, parse_protocols

    chosen = parse_protocols(protocols) if protocols else []
    declared: dict[str, list[str]] = {}
    for suite in suites:
        for task, ps in catalog.suite_protocols(suite).items():
            declared[task] = list(dict.fromkeys([*declared.get(task, []), *ps]))
    return {name: chosen or declared.get(name) or list(catalog.task(name).spec.protocols or [FINETUNE])
            for name in names}


def _check_protocol_options(per_task: dict[str, list[str]], *, freeze, similarity, pooling, max_steps) -> None:
    """Options of one protocol given while no task runs it: one line naming the option."""
    from medbench.errors import UsageError
    from medbench.probe.protocols import FINETUNE, PROBES

    used = {p for ps in per_task.values() for p in ps}
    for option, value in (("--freeze", freeze), ("--similarity", similarity), ("--max-steps", max_steps)):
        if value is not None and FINETUNE not in used:
            raise UsageError(f"applies to --protocol finetune, and the runs are {', '.join(sorted(used))} only",
                             field=option)
    if pooling is not None and not used & set(PROBES):
        raise UsageError("applies to the probes (--protocol linear|knn); fine-tuning trains the model's own head",
                         field="--pooling")


def _selected_tasks(catalog, suites: list[str], tasks: list[str]) -> list[str]:
    from medbench.errors import UsageError

    if not suites and not tasks:
        raise UsageError("name at least one --suite or --task (see 'medbench list suites')", field="--suite")
    names: list[str] = []
    for s in suites:
        names.extend(catalog.suite_tasks(s))
    for t in tasks:
        catalog.task(t)
        names.append(t)
    return list(dict.fromkeys(names))


def _run(*, backbone, suites, tasks, seeds, data_root, data, out, max_steps, init, weights, dry_run, tasks_dir,
         engine, zero_stage, precision, micro_batch, threads, fail_fast, assume_tflops, checkpoint_every,
         allow_outside_data_root, verify_pixels=False, variants=(), freeze=None, similarity=None, protocols=None,
         pooling=None, dispatch=None, compile_model=False, channels_last=None, assume_memory=80.0) -> None:
    from medbench.backbones.init import parse_init, preflight
    from medbench.backbones.registry import get_backbone
    from medbench.data.locate import DataLocations
    from medbench.errors import UsageError
    from medbench.spec.catalog import Catalog

    for flag, key in (("--max-concurrent", "max_concurrent"), ("--cluster-config", "cluster_config")):
        if dispatch and dispatch["launcher"] == "inline" and dispatch.get(key):
            raise UsageError("only with --launcher local or slurm (the default, inline, runs one run at a time)",
                             field=flag)

    catalog = Catalog(tasks_dir)
    names = _selected_tasks(catalog, suites, tasks)
    per_task = _task_variants(catalog, names, suites, list(variants))
    task_protocols = _task_protocols(catalog, names, suites, protocols)
    _check_protocol_options(task_protocols, freeze=freeze, similarity=similarity, pooling=pooling,
                            max_steps=max_steps)
    from medbench.backbones.pooling import parse_pooling

    pooling = parse_pooling(pooling)
    bb = get_backbone(backbone)
    locations = DataLocations.from_cli(data_root, data, allow_outside_root=allow_outside_data_root,
                                       verify_pixels=verify_pixels)
    from medbench.train.checkpoint import CheckpointPolicy

    checkpoints = CheckpointPolicy.parse(checkpoint_every)
    launcher = dispatch["launcher"] if dispatch else "inline"
    gpus = _runs_on_gpus(dispatch)
    precision, micro_batch, channels_last = device_defaults(precision, micro_batch, channels_last, gpus, launcher,
                                                            zero_stage)
    if dry_run:
        if init is not None:
            parse_init(init)
        from medbench.run.plan import plan_runs

        plans = plan_runs(catalog, names, bb, seeds, locations, max_steps=max_steps, assume_tflops=assume_tflops,
                          engine={"zero_stage": zero_stage, "precision": precision, "micro_batch": micro_batch,
                                  "assume_memory_gb": _free_gpu_gb() if gpus and launcher != "slurm" else assume_memory})
        print_plan(plans, backbone, assume_tflops)
        extra = {t: len(v) for t, v in per_task.items() if v}
        if extra:
            console().print("plus variant runs (--fractions/--shots/--resolutions, and the suite's own) per seed, "
                             "each on its own schedule: " + ", ".join(f"{t} {k}" for t, k in extra.items()))
        probes = {t: [p for p in ps if p != "finetune"] for t, ps in task_protocols.items()}
        if any(probes.values()):
            console().print("plus probe runs on frozen features (" + ", ".join(f"{t}: {'/'.join(p)}" for t, p in
                                                                      probes.items() if p) + "): one forward pass "
                            "over the train, val, test and OOD images per backbone, init and resolution, cached in "
                            f"{out / 'features'} and shared by every probe; the fits cost seconds"
                            + ("" if all("finetune" in ps for ps in task_protocols.values()) else
                               "; the table above is the fine-tuning cost, for comparison"), soft_wrap=True)
        return

    from medbench.run.request import expand_requests
    from medbench.run.runner import Runner, configure_torch
    from medbench.store import RunStore
    from medbench.train.finetune import EngineConfig

    # a missing weights file fails here, before any run; the runs get the resolved file's path, and its origin
    # (local weights folder, hub cache, hub download) stays with it (medbench.backbones.weights.file_origin)
    init, weights = preflight(bb, init, weights,
                              in_chans=tuple(sorted({catalog.task(n).spec.input.channels for n in names})))
    from medbench.analysis.similarity import parse_methods
    from medbench.train.freeze import parse_freeze

    freeze, similarity = parse_freeze(freeze, bb), ",".join(parse_methods(similarity)) or None
    from medbench.train.distributed import cores_per_rank
    from medbench.train.finetune import Execution

    configure_torch(threads or cores_per_rank())
    engine_cfg = EngineConfig(engine=engine, zero_stage=zero_stage, precision=precision, micro_batch_size=micro_batch)
    execution = Execution(channels_last=channels_last, compile=compile_model)
    requests = []
    for name in names:
        n = seeds or catalog.task(name).spec.default_seeds
        requests += expand_requests([name], backbone, list(range(n)), init=init, weights=weights,
                                    max_steps=max_steps, engine=engine_cfg, variants=per_task[name],
                                    freeze=freeze, similarity=similarity, protocols=task_protocols[name],
                                    pooling=pooling)
    store = RunStore(out)
    check_writable(out)
    if dispatch and dispatch["launcher"] != "inline":  # one job per run on an engine (medbench.run.dispatch)
        _dispatch(catalog, locations, store, checkpoints, requests, execution=execution, **dispatch)
        return
    with progress_reporter() as reporter:
        runner = Runner(catalog, locations, store, reporter=reporter, fail_fast=fail_fast, checkpoints=checkpoints,
                        execution=execution)
        outcomes = runner.run_all(requests)
    _finish(outcomes, store)


def _dispatch(catalog, locations, store, checkpoints, requests, *, launcher, max_concurrent, wait, cluster_config,
              threads, tasks_dir, execution=None) -> None:
    from medbench.run.dispatch import ClusterConfig, dispatch
    from medbench.run.runner import Runner

    config = ClusterConfig.load(cluster_config)
    runner = Runner(catalog, locations, store, checkpoints=checkpoints)
    outcomes = dispatch(requests, launcher=launcher, out=store.out, tasks_dir=tasks_dir, locations=locations,
                        checkpoints=checkpoints, threads=threads, max_concurrent=max_concurrent, wait=wait,
                        execution=execution,
                        config=config, config_path=cluster_config, message=lambda text: console().print(safe(text)),
                        preflight=lambda: runner.preflight(requests),  # bad input stops before any job
                        locate=lambda req, world: runner.locate(req, world_size=world))
    if wait:
        _finish(outcomes, store)


def _free_gpu_gb() -> float:
    """Free memory of this machine's first GPU, in GB (what --dry-run assumes for --micro-batch auto)."""
    from medbench.train.memory import CudaMemory

    return CudaMemory("cuda:0").available() / 1e9


def check_writable(out: Path) -> None:
    from medbench.errors import OutputError

    if out.exists() and not out.is_dir():
        raise OutputError("exists and is not a folder; expected a folder for the run store", where=out, field="--out")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".medbench-write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise OutputError(f"output folder is not writable ({err.strerror or err}); expected a folder this user "
                          "can write", where=out, field="--out") from err


def _finish(outcomes, store) -> None:
    from medbench.board.aggregate import write_leaderboard
    from medbench.train.distributed import prepare_environment

    if not prepare_environment().is_main:
        return
    from medbench.store.scores import rescore_outdated

    # a run another process was training counts once it is complete
    done = [o.run_dir for o in outcomes if o.run_dir is not None and
            (o.status in ("ok", "skipped") or (o.status == "busy" and o.run_dir.complete))]
    rescore_outdated(done, lambda text: console().print(safe(text), soft_wrap=True))  # runs reused by a launcher, scored by older scoring code
    from medbench.utils import undefined_numbers_reported

    with undefined_numbers_reported():
        board = write_leaderboard(done, store.leaderboard_path())
    print_board(board)
    failed = [o for o in outcomes if o.status == "failed"]
    busy = [o for o in outcomes if o.status == "busy" and not o.run_dir.complete]
    skipped = sum(o.status == "skipped" for o in outcomes)
    con = console()
    if skipped:
        con.print(f"{skipped} run(s) were already complete and reused.")
    mine = {r.path.resolve() for r in done}
    others = [r for r in store.completed() if r.path.resolve() not in mine]
    if others:  # this leaderboard is this command's runs; the store may hold other backbones or settings
        con.print(f"{len(others)} other complete run(s) in {store.out} are not in this leaderboard (other "
                  f"backbones, tasks or settings); 'medbench leaderboard RUN_DIR... -o FILE' combines runs.",
                  soft_wrap=True)
    if busy:
        con.print(f"{len(busy)} run(s) are being trained by another medbench process; rerun to include them.")
    for o in failed:
        where = f" (details: {o.run_dir.path / 'result.json'})" if o.run_dir else ""
        con.print(f"[red]failed[/red] {safe(o.request.task)} seed {o.request.seed}: {safe(o.error)}{safe(where)}",
                  soft_wrap=True)
    con.print(f"leaderboard: {store.leaderboard_path()}")
    sys.stdout.flush()
    if failed:
        raise typer.Exit(1)
