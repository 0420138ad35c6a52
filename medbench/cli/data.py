"""``medbench data download|inspect``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer

from medbench.cli.app import ALLOW_OUTSIDE_OPT, TASKS_DIR_OPT, app
from medbench.cli.console import console, fail, print_inspection

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
                         console=console())
    except typer.Exit:
        raise
    except Exception as err:
        fail(err)


@data_app.command("inspect")
def data_inspect(
    task: str = typer.Argument(..., help="Task whose data to inspect (see 'medbench list tasks')."),
    data_root: Optional[Path] = typer.Option(None, "--data-root", help="Folder with one sub-folder per dataset."),
    data: Optional[List[str]] = typer.Option(None, "--data", help="NAME=PATH for one dataset (repeatable)."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    check: bool = typer.Option(False, "--check", help="Exit 2 when 'medbench run' would refuse the task before "
                               "training (the problems are listed either way)."),
    tasks_dir: Optional[List[Path]] = TASKS_DIR_OPT,
    allow_outside_data_root: bool = ALLOW_OUTSIDE_OPT,
) -> None:
    """Splits, patients, label counts and prevalence, attribute counts of TASK from its label files (images may be
    absent), and the problems that would make 'medbench run' refuse it (--check: exit 2 when there are any)."""
    try:
        from medbench.data.inspect import inspect_task
        from medbench.data.locate import DataLocations
        from medbench.spec.catalog import Catalog

        summary = inspect_task(Catalog(tasks_dir or []).task(task),
                               DataLocations.from_cli(data_root, data or [], allow_outside_root=allow_outside_data_root))
    except typer.Exit:
        raise
    except Exception as err:
        fail(err)
        return
    if as_json:
        print(json.dumps(summary, indent=2, default=str))
    else:
        print_inspection(summary)
    if summary["problems"] and check:  # 'medbench run' would refuse this task before training
        print(f"medbench: error: {len(summary['problems'])} problem(s) would stop 'medbench run' before training; "
              f"the first: {summary['problems'][0]}", file=sys.stderr)
        raise typer.Exit(2)
