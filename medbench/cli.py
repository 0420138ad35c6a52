"""The ``medbench`` command line (typer + rich).

Heavy libraries (torch, deepspeed, timm, polars) are imported inside the
commands, so ``medbench --help`` and ``medbench list`` start fast. A user
error prints one line and exits with 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import json
import os
import sys
from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer

from medbench import __version__

app = typer.Typer(
    name="medbench",
    help="How well does this image backbone transfer to medical imaging? Fine-tune, score, compare.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_DEBUG = {"on": False}


def _console(stderr: bool = False):
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() else 200  # logs and pipes get whole rows
    return Console(stderr=stderr, highlight=False, width=width)


def _fail(err: BaseException) -> None:
    """Print a user error in one line and exit with its code."""
    from medbench.errors import MedbenchError

    if _DEBUG["on"]:
        raise err
    if isinstance(err, OSError) and not isinstance(err, MedbenchError):
        from medbench.utils import output_error

        err = output_error(Path(err.filename) if err.filename else Path("."), err)
    if isinstance(err, MedbenchError):
        code, text = err.exit_code, str(err)
    else:  # not a user error: still one line; --debug shows where it came from
        code, text = 2, f"unexpected {type(err).__name__}: {' '.join(str(err).split())} (--debug shows the traceback)"
    print(f"medbench: error: {text}", file=sys.stderr)
    raise typer.Exit(code)


def _interrupted(err: KeyboardInterrupt) -> None:
    """Ctrl-C / SIGTERM: say what is kept and how to go on, exit 128 + signal."""
    detail = f" ({err})" if str(err) else ""
    print(f"medbench: interrupted{detail}; completed runs are kept and interrupted runs resume from their last "
          "checkpoint: rerun the same command", file=sys.stderr)
    raise typer.Exit(getattr(err, "exit_code", 130))


def _version(value: bool) -> None:
    if value:
        print(f"medbench {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks instead of one-line errors."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    _DEBUG["on"] = debug or bool(os.environ.get("MEDBENCH_DEBUG"))


class ListWhat(str, Enum):
    backbones = "backbones"
    tasks = "tasks"
    suites = "suites"


class EngineChoice(str, Enum):
    deepspeed = "deepspeed"
    torch = "torch"


class PrecisionChoice(str, Enum):
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class LauncherChoice(str, Enum):
    inline = "inline"
    local = "local"
    slurm = "slurm"


TASKS_DIR_OPT = typer.Option(None, "--tasks-dir", help="Extra folder of task/suite YAML files (repeatable).")
ALLOW_OUTSIDE_OPT = typer.Option(
    False, "--allow-outside-data-root", help="Let task specs and label files name absolute paths or paths "
    "outside the dataset folder (off: such paths are refused). Env: MEDBENCH_ALLOW_OUTSIDE_DATA_ROOT=1.")


@app.command("list")
def list_cmd(
    what: ListWhat = typer.Argument(..., help="backbones, tasks or suites"),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    tasks_dir: Optional[List[Path]] = TASKS_DIR_OPT,
) -> None:
    """List registered backbones, tasks or suites, with where each comes from."""
    try:
        rows = _list_rows(what, tasks_dir or [])
    except Exception as err:
        _fail(err)
        return
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    from rich.table import Table

    table = Table(show_lines=False)
    if not rows:
        print(f"no {what.value}")
        return
    if what == ListWhat.backbones:  # one short column for the two triples
        rows = [{**{k: v for k, v in r.items() if k not in ("mean", "std")},
                 "normalization": _normalization_label(r["mean"], r["std"])} for r in rows]
    for col in rows[0]:
        table.add_column(col)
    for r in rows:
        table.add_row(*["" if v is None else (f"{v:,}" if isinstance(v, int) else str(v)) for v in r.values()])
    _console().print(table)


def _normalization_label(mean, std) -> str:
    """``ImageNet``, ``per timm config``, else the numbers (one when the three channels agree)."""
    from medbench.backbones.registry import IMAGENET_MEAN, IMAGENET_STD

    if mean is None or std is None:
        return "per timm config"
    if tuple(mean) == IMAGENET_MEAN and tuple(std) == IMAGENET_STD:
        return "ImageNet"

    def triple(values) -> str:
        return f"{values[0]:g}" if len(set(values)) == 1 else ",".join(f"{v:g}" for v in values)

    return f"mean {triple(mean)} std {triple(std)}"


def _list_rows(what: ListWhat, tasks_dir: list[Path]) -> list[dict]:
    if what == ListWhat.backbones:
        from medbench.backbones.registry import list_backbones

        # mean/std: the per-channel input normalization (RGB; a grey input uses the mean of each triple)
        rows = [
            {"name": b.name, "family": b.family, "pretraining": b.pretraining, "params": b.params,
             "resolution": b.default_resolution, "default_init": b.default_init, "source": b.source,
             "weights": b.weights, "mean": list(b.mean), "std": list(b.std)}
            for b in list_backbones()
        ]
        rows.append({"name": "timm/<model>", "family": "timm", "pretraining": "per timm tag", "params": None,
                     "resolution": None, "default_init": "pretrained", "source": "timm",
                     "weights": "hf-hub:timm/<model>", "mean": None, "std": None})
        return rows
    from medbench.catalog import Catalog

    catalog = Catalog(tasks_dir)
    if what == ListWhat.tasks:
        rows = []
        for e in catalog.entries("task"):
            t = catalog.task(e.name).spec
            rows.append({"name": e.name, "family": t.family, "type": t.type, "labels": len(t.labels),
                         "dataset": t.dataset.name, "headline": t.headline, "version": str(t.version),
                         "source": e.source})
        return rows
    return [{"name": e.name, "tasks": len(catalog.suite_tasks(e.name)), "description": catalog.suite(e.name).description,
             "source": e.source} for e in catalog.entries("suite")]


@app.command()
def run(
    backbone: str = typer.Option(..., "--backbone", "-b", help="Registered backbone name (see 'medbench list backbones')."),
    suite: Optional[List[str]] = typer.Option(None, "--suite", "-s", help="Suite to run (repeatable)."),
    task: Optional[List[str]] = typer.Option(None, "--task", "-t", help="Task to run (repeatable)."),
    seeds: Optional[int] = typer.Option(None, "--seeds", min=1, help="Seeds 0..N-1 per task (default: the task's)."),
    data_root: Optional[Path] = typer.Option(None, "--data-root", help="Folder with one sub-folder per dataset."),
    data: Optional[List[str]] = typer.Option(None, "--data", help="NAME=PATH for one dataset (repeatable)."),
    out: Path = typer.Option(Path("medbench-results"), "--out", "-o", help="Output folder (run store + leaderboard)."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", min=1, help="Cap the schedule at N steps."),
    init: Optional[str] = typer.Option(None, "--init", help="pretrained | random | mean-var | transfusion:K | gabor (default: pretrained if the backbone has weights)."),
    weights: Optional[Path] = typer.Option(None, "--weights", help="Pre-trained weights file for the backbone."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan and its cost; train nothing."),
    tasks_dir: Optional[List[Path]] = TASKS_DIR_OPT,
    engine: EngineChoice = typer.Option(EngineChoice.deepspeed, "--engine", help="deepspeed, or plain torch (explicit only)."),
    zero_stage: int = typer.Option(0, "--zero-stage", min=0, max=2, help="DeepSpeed ZeRO stage."),
    precision: PrecisionChoice = typer.Option(PrecisionChoice.fp32, "--precision", help="fp32 | bf16 | fp16 (CUDA)."),
    micro_batch: Optional[int] = typer.Option(None, "--micro-batch", min=1, help="Per-device micro-batch (gradient accumulation)."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="CPU threads for torch (default: all cores)."),
    fail_fast: bool = typer.Option(False, "--fail-fast", help="Stop at the first failed run."),
    assume_tflops: float = typer.Option(100.0, "--assume-tflops", min=0.001, help="Sustained TFLOP/s for --dry-run time estimates."),
    checkpoint_every: Optional[List[str]] = typer.Option(
        None, "--checkpoint-every", help="Checkpoint every N steps (500) and/or every duration (90s, 10m, 2h; "
        "repeatable), or 'off'. Default: 10m. An interrupted run resumes from its last checkpoint."),
    allow_outside_data_root: bool = ALLOW_OUTSIDE_OPT,
    fractions: Optional[str] = typer.Option(None, "--fractions", help="Data efficiency: also fine-tune on these percentages of the training images, e.g. 1,5,10,25,50 ('default': 1,5,10,25,50,100)."),
    shots: Optional[str] = typer.Option(None, "--shots", help="Data efficiency: also fine-tune on k images per class, e.g. 1,5,10 ('default': 1,5,10,100,500)."),
    resolutions: Optional[str] = typer.Option(None, "--resolutions", help="Resolution sweep: also fine-tune at these crop sizes (px), e.g. 64,128."),
    freeze: Optional[str] = typer.Option(None, "--freeze", help="Frozen features: 'head' (train the head only) or L (freeze the first L blocks)."),
    similarity: Optional[str] = typer.Option(None, "--similarity", help="Per-layer similarity initial vs fine-tuned: cka | svcca | cka,svcca."),
    launcher: LauncherChoice = typer.Option(LauncherChoice.inline, "--launcher", help="inline: the runs one after another in this process; local: one submitit job (process) per run on this machine; slurm: one SLURM job per run (docs/scaling.md)."),
    max_concurrent: Optional[int] = typer.Option(None, "--max-concurrent", min=1, help="With --launcher local|slurm: at most N jobs at once (local default: one per GPU set, or one per core / --threads cores)."),
    no_wait: bool = typer.Option(False, "--no-wait", help="With --launcher slurm: submit and return (then 'medbench status OUT', rerun to write the leaderboard)."),
    cluster_config: Optional[Path] = typer.Option(None, "--cluster-config", help="YAML of submitit parameters (slurm_partition, gpus_per_node, timeout_min, cpus_per_task, mem_gb, ...)."),
) -> None:
    """Fine-tune BACKBONE on every task of the suites/tasks and write the leaderboard."""
    try:
        variants = _variants(fractions, shots, resolutions)
        _run(backbone=backbone, suites=suite or [], tasks=task or [], seeds=seeds, data_root=data_root,
             data=data or [], out=out, max_steps=max_steps, init=init, weights=weights, dry_run=dry_run,
             tasks_dir=tasks_dir or [], engine=engine.value, zero_stage=zero_stage, precision=precision.value,
             micro_batch=micro_batch, threads=threads, fail_fast=fail_fast, assume_tflops=assume_tflops,
             checkpoint_every=checkpoint_every or [], allow_outside_data_root=allow_outside_data_root,
             variants=variants, freeze=freeze, similarity=similarity,
             dispatch={"launcher": launcher.value, "max_concurrent": max_concurrent, "wait": not no_wait,
                       "cluster_config": cluster_config, "threads": threads, "tasks_dir": tasks_dir or []})
    except typer.Exit:
        raise
    except KeyboardInterrupt as err:
        _interrupted(err)
    except Exception as err:
        _fail(err)


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
    from medbench.specs import VariantRuns

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
         allow_outside_data_root, variants=(), freeze=None, similarity=None, dispatch=None) -> None:
    from medbench.backbones.init import parse_init, preflight
    from medbench.backbones.registry import get_backbone
    from medbench.catalog import Catalog
    from medbench.data.locate import DataLocations
    from medbench.errors import UsageError

    for flag, key in (("--max-concurrent", "max_concurrent"), ("--cluster-config", "cluster_config")):
        if dispatch and dispatch["launcher"] == "inline" and dispatch.get(key):
            raise UsageError("only with --launcher local or slurm (the default, inline, runs one run at a time)",
                             field=flag)

    catalog = Catalog(tasks_dir)
    names = _selected_tasks(catalog, suites, tasks)
    per_task = _task_variants(catalog, names, suites, list(variants))
    bb = get_backbone(backbone)
    locations = DataLocations.from_cli(data_root, data, allow_outside_root=allow_outside_data_root)
    from medbench.train.checkpoint import CheckpointPolicy

    checkpoints = CheckpointPolicy.parse(checkpoint_every)
    if dry_run:
        if init is not None:
            parse_init(init)
        _print_plan(catalog, names, backbone, seeds, locations, max_steps, assume_tflops,
                    engine={"zero_stage": zero_stage, "precision": precision, "micro_batch": micro_batch})
        extra = {t: len(v) for t, v in per_task.items() if v}
        if extra:
            _console().print("plus variant runs (--fractions/--shots/--resolutions, and the suite's own) per seed, "
                             "each on its own schedule: " + ", ".join(f"{t} {k}" for t, k in extra.items()))
        return

    from medbench.results import RunStore
    from medbench.runner import Runner, configure_torch, expand_requests
    from medbench.train.finetune import EngineConfig

    # a missing weights file fails here, before any run; the runs get the resolved file's path, and its origin
    # (local weights folder, hub cache, hub download) stays with it (medbench.backbones.weights.file_origin)
    init, weights = preflight(bb, init, weights)
    from medbench.analysis.similarity import parse_methods
    from medbench.train.freeze import parse_freeze

    freeze, similarity = parse_freeze(freeze, bb), ",".join(parse_methods(similarity)) or None
    configure_torch(threads or os.cpu_count())
    engine_cfg = EngineConfig(engine=engine, zero_stage=zero_stage, precision=precision, micro_batch_size=micro_batch)
    requests = []
    for name in names:
        n = seeds or catalog.task(name).spec.default_seeds
        requests += expand_requests([name], backbone, list(range(n)), init=init, weights=weights,
                                    max_steps=max_steps, engine=engine_cfg, variants=per_task[name],
                                    freeze=freeze, similarity=similarity)
    store = RunStore(out)
    _check_writable(out)
    if dispatch and dispatch["launcher"] != "inline":  # one job per run on an engine (medbench.dispatch)
        _dispatch(catalog, locations, store, checkpoints, requests, **dispatch)
        return
    with _RichReporter() as reporter:
        runner = Runner(catalog, locations, store, reporter=reporter, fail_fast=fail_fast, checkpoints=checkpoints)
        outcomes = runner.run_all(requests)
    _finish(outcomes, store)


def _dispatch(catalog, locations, store, checkpoints, requests, *, launcher, max_concurrent, wait, cluster_config,
              threads, tasks_dir) -> None:
    from medbench.dispatch import ClusterConfig, dispatch
    from medbench.runner import Runner

    config = ClusterConfig.load(cluster_config)
    runner = Runner(catalog, locations, store, checkpoints=checkpoints)
    outcomes = dispatch(requests, launcher=launcher, out=store.out, tasks_dir=tasks_dir, locations=locations,
                        checkpoints=checkpoints, threads=threads, max_concurrent=max_concurrent, wait=wait,
                        config=config, config_path=cluster_config, message=_console().print,
                        preflight=lambda: runner.preflight(requests),  # bad input stops before any job
                        locate=lambda req, world: runner.locate(req, world_size=world))
    if wait:
        _finish(outcomes, store)


def _check_writable(out: Path) -> None:
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
    from medbench.leaderboard import write_leaderboard
    from medbench.train.distributed import prepare_environment

    if not prepare_environment().is_main:
        return
    # a run another process was training counts once it is complete
    done = [o.run_dir for o in outcomes if o.run_dir is not None and
            (o.status in ("ok", "skipped") or (o.status == "busy" and o.run_dir.complete))]
    board = write_leaderboard(done, store.leaderboard_path())
    _print_board(board)
    failed = [o for o in outcomes if o.status == "failed"]
    busy = [o for o in outcomes if o.status == "busy" and not o.run_dir.complete]
    skipped = sum(o.status == "skipped" for o in outcomes)
    con = _console()
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
        con.print(f"[red]failed[/red] {o.request.task} seed {o.request.seed}: {o.error}{where}", soft_wrap=True)
    con.print(f"leaderboard: {store.leaderboard_path()}")
    sys.stdout.flush()
    if failed:
        raise typer.Exit(1)


def _fmt(summary: dict | None, pct: bool = False) -> str:
    if not summary or summary.get("mean") is None:
        return "undefined"
    scale = 100.0 if pct else 1.0
    m = summary["mean"] * scale
    s = summary.get("std")
    return f"{m:.4f}" if s is None else f"{m:.4f} ± {s * scale:.4f}"


def _print_board(board: dict) -> None:
    from rich.table import Table

    table = Table(title="medbench results (test split; mean ± std over seeds, interval of the mean over test resamples)")
    for col in ("task", "backbone", "init", "headline", "value", "interval", "accuracy", "seeds", "OOD (drop)",
                "ECE → T-scaled", "largest AUC gap"):
        table.add_column(col)
    for e in board["entries"]:
        metric = e["headline"]["metric"]
        ood = "; ".join(f"{name}: {_fmt(m.get(metric))}" + _drop(e, name, metric) for name, m in e.get("ood", {}).items())
        ci = e["headline"].get("ci")
        cal = e.get("calibration") or {}
        ece = (f"{_fmt(cal['before'].get('ece'))} → {_fmt(cal['after'].get('ece'))}"
               if cal.get("before") and cal.get("after") else "-")
        init = e["init"] + (f" ({e['regime']})" if e.get("regime") else "")
        sig = e.get("significance") or {}  # best of its task in bold, not significantly different in italics
        value = _fmt(e["headline"])
        value = f"[bold]{value}[/bold]" if sig.get("best") else (f"[italic]{value}[/italic]" if sig.get("tied_with_best") else value)
        table.add_row(e["task"], e["backbone"], init, metric, value,
                      f"[{ci['low']:.4f}, {ci['high']:.4f}]" if ci else "-",
                      _fmt(e["metrics"].get("accuracy")), str(len(e["seeds"])), ood or "-", ece, _largest_gap(e))
    _console().print(table)


def _drop(entry: dict, target: str, metric: str) -> str:
    d = (((entry.get("shift") or {}).get(target) or {}).get(metric) or {}).get("drop")
    return f" (drop {d['mean']:.4f})" if isinstance(d, dict) and d.get("mean") is not None else ""


def _largest_gap(entry: dict) -> str:
    best = None
    for name, attr in ((entry.get("fairness") or {}).get("attributes") or {}).items():
        gap = (attr.get("gap") or {}).get("auc") if isinstance(attr, dict) else None
        if isinstance(gap, dict) and gap.get("mean") is not None and len(attr.get("attributes", [])) == 1:
            if best is None or gap["mean"] > best[1]:
                best = (name, gap["mean"], (attr.get("worst_group") or {}).get("auc"))
    if best is None:
        return "-"
    worst = best[2] if isinstance(best[2], str) else "varies"
    return f"{best[0]}: {best[1]:.4f} (worst {worst})"


def _gb(memory: dict | None) -> str:
    if not memory:
        return "?"
    bound = "<=" if memory.get("activations_upper_bound") else ""
    return f"{bound}{memory['total'] / 1e9:.2f}"


def _print_plan(catalog, names, backbone, seeds, locations, max_steps, assume_tflops, engine=None) -> None:
    from rich.table import Table

    from medbench.plan import plan_runs

    plans = plan_runs(catalog, names, backbone, seeds, locations, max_steps=max_steps, assume_tflops=assume_tflops,
                      engine=engine)
    table = Table(title=f"plan: {backbone} on {len(plans)} task(s)")
    for col in ("task", "dataset", "data", "n_train", "steps", "batch", "input", "seeds", "GFLOP/img",
                "PFLOP/run", "h/run", "GB/device"):
        table.add_column(col)
    total_h = 0.0
    for p in plans:
        n = f"{p.n_train:,} ({p.n_train_source})" if p.n_train else "unknown"
        h = p.hours_per_run
        total_h += (h or 0.0) * p.seeds
        pflops = "?"
        if p.pflops_per_run:  # "+?": evaluation unknown (split sizes not counted), training only
            pflops = f"{p.pflops_per_run:.2f}" + ("" if p.eval_pflops_per_run is not None else "+?")
        table.add_row(p.task, p.dataset, p.data_status, n, str(p.steps or "?"), str(p.batch_size),
                      f"{p.resize}->{p.crop}", str(p.seeds), f"{p.gflops_per_image:.1f}", pflops,
                      f"{h:.2f}" if h is not None else "?",
                      _gb(p.memory))
    con = _console()
    con.print(table)
    runs = sum(p.seeds for p in plans)
    no_eval = sum(1 for p in plans if p.steps and p.eval_pflops_per_run is None)
    con.print(f"{runs} runs; estimated {total_h:.1f} device-hours at {assume_tflops:g} TFLOP/s sustained "
              "(training + evaluation: validation during training, val/test predictions, OOD tests; "
              "schedules of tasks with unknown size not counted"
              + (f"; evaluation of {no_eval} task(s) without counted splits not counted ('+?')" if no_eval else "")
              + ")")
    worst = max((p for p in plans if p.memory), key=lambda p: p.memory["total"], default=None)
    if worst is not None:
        m = worst.memory
        con.print(f"memory per device, largest task ({worst.task}, micro-batch {m['micro_batch']}): "
                  f"params {m['params'] / 1e9:.2f} GB + grads {m['grads'] / 1e9:.2f} + optimizer "
                  f"{m['optimizer'] / 1e9:.2f} + activations {m['activations'] / 1e9:.2f} (measured on the meta "
                  f"device{', fp32 upper bound' if m['activations_upper_bound'] else ''}) = {m['total'] / 1e9:.2f} GB; "
                  "--micro-batch N lowers the activations")
    told = set()
    for p in plans:
        if p.data_status in ("missing", "incomplete"):
            where = p.data_path or f"--data {p.dataset}=PATH or --data-root DIR"
            con.print(f"[yellow]missing[/yellow] dataset {p.dataset!r} for {p.task} (looked in {where}): {p.how_to_get}")
            told.add(p.dataset)
    for p in plans:  # an OOD target without data is skipped and recorded at run time: not an error
        for o in p.ood or []:
            if o["data_status"] not in ("missing", "incomplete"):
                continue
            where = o["data_path"] or f"--data {o['dataset']}=PATH or --data-root DIR"
            how = "how to get it: see above" if o["dataset"] in told else o["how_to_get"]
            told.add(o["dataset"])
            con.print(f"[yellow]OOD target[/yellow] {o['name']!r} of {p.task} has no data (dataset {o['dataset']!r}, "
                      f"looked in {where}); it will be skipped and recorded, not an error; {how}")


class BinningChoice(str, Enum):
    uniform = "uniform"
    adaptive = "adaptive"


@app.command()
def score(
    run_dirs: List[Path] = typer.Argument(..., help="Run folders, or folders above them."),
    bootstrap: Optional[int] = typer.Option(None, "--bootstrap", min=0, help="Bootstrap resamples for intervals (0: none; default: the task's, 1000)."),
    ci_level: Optional[float] = typer.Option(None, "--ci-level", help="Confidence level of the intervals (default 0.95)."),
    threshold: Optional[str] = typer.Option(None, "--threshold", help="Fairness operating point chosen on validation: youden, or sensitivity:0.9."),
    ece_bins: Optional[int] = typer.Option(None, "--ece-bins", min=1, help="Calibration bins (default 15)."),
    ece_binning: Optional[BinningChoice] = typer.Option(None, "--ece-binning", help="uniform (equal width) or adaptive (equal mass)."),
    min_group_size: Optional[int] = typer.Option(None, "--min-group-size", min=1, help="Smallest subgroup scored (default 20 images)."),
    intersections: Optional[int] = typer.Option(None, "--intersections", min=1, help="Cross up to this many attributes (default 2)."),
) -> None:
    """Recompute every score and axis of finished runs from their saved predictions (no retraining)."""
    try:
        from medbench.errors import UsageError
        from medbench.results import find_run_dirs
        from medbench.scoring.runs import rescore

        overrides = _scoring_overrides(bootstrap, ci_level, threshold, ece_bins, ece_binning, min_group_size,
                                       intersections)
        runs = find_run_dirs(run_dirs)
        if not runs:
            raise UsageError("no completed run folders found", where=", ".join(map(str, run_dirs)), field="RUN_DIR")
        for r in runs:
            scores = rescore(r, overrides)
            print(f"{r.path}: {_score_line(scores)}")
    except typer.Exit:
        raise
    except Exception as err:
        _fail(err)


def _scoring_overrides(bootstrap, ci_level, threshold, ece_bins, ece_binning, min_group_size, intersections) -> dict:
    from medbench.errors import UsageError

    out: dict = {k: v for k, v in (("bootstrap", bootstrap), ("ci_level", ci_level), ("ece_bins", ece_bins),
                                   ("min_group_size", min_group_size), ("intersections", intersections))
                 if v is not None}
    if ece_binning is not None:
        out["ece_binning"] = ece_binning.value
    if threshold is not None:
        method, _, target = threshold.partition(":")
        if method not in ("youden", "sensitivity") or (method == "youden" and target):
            raise UsageError(f"expected 'youden' or 'sensitivity:TARGET', got {threshold!r}", field="--threshold")
        out["threshold"] = method
        if target:
            try:
                out["target_sensitivity"] = float(target)
            except ValueError:
                raise UsageError(f"target sensitivity must be a number, got {target!r}", field="--threshold") from None
    if ci_level is not None and not 0 < ci_level < 1:
        raise UsageError(f"must be between 0 and 1, got {ci_level}", field="--ci-level")
    return out


def _score_line(scores: dict) -> str:
    """One line per run: headline metrics with intervals and the axes' key numbers."""
    parts = []
    for k, v in scores.get("test", {}).items():
        if "/" in k or v is None:
            continue
        ci = scores.get("ci", {}).get("test", {}).get(k)
        parts.append(f"{k} {v:.4f}" + (f" [{ci['low']:.4f}, {ci['high']:.4f}]" if ci else ""))
    cal = scores.get("calibration")
    if cal and cal["before"].get("ece") is not None and cal["after"].get("ece") is not None:
        parts.append(f"ECE {cal['before']['ece']:.4f} -> {cal['after']['ece']:.4f} (temperature scaling)")
    for name, attr in (scores.get("fairness") or {}).get("attributes", {}).items():
        if len(attr.get("attributes", [])) == 1 and attr.get("gap", {}).get("auc") is not None:
            parts.append(f"AUC gap {name} {attr['gap']['auc']:.4f} (worst {attr['worst_group']['auc']})")
    for name, s in (scores.get("shift") or {}).items():
        for m, v in s.items():
            if isinstance(v, dict) and v.get("drop") is not None:
                parts.append(f"{name} {m} drop {v['drop']:.4f}")
    return "; ".join(parts)


@app.command()
def leaderboard(
    run_dirs: List[Path] = typer.Argument(..., help="Run folders, or folders above them."),
    output: Path = typer.Option(..., "--output", "-o", help="Leaderboard JSON to write."),
    baseline: Optional[str] = typer.Option(None, "--baseline", help="Baseline backbone (NAME or NAME@INIT): adds paired comparisons, data-efficiency area, convergence and resolution relative to it."),
    published: bool = typer.Option(False, "--published", help="Also show the papers' published rows (CJ21, RZ19) for the same tasks."),
) -> None:
    """Aggregate finished runs into one leaderboard JSON (validated against the shipped JSON Schema)."""
    try:
        from medbench.errors import UsageError
        from medbench.leaderboard import write_leaderboard
        from medbench.results import find_run_dirs

        runs = find_run_dirs(run_dirs)
        if not runs:
            raise UsageError("no completed run folders found", where=", ".join(map(str, run_dirs)), field="RUN_DIR")
        base = None
        if baseline:
            name, _, base_init = baseline.partition("@")
            base = (name, base_init or None)
        board = write_leaderboard(runs, output, base)
        _print_board(board)
        if published:
            _print_published(board)
        print(f"leaderboard: {output}")
    except typer.Exit:
        raise
    except Exception as err:
        _fail(err)


def _print_published(board: dict) -> None:
    from rich.table import Table

    from medbench.published import published_for
    from medbench.render import label, published_value

    rows = published_for({e["task"] for e in board["entries"]})
    table = Table(title="published reference rows for the same tasks (fractions; the papers print percent)")
    for col in ("task", "backbone", "init", "metric", "mean ± std", "source", "paper's row / column"):
        table.add_column(col)
    for e in rows:
        paper = e.get("paper") or {}
        table.add_row(e["task"], e["backbone"], label(e), e["headline"]["metric"], published_value(e), e["citation"],
                      f"{paper.get('target', '')} / {paper.get('column', '')}")
    if not rows:
        table.add_row("-", "-", "-", "-", "no published rows for these tasks", "-", "-")
    _console().print(table)


class RenderFormat(str, Enum):
    md = "md"
    html = "html"


@app.command()
def render(
    board_file: Path = typer.Argument(..., help="Leaderboard JSON (from 'medbench run' or 'medbench leaderboard')."),
    fmt: RenderFormat = typer.Option(RenderFormat.html, "--format", "-f", help="md: a Markdown table; html: one self-contained page with plots."),
    output: Path = typer.Option(..., "--output", "-o", help="File to write."),
    published: bool = typer.Option(False, "--published", help="Show the papers' published rows for the same tasks."),
) -> None:
    """Render a leaderboard for people: Markdown, or a static HTML page (sortable table, a view per axis, plots)."""
    try:
        from medbench.board_schema import load_board
        from medbench.published import published_for
        from medbench.render import render_html, render_markdown
        from medbench.utils import atomic_write_text

        board = load_board(board_file, field="BOARD")
        rows = published_for({e["task"] for e in board["entries"]}) if published else []
        text = render_markdown(board, rows) if fmt == RenderFormat.md else render_html(board, rows)
        atomic_write_text(output, text)
        print(f"{fmt.value}: {output} ({len(text.encode()) / 1024:.0f} KiB)")
    except typer.Exit:
        raise
    except Exception as err:
        _fail(err)


@app.command()
def compare(
    baseline: Path = typer.Argument(..., help="Baseline leaderboard JSON (e.g. leaderboards/smoke-cpu.json)."),
    new: Path = typer.Argument(..., help="New leaderboard JSON to check against it."),
    metric: Optional[List[str]] = typer.Option(None, "--metric", "-m", help="Compare these too (repeatable): 'headline' (default), a test metric (accuracy, auc/Edema) or ood:TARGET:METRIC."),
    tolerance: float = typer.Option(0.005, "--tolerance", help="Absolute tolerance: the least drop that counts as a regression."),
    k_seed: float = typer.Option(2.0, "--k-seed", help="Multiple of the standard error of the difference of seed means that is tolerated."),
    k_ci: float = typer.Option(1.0, "--k-ci", help="Multiple of the combined half-width of the test-resampling intervals that is tolerated."),
    allow_missing: bool = typer.Option(False, "--allow-missing", help="Entries missing from NEW do not fail the gate."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Regression gate: exit 1 when NEW is worse than BASELINE beyond the tolerance (0 pass, 2 usage error)."""
    try:
        from medbench.board_schema import load_board
        from medbench.compare import Tolerance, compare_boards
        from medbench.errors import UsageError

        if min(tolerance, k_seed, k_ci) < 0:
            raise UsageError("expected non-negative numbers", field="--tolerance/--k-seed/--k-ci")
        base_board = load_board(baseline, field="BASELINE")
        new_board = load_board(new, field="NEW")
        metrics = list(dict.fromkeys(["headline", *(metric or [])]))
        report = compare_boards(base_board, new_board, metrics, Tolerance(tolerance, k_seed, k_ci), allow_missing)
    except typer.Exit:
        raise
    except Exception as err:
        _fail(err)
        return
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        _print_compare(report, baseline, new)
    if report["status"] != "pass":
        raise typer.Exit(1)


def _print_compare(report: dict, baseline: Path, new: Path) -> None:
    from rich.table import Table

    fmt = lambda v: "undefined" if v is None else f"{v:.4f}"  # noqa: E731
    table = Table(title=f"medbench compare: {new} against {baseline} (worse by > tolerance fails)")
    for col in ("task", "backbone", "init", "metric", "baseline", "new", "worse by", "tolerance", "status"):
        table.add_column(col)
    style = {"regression": "[red]REGRESSION[/red]", "better": "[green]better[/green]", "ok": "ok"}
    for r in report["rows"]:
        init = r["init"] + (f" ({r['regime']})" if r.get("regime") else "")
        status = style[r["status"]] + (f" ({r['reason']})" if r.get("reason") else "")
        table.add_row(r["task"], r["backbone"], init, r["metric"], fmt(r["baseline"]), fmt(r["new"]),
                      fmt(r["worse_by"]), fmt(r.get("tolerance")), status)
    con = _console()
    con.print(table)
    for what, color in (("missing", "red"), ("added", "yellow")):
        for e in report[what]:
            con.print(f"[{color}]{what}[/{color}] in NEW: {e['task']} {e['backbone']} {e['init']}"
                      + (f" ({e['regime']})" if e.get("regime") else ""))
    verdict = "[green]pass[/green]" if report["status"] == "pass" else "[red]regression[/red]"
    con.print(f"{verdict}: {report['compared']} compared, {report['regressions']} regression(s), "
              f"{len(report['missing'])} missing, {len(report['added'])} added")


@app.command()
def status(
    out: Path = typer.Argument(..., help="Output folder of 'medbench run' (the run store)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
) -> None:
    """What is queued, running, done and failed in a run store (runs and dispatched jobs)."""
    try:
        from medbench.errors import UsageError
        from medbench.status import collect

        if not (out / "runs").is_dir() and not (out / "jobs").is_dir():
            raise UsageError("no run store here (expected runs/ or jobs/)", where=out, field="OUT")
        _print_status(collect(out), as_json)
    except typer.Exit:
        raise
    except Exception as err:
        _fail(err)
def _print_status(report: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(report, indent=2))
        return
    from rich.table import Table

    con = _console()
    if report["jobs"]:
        table = Table(title="jobs")
        for col in ("job", "launcher", "id", "state", "seconds", "error"):
            table.add_column(col)
        for j in report["jobs"]:
            table.add_row(j["name"], j["launcher"] or "-", j["job_id"] or "-", j["state"],
                          f"{j['seconds']:.0f}" if j["seconds"] is not None else "-", j["error"] or "")
        con.print(table)
    table = Table(title="runs")
    for col in ("task", "backbone", "run", "state", "checkpoint step", "error"):
        table.add_column(col)
    for r in report["runs"]:
        table.add_row(r["task"], r["backbone"], r["run"], r["state"],
                      str(r["checkpoint_step"]) if r["checkpoint_step"] else "-", r["error"] or "")
    con.print(table)
    for what, counts in report["counts"].items():
        con.print(f"{what}: " + ", ".join(f"{n} {c}" for c, n in counts.items()))


data_app = typer.Typer(help="Datasets: download the open ones, learn where to get the others, inspect what a task sees.",
                       no_args_is_help=True)
app.add_typer(data_app, name="data")


@data_app.command("download")
def data_download(
    name: Optional[str] = typer.Argument(None, help="Dataset name (e.g. medmnist, tuberculosis); none: list them."),
    data_root: Optional[Path] = typer.Option(None, "--data-root", help="Folder with one sub-folder per dataset."),
    data: Optional[List[str]] = typer.Option(None, "--data", help="NAME=PATH: where this dataset goes."),
    subset: Optional[List[str]] = typer.Option(None, "--subset", help="Only these parts (e.g. pneumoniamnist)."),
    size: Optional[int] = typer.Option(None, "--size", help="Image size for MedMNIST: 28, 64, 128 or 224."),
    mirror: Optional[str] = typer.Option(None, "--mirror", help="Base URL of a mirror with the same files."),
) -> None:
    """Download NAME with checksums verified, placed atomically; credentialed datasets: where to get them."""
    try:
        from medbench.data.download import download_command

        download_command(name, data_root=data_root, data=data or [], subsets=subset or [], size=size, mirror=mirror,
                         console=_console())
    except typer.Exit:
        raise
    except Exception as err:
        _fail(err)


@data_app.command("inspect")
def data_inspect(
    task: str = typer.Argument(..., help="Task whose data to inspect (see 'medbench list tasks')."),
    data_root: Optional[Path] = typer.Option(None, "--data-root", help="Folder with one sub-folder per dataset."),
    data: Optional[List[str]] = typer.Option(None, "--data", help="NAME=PATH for one dataset (repeatable)."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    tasks_dir: Optional[List[Path]] = TASKS_DIR_OPT,
    allow_outside_data_root: bool = ALLOW_OUTSIDE_OPT,
) -> None:
    """Splits, patients, label and attribute counts of TASK from its label files (images may be absent)."""
    try:
        from medbench.catalog import Catalog
        from medbench.data.inspect import inspect_task
        from medbench.data.locate import DataLocations

        summary = inspect_task(Catalog(tasks_dir or []).task(task),
                               DataLocations.from_cli(data_root, data or [], allow_outside_root=allow_outside_data_root))
    except typer.Exit:
        raise
    except Exception as err:
        _fail(err)
        return
    if as_json:
        print(json.dumps(summary, indent=2, default=str))
        return
    _print_inspection(summary)


@app.command()
def paired(
    runs_a: Path = typer.Argument(..., help="Runs of backbone A: a run folder or a folder above its seeds."),
    runs_b: Path = typer.Argument(..., help="Runs of backbone B on the same task(s)."),
    metric: str = typer.Option("auc", "--metric", "-m", help="Test metric (e.g. auc, accuracy, auc/Edema, ece)."),
    ood: Optional[str] = typer.Option(None, "--ood", help="Compare on this OOD target instead of the test split."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Paired bootstrap comparison of A and B on the same test resamples (seeds averaged per side)."""
    try:
        from medbench.errors import UsageError
        from medbench.results import find_run_dirs
        from medbench.scoring.paired import compare_runs

        sides = []
        for p in (runs_a, runs_b):
            runs = find_run_dirs([p])
            if not runs:
                raise UsageError("no completed run folders found", where=p, field="RUN_DIR")
            by_task: dict = {}
            for r in runs:
                res = r.result()
                if not res.get("variant"):
                    by_task.setdefault(res["task"], []).append(r)
            sides.append(by_task)
        tasks = sorted(set(sides[0]) & set(sides[1]))
        if not tasks:
            raise UsageError("the two sides share no task", where=f"{runs_a}, {runs_b}", field="RUN_DIR")
        path = ("ood", ood, metric) if ood else ("test", metric)
        results = {t: compare_runs(sides[0][t], sides[1][t], path) for t in tasks}
    except typer.Exit:
        raise
    except Exception as err:
        _fail(err)
        return
    if as_json:
        print(json.dumps(results, indent=2))
        return
    from rich.table import Table

    table = Table(title=f"paired bootstrap: A - B, {'/'.join(path)} (seed means)")
    for col in ("task", "A", "B", "A - B", "interval", "p", "better", "seeds A/B"):
        table.add_column(col)
    for t, r in results.items():
        ci = r["ci"]
        fmt = lambda v: "undefined" if v is None else f"{v:.4f}"  # noqa: E731
        table.add_row(t, fmt(r["a"]), fmt(r["b"]), fmt(r["delta"]),
                      f"[{ci['low']:.4f}, {ci['high']:.4f}] ({r['level']:.0%})" if ci else "-",
                      f"{r['p_value']:.4f}" if r["p_value"] is not None else "-", r["better"] or "n.s.",
                      f"{r['seeds']['a']}/{r['seeds']['b']}")
    _console().print(table)


def _print_inspection(summary: dict) -> None:
    from rich.table import Table

    con = _console()
    con.print(f"task {summary['task']} (dataset {summary['dataset']}, adapter {summary['adapter']}, "
              f"root {summary['root'] or '-'}): {summary['n']:,} images, {summary['patients']:,} patients")
    splits = summary["splits"]
    table = Table(title="labels per split: positive / negative / missing")
    table.add_column("label")
    for name, part in splits.items():
        table.add_column(f"{name} ({part['n']:,} img, {part['patients']:,} pat)")
    labels = next(iter(splits.values()))["labels"]
    for label in labels:
        table.add_row(label, *[f"{p['labels'][label]['pos']:,} / {p['labels'][label]['neg']:,} / "
                               f"{p['labels'][label]['missing']:,}" for p in splits.values()])
    con.print(table)
    attrs = Table(title="attributes per split")
    attrs.add_column("attribute")
    attrs.add_column("value")
    for name in splits:
        attrs.add_column(name)
    for attr, values in next(iter(splits.values()))["attributes"].items():
        every = sorted({v for p in splits.values() for v in p["attributes"].get(attr, {})})
        for v in every:
            attrs.add_row(attr, v, *[f"{p['attributes'][attr].get(v, 0):,}" for p in splits.values()])
    con.print(attrs)
    if summary["images"] == "files":
        con.print(f"image files: {summary['files_checked']:,} checked, {summary['missing_files']:,} missing"
                  + (f" (e.g. {', '.join(summary['missing_examples'][:3])})" if summary["missing_files"] else ""))
    for key, value in summary["notes"].items():
        con.print(f"{key}: {value}", soft_wrap=True)


@app.command()
def transfusion(
    task: List[str] = typer.Option(..., "--task", "-t", help="Task to study (repeatable; one report per task)."),
    backbones: Optional[str] = typer.Option(None, "--backbones", help="Comma-separated backbones (default: resnet50,cbr-large-t,cbr-large-w,cbr-small,cbr-tiny)."),
    inits: Optional[str] = typer.Option(None, "--inits", help="Comma-separated init schemes (default: random,pretrained,mean-var,transfusion:1,transfusion:3)."),
    weights: Optional[List[str]] = typer.Option(None, "--weights", help="NAME=FILE pre-trained weights of one backbone (repeatable); FILE alone with one backbone."),
    freeze: Optional[List[str]] = typer.Option(None, "--freeze", help="Also run pretrained with frozen features: head or L (repeatable)."),
    similarity: str = typer.Option("cka", "--similarity", help="cka | svcca | cka,svcca."),
    seeds: Optional[int] = typer.Option(None, "--seeds", min=1, help="Seeds 0..N-1 (default: the task's)."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", min=1, help="Cap the schedule at N steps."),
    data_root: Optional[Path] = typer.Option(None, "--data-root", help="Folder with one sub-folder per dataset."),
    data: Optional[List[str]] = typer.Option(None, "--data", help="NAME=PATH for one dataset (repeatable)."),
    out: Path = typer.Option(Path("medbench-results"), "--out", "-o", help="Output folder (run store + report)."),
    tasks_dir: Optional[List[Path]] = TASKS_DIR_OPT,
    engine: EngineChoice = typer.Option(EngineChoice.deepspeed, "--engine", help="deepspeed, or plain torch (explicit only)."),
    micro_batch: Optional[int] = typer.Option(None, "--micro-batch", min=1, help="Per-device micro-batch (gradient accumulation)."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="CPU threads for torch (default: all cores)."),
    fail_fast: bool = typer.Option(False, "--fail-fast", help="Stop at the first failed run."),
    allow_outside_data_root: bool = ALLOW_OUTSIDE_OPT,
) -> None:
    """RZ19's Transfusion study on TASK: random vs pretrained vs Mean-Var vs transfusion-K, CBR vs ResNet-50;
    tables like RZ19 Tables 1-2, per-layer similarity and convergence plots."""
    try:
        _transfusion(tasks=task, backbones=backbones, inits=inits, weights=weights or [], freeze=freeze or [],
                     similarity=similarity, seeds=seeds, max_steps=max_steps, data_root=data_root, data=data or [],
                     out=out, tasks_dir=tasks_dir or [], engine=engine.value, micro_batch=micro_batch, threads=threads,
                     fail_fast=fail_fast, allow_outside_data_root=allow_outside_data_root)
    except typer.Exit:
        raise
    except Exception as err:
        _fail(err)


def _transfusion(*, tasks, backbones, inits, weights, freeze, similarity, seeds, max_steps, data_root, data, out,
                 tasks_dir, engine, micro_batch, threads, fail_fast, allow_outside_data_root=False) -> None:
    from rich.markdown import Markdown

    from medbench.catalog import Catalog
    from medbench.data.locate import DataLocations
    from medbench.recipes.transfusion import (DEFAULT_BACKBONES, DEFAULT_INITS, RecipeConfig, markdown_table,
                                              parse_weights, run_recipe, similarity_markdown, split_list)
    from medbench.results import RunStore
    from medbench.runner import Runner, configure_torch
    from medbench.train.finetune import EngineConfig

    catalog = Catalog(tasks_dir)
    for t in tasks:
        catalog.task(t)
    bbs = split_list(backbones, DEFAULT_BACKBONES, "backbones")
    locations = DataLocations.from_cli(data_root, data, allow_outside_root=allow_outside_data_root)
    configure_torch(threads or os.cpu_count())
    _check_writable(out)
    failed = []
    with _RichReporter() as reporter:
        runner = Runner(catalog, locations, RunStore(out), reporter=reporter, fail_fast=fail_fast)
        for t in tasks:
            n = seeds or catalog.task(t).spec.default_seeds
            cfg = RecipeConfig(task=t, backbones=bbs, inits=split_list(inits, DEFAULT_INITS, "inits"),
                               weights=parse_weights(weights, bbs), seeds=tuple(range(n)), max_steps=max_steps,
                               engine=EngineConfig(engine=engine, micro_batch_size=micro_batch), freeze=tuple(freeze),
                               similarity=similarity)
            outcomes, report, files = run_recipe(cfg, catalog, runner, out)
            failed += [o for o in outcomes if o.status == "failed"]
            con = _console()
            reused = sum(o.status == "skipped" for o in outcomes)
            if reused:
                con.print(f"{reused} run(s) were already complete and reused.")
            con.print(Markdown(f"**{t}: Table 1**\n\n" + markdown_table(report["table1"])
                               + f"\n**{t}: Table 2**\n\n" + markdown_table(report["table2"])
                               + f"\n**{t}: similarity per layer**\n\n" + similarity_markdown(report)))
            for name, path in files.items():
                con.print(f"{name}: {path}")
    for o in failed:
        _console().print(f"[red]failed[/red] {o.request.task} {o.request.backbone} {o.request.init} seed "
                         f"{o.request.seed}: {o.error}", soft_wrap=True)
    sys.stdout.flush()
    if failed:
        raise typer.Exit(1)


class _RichReporter:
    """Progress bars for a suite: one for runs, one for the steps of the current run."""

    def __enter__(self):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=_console(stderr=True),
                                 transient=False, disable=not sys.stderr.isatty() and not os.environ.get("MEDBENCH_PROGRESS"))
        self.progress.__enter__()
        self.suite_bar = None
        self.step_bar = None
        return self

    def __exit__(self, *exc):
        self.progress.__exit__(*exc)

    def run_started(self, index, total, request, steps) -> None:
        if self.suite_bar is None:
            self.suite_bar = self.progress.add_task("runs", total=total, info="")
        if self.step_bar is not None:
            self.progress.remove_task(self.step_bar)
        self.step_bar = self.progress.add_task(f"{request.task} seed {request.seed}", total=steps, info="")

    def step(self, step, loss) -> None:
        if self.step_bar is not None:
            self.progress.update(self.step_bar, completed=step + 1, info=f"loss {loss:.4f}")

    def run_finished(self, outcome) -> None:
        if self.suite_bar is None:
            self.suite_bar = self.progress.add_task("runs", total=None, info="")
        self.progress.advance(self.suite_bar)
        if outcome.status == "failed":
            self.progress.console.print(f"[red]failed[/red] {outcome.request.task} seed {outcome.request.seed}: "
                                        f"{outcome.error}", soft_wrap=True)

    def message(self, text) -> None:
        self.progress.console.print(text)


def _click_exception_types() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """(argument errors, aborts) of the click that typer uses (vendored since typer 0.29, or click)."""
    errors: list[type] = [t for t in (getattr(typer, "TyperException", None),) if t is not None]
    aborts: list[type] = [typer.Abort, KeyboardInterrupt]
    try:
        import click

        errors.append(click.ClickException)
        aborts.append(click.exceptions.Abort)
    except ImportError:  # pragma: no cover - typer vendors click
        pass
    return tuple(errors), tuple(aborts)


def main(argv: list[str] | None = None) -> None:
    """The ``medbench`` entry point: every error is one line on stderr (``--debug``: a traceback)."""
    usage_errors, aborts = _click_exception_types()
    try:
        code = app(args=argv, prog_name="medbench", standalone_mode=False)
    except usage_errors as err:
        if type(err).__name__ == "NoArgsIsHelpError":  # bare ``medbench``: the help text
            err.show()
            code = err.exit_code
        else:  # typer/click's own argument errors (missing option, bad value, unknown command, ...)
            ctx = getattr(err, "ctx", None)
            where = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
            print(f"medbench: error: {' '.join(err.format_message().split())}{where}", file=sys.stderr)
            code = getattr(err, "exit_code", 2) or 2
    except aborts:
        print("medbench: interrupted; completed runs are kept", file=sys.stderr)
        code = 130
    except Exception as err:  # an error outside the commands' own handling: still one line
        if _DEBUG["on"]:
            raise
        print(f"medbench: error: unexpected {type(err).__name__}: {' '.join(str(err).split())} "
              "(--debug shows the traceback)", file=sys.stderr)
        code = 2
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
