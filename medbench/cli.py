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
    code = getattr(err, "exit_code", 2) if isinstance(err, MedbenchError) else 2
    print(f"medbench: error: {err}", file=sys.stderr)
    raise typer.Exit(code)


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


TASKS_DIR_OPT = typer.Option(None, "--tasks-dir", help="Extra folder of task/suite YAML files (repeatable).")


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
    for col in rows[0]:
        table.add_column(col)
    for r in rows:
        table.add_row(*["" if v is None else (f"{v:,}" if isinstance(v, int) else str(v)) for v in r.values()])
    _console().print(table)


def _list_rows(what: ListWhat, tasks_dir: list[Path]) -> list[dict]:
    if what == ListWhat.backbones:
        from medbench.backbones.registry import list_backbones

        rows = [
            {"name": b.name, "family": b.family, "pretraining": b.pretraining, "params": b.params,
             "resolution": b.default_resolution, "default_init": b.default_init, "source": b.source,
             "weights": b.weights}
            for b in list_backbones()
        ]
        rows.append({"name": "timm/<model>", "family": "timm", "pretraining": "per timm tag", "params": None,
                     "resolution": None, "default_init": "pretrained", "source": "timm",
                     "weights": "hf-hub:timm/<model>"})
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
    freeze: Optional[str] = typer.Option(None, "--freeze", help="Frozen features: 'head' (train the head only) or L (freeze the first L blocks)."),
    similarity: Optional[str] = typer.Option(None, "--similarity", help="Per-layer similarity initial vs fine-tuned: cka | svcca | cka,svcca."),
) -> None:
    """Fine-tune BACKBONE on every task of the suites/tasks and write the leaderboard."""
    try:
        _run(backbone=backbone, suites=suite or [], tasks=task or [], seeds=seeds, data_root=data_root,
             data=data or [], out=out, max_steps=max_steps, init=init, weights=weights, dry_run=dry_run,
             tasks_dir=tasks_dir or [], engine=engine.value, zero_stage=zero_stage, precision=precision.value,
             micro_batch=micro_batch, threads=threads, fail_fast=fail_fast, assume_tflops=assume_tflops,
             freeze=freeze, similarity=similarity)
    except typer.Exit:
        raise
    except Exception as err:
        _fail(err)


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
         engine, zero_stage, precision, micro_batch, threads, fail_fast, assume_tflops, freeze=None,
         similarity=None) -> None:
    from medbench.backbones.init import parse_init, preflight
    from medbench.backbones.registry import get_backbone
    from medbench.catalog import Catalog
    from medbench.data.locate import DataLocations

    catalog = Catalog(tasks_dir)
    names = _selected_tasks(catalog, suites, tasks)
    bb = get_backbone(backbone)
    locations = DataLocations.from_cli(data_root, data)
    if dry_run:
        if init is not None:
            parse_init(init)
        _print_plan(catalog, names, backbone, seeds, locations, max_steps, assume_tflops)
        return

    from medbench.results import RunStore
    from medbench.runner import Runner, configure_torch, expand_requests
    from medbench.train.finetune import EngineConfig

    init, weights = preflight(bb, init, weights)  # a missing weights file fails here, before any run
    from medbench.analysis.similarity import parse_methods
    from medbench.train.freeze import parse_freeze

    freeze, similarity = parse_freeze(freeze, bb), ",".join(parse_methods(similarity)) or None
    configure_torch(threads or os.cpu_count())
    engine_cfg = EngineConfig(engine=engine, zero_stage=zero_stage, precision=precision, micro_batch_size=micro_batch)
    requests = []
    for name in names:
        n = seeds or catalog.task(name).spec.default_seeds
        requests += expand_requests([name], backbone, list(range(n)), init=init, weights=weights,
                                    max_steps=max_steps, engine=engine_cfg, freeze=freeze, similarity=similarity)
    store = RunStore(out)
    _check_writable(out)
    with _RichReporter() as reporter:
        runner = Runner(catalog, locations, store, reporter=reporter, fail_fast=fail_fast)
        outcomes = runner.run_all(requests)
    _finish(outcomes, store)


def _check_writable(out: Path) -> None:
    from medbench.errors import UsageError

    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".medbench-write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise UsageError(f"output folder is not writable: {err.strerror}", where=out, field="--out") from err


def _finish(outcomes, store) -> None:
    from medbench.leaderboard import write_leaderboard
    from medbench.train.distributed import prepare_environment

    if not prepare_environment().is_main:
        return
    done = [o.run_dir for o in outcomes if o.status in ("ok", "skipped") and o.run_dir is not None]
    board = write_leaderboard(done, store.leaderboard_path())
    _print_board(board)
    failed = [o for o in outcomes if o.status == "failed"]
    skipped = sum(o.status == "skipped" for o in outcomes)
    con = _console()
    if skipped:
        con.print(f"{skipped} run(s) were already complete and reused.")
    for o in failed:
        con.print(f"[red]failed[/red] {o.request.task} seed {o.request.seed}: {o.error}", soft_wrap=True)
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

    table = Table(title="medbench results (test split; mean ± std over seeds)")
    for col in ("task", "backbone", "init", "headline", "value", "accuracy", "seeds", "OOD"):
        table.add_column(col)
    for e in board["entries"]:
        ood = "; ".join(f"{name}: {_fmt(m.get(e['headline']['metric']))}" for name, m in e.get("ood", {}).items())
        init = e["init"] + (f" ({e['variant']})" if e.get("variant") else "")
        table.add_row(e["task"], e["backbone"], init, e["headline"]["metric"], _fmt(e["headline"]),
                      _fmt(e["metrics"].get("accuracy")), str(len(e["seeds"])), ood or "-")
    _console().print(table)


def _print_plan(catalog, names, backbone, seeds, locations, max_steps, assume_tflops) -> None:
    from rich.table import Table

    from medbench.plan import plan_runs

    plans = plan_runs(catalog, names, backbone, seeds, locations, max_steps=max_steps, assume_tflops=assume_tflops)
    table = Table(title=f"plan: {backbone} on {len(plans)} task(s)")
    for col in ("task", "dataset", "data", "n_train", "steps", "batch", "input", "seeds", "GFLOP/img",
                "PFLOP/run", "h/run"):
        table.add_column(col)
    total_h = 0.0
    for p in plans:
        n = f"{p.n_train:,} ({p.n_train_source})" if p.n_train else "unknown"
        h = p.hours_per_run
        total_h += (h or 0.0) * p.seeds
        table.add_row(p.task, p.dataset, p.data_status, n, str(p.steps or "?"), str(p.batch_size),
                      f"{p.resize}->{p.crop}", str(p.seeds), f"{p.gflops_per_image:.1f}",
                      f"{p.train_pflops_per_run:.2f}" if p.train_pflops_per_run else "?",
                      f"{h:.2f}" if h is not None else "?")
    con = _console()
    con.print(table)
    runs = sum(p.seeds for p in plans)
    con.print(f"{runs} runs; estimated {total_h:.1f} device-hours at {assume_tflops:g} TFLOP/s sustained "
              "(training only; schedules of tasks with unknown size not counted)")
    for p in plans:
        if p.data_status in ("missing", "incomplete"):
            where = p.data_path or f"--data {p.dataset}=PATH or --data-root DIR"
            con.print(f"[yellow]missing[/yellow] dataset {p.dataset!r} for {p.task} (looked in {where}): {p.how_to_get}")


@app.command()
def score(
    run_dirs: List[Path] = typer.Argument(..., help="Run folders, or folders above them."),
) -> None:
    """Recompute every score of finished runs from their saved predictions (no retraining)."""
    try:
        from medbench.errors import UsageError
        from medbench.results import find_run_dirs
        from medbench.scoring.runs import rescore

        runs = find_run_dirs(run_dirs)
        if not runs:
            raise UsageError("no completed run folders found", where=", ".join(map(str, run_dirs)), field="RUN_DIR")
        for r in runs:
            scores = rescore(r)
            print(f"{r.path}: " + json.dumps({k: v for k, v in scores["test"].items() if "/" not in k}))
    except typer.Exit:
        raise
    except Exception as err:
        _fail(err)


@app.command()
def leaderboard(
    run_dirs: List[Path] = typer.Argument(..., help="Run folders, or folders above them."),
    output: Path = typer.Option(..., "--output", "-o", help="Leaderboard JSON to write."),
) -> None:
    """Aggregate finished runs into one leaderboard JSON."""
    try:
        from medbench.errors import UsageError
        from medbench.leaderboard import write_leaderboard
        from medbench.results import find_run_dirs

        runs = find_run_dirs(run_dirs)
        if not runs:
            raise UsageError("no completed run folders found", where=", ".join(map(str, run_dirs)), field="RUN_DIR")
        board = write_leaderboard(runs, output)
        _print_board(board)
        print(f"leaderboard: {output}")
    except typer.Exit:
        raise
    except Exception as err:
        _fail(err)


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
) -> None:
    """RZ19's Transfusion study on TASK: random vs pretrained vs Mean-Var vs transfusion-K, CBR vs ResNet-50;
    tables like RZ19 Tables 1-2, per-layer similarity and convergence plots."""
    try:
        _transfusion(tasks=task, backbones=backbones, inits=inits, weights=weights or [], freeze=freeze or [],
                     similarity=similarity, seeds=seeds, max_steps=max_steps, data_root=data_root, data=data or [],
                     out=out, tasks_dir=tasks_dir or [], engine=engine.value, micro_batch=micro_batch, threads=threads,
                     fail_fast=fail_fast)
    except typer.Exit:
        raise
    except Exception as err:
        _fail(err)


def _transfusion(*, tasks, backbones, inits, weights, freeze, similarity, seeds, max_steps, data_root, data, out,
                 tasks_dir, engine, micro_batch, threads, fail_fast) -> None:
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
    locations = DataLocations.from_cli(data_root, data)
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


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        print("medbench: interrupted; completed runs are kept", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
