"""``medbench list backbones|tasks|suites``."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer

from medbench.cli.app import TASKS_DIR_OPT, app
from medbench.cli.console import console, fail, normalization_label, row


class ListWhat(str, Enum):
    backbones = "backbones"
    tasks = "tasks"
    suites = "suites"


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
        fail(err)
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
                 "normalization": normalization_label(r["mean"], r["std"])} for r in rows]
    for col in rows[0]:
        table.add_column(col)
    for r in rows:
        row(table, *["" if v is None else (f"{v:,}" if isinstance(v, int) else str(v)) for v in r.values()])
    console().print(table)


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
        # foundation encoders (medbench.backbones.foundation; open_clip and transformers: medbench[foundation])
        for name, family, weights in (("timm/hf-hub:<org>/<name>", "timm", "hf-hub:<org>/<name>"),
                                      ("open_clip/<model>[:<tag>]", "open_clip", "hf-hub of the open_clip tag"),
                                      ("open_clip/hf-hub:<org>/<name>", "open_clip", "hf-hub:<org>/<name>"),
                                      ("hf/<org>/<name>", "transformers", "hf-hub:<org>/<name>")):
            rows.append({"name": name, "family": family, "pretraining": "per model config", "params": None,
                         "resolution": None, "default_init": "pretrained", "source": family, "weights": weights,
                         "mean": None, "std": None})
        return rows
    from medbench.spec.catalog import Catalog

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
