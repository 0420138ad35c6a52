"""``medbench transfusion``: the RZ19 study as a recipe over ordinary runs."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from medbench.cli.app import ALLOW_OUTSIDE_OPT, TASKS_DIR_OPT, EngineChoice, app
from medbench.limits import MAX_BATCH, MAX_SEEDS, MAX_STEPS, MAX_THREADS
from medbench.cli.console import console, fail, progress_reporter, safe
from medbench.cli.run import check_writable


@app.command()
def transfusion(
    task: List[str] = typer.Option(..., "--task", "-t", help="Task to study (repeatable; one report per task)."),
    backbones: Optional[str] = typer.Option(None, "--backbones", help="Comma-separated backbones (default: resnet50,cbr-large-t,cbr-large-w,cbr-small,cbr-tiny)."),
    inits: Optional[str] = typer.Option(None, "--inits", help="Comma-separated init schemes (default: random,pretrained,mean-var,transfusion:1,transfusion:3)."),
    weights: Optional[List[str]] = typer.Option(None, "--weights", help="NAME=FILE pre-trained weights of one backbone (repeatable); FILE alone with one backbone."),
    freeze: Optional[List[str]] = typer.Option(None, "--freeze", help="Also run pretrained with frozen features: head or L (repeatable)."),
    similarity: str = typer.Option("cka", "--similarity", help="cka | svcca | cka,svcca."),
    seeds: Optional[int] = typer.Option(None, "--seeds", min=1, max=MAX_SEEDS, help="Seeds 0..N-1 (default: the task's)."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", min=1, max=MAX_STEPS, help="Cap the schedule at N steps."),
    data_root: Optional[Path] = typer.Option(None, "--data-root", help="Folder with one sub-folder per dataset."),
    data: Optional[List[str]] = typer.Option(None, "--data", help="NAME=PATH for one dataset (repeatable)."),
    out: Path = typer.Option(Path("medbench-results"), "--out", "-o", help="Output folder (run store + report)."),
    tasks_dir: Optional[List[Path]] = TASKS_DIR_OPT,
    engine: EngineChoice = typer.Option(EngineChoice.deepspeed, "--engine", help="deepspeed, or plain torch (explicit only)."),
    micro_batch: Optional[int] = typer.Option(None, "--micro-batch", min=1, max=MAX_BATCH, help="Per-device micro-batch (gradient accumulation)."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, max=MAX_THREADS, envvar="MEDBENCH_THREADS", show_envvar=True, help="CPU threads for torch (default: this process's share of the cores, as for run)."),
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
        fail(err)


def _transfusion(*, tasks, backbones, inits, weights, freeze, similarity, seeds, max_steps, data_root, data, out,
                 tasks_dir, engine, micro_batch, threads, fail_fast, allow_outside_data_root=False) -> None:
    from rich.markdown import Markdown

    from medbench.data.locate import DataLocations
    from medbench.recipes.transfusion import (
        DEFAULT_BACKBONES,
        DEFAULT_INITS,
        RecipeConfig,
        markdown_table,
        parse_weights,
        run_recipe,
        similarity_markdown,
        split_list,
    )
    from medbench.run.runner import Runner, configure_torch
    from medbench.spec.catalog import Catalog
    from medbench.store import RunStore
    from medbench.train.finetune import EngineConfig

    catalog = Catalog(tasks_dir)
    for t in tasks:
        catalog.task(t)
    bbs = split_list(backbones, DEFAULT_BACKBONES, "backbones")
    locations = DataLocations.from_cli(data_root, data, allow_outside_root=allow_outside_data_root)
    from medbench.train.distributed import cores_per_rank

    configure_torch(threads or cores_per_rank())
    check_writable(out)
    failed = []
    with progress_reporter() as reporter:
        runner = Runner(catalog, locations, RunStore(out), reporter=reporter, fail_fast=fail_fast)
        for t in tasks:
            n = seeds or catalog.task(t).spec.default_seeds
            cfg = RecipeConfig(task=t, backbones=bbs, inits=split_list(inits, DEFAULT_INITS, "inits"),
                               weights=parse_weights(weights, bbs), seeds=tuple(range(n)), max_steps=max_steps,
                               engine=EngineConfig(engine=engine, micro_batch_size=micro_batch), freeze=tuple(freeze),
                               similarity=similarity)
            outcomes, report, files = run_recipe(cfg, catalog, runner, out)
            failed += [o for o in outcomes if o.status == "failed"]
            con = console()
            reused = sum(o.status == "skipped" for o in outcomes)
            if reused:
                con.print(f"{reused} run(s) were already complete and reused.")
            con.print(Markdown(f"**{t}: Table 1**\n\n" + markdown_table(report["table1"])
                               + f"\n**{t}: Table 2**\n\n" + markdown_table(report["table2"])
                               + f"\n**{t}: similarity per layer**\n\n" + similarity_markdown(report)))
            for name, path in files.items():
                con.print(f"{safe(name)}: {safe(path)}")
    for o in failed:
        console().print(f"[red]failed[/red] {safe(o.request.task)} {safe(o.request.backbone)} {safe(o.request.init)} "
                         f"seed {o.request.seed}: {safe(o.error)}", soft_wrap=True)
    sys.stdout.flush()
    if failed:
        raise typer.Exit(1)
