"""``medbench task new NAME --csv FILE``: a commented task YAML for a dataset of one's own."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer

from medbench.cli.app import app
from medbench.cli.console import console, fail, print_inspection

task_app = typer.Typer(help="Tasks of your own: scaffold a task YAML from a CSV.", no_args_is_help=True)
app.add_typer(task_app, name="task")


class TaskType(str, Enum):
    binary = "binary"
    multiclass = "multiclass"
    multilabel = "multilabel"


@task_app.command("new")
def task_new(
    name: str = typer.Argument(..., help="Task name (lower case, digits, '.', '_', '-'); also the dataset name."),
    csv: Path = typer.Option(..., "--csv", help="The CSV of image paths and labels (inside the dataset folder)."),
    root: Optional[Path] = typer.Option(None, "--root", help="The dataset folder (default: the CSV's folder)."),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="Dataset name, the key of --data NAME=FOLDER "
                                          "(default: the task name; tasks over one folder can share it)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Where to write the YAML (default: tasks/NAME.yaml)."),
    label: Optional[List[str]] = typer.Option(None, "--label", help="Label column (repeatable: 0/1 columns of a "
                                              "multilabel task); default: proposed from the CSV."),
    task_type: Optional[TaskType] = typer.Option(None, "--type", help="binary | multiclass | multilabel "
                                                 "(default: from the label columns)."),
    patient: Optional[str] = typer.Option(None, "--patient", help="Patient id column (default: proposed)."),
    path: Optional[str] = typer.Option(None, "--path", help="Image path column (default: proposed)."),
    separator: str = typer.Option(",", "--separator", help="CSV field separator (one character)."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing file at --out."),
) -> None:
    """Propose a task YAML from what the CSV holds (path, patient, split, label and attribute columns), write it
    with every choice commented, and print what 'medbench data inspect' sees with it."""
    try:
        import re
        import tempfile

        from medbench.data.inspect import inspect_task
        from medbench.data.locate import DataLocations
        from medbench.data.scaffold import checked_proposal, propose, task_yaml
        from medbench.errors import OutputError, UsageError
        from medbench.spec import parse_task_file

        if not re.match(r"^[a-z0-9][a-z0-9._-]*$", name):
            raise UsageError(f"task name {name!r}: lower case letters, digits, '.', '_' and '-', starting with a "
                             "letter or digit", field="NAME")
        target = out or Path("tasks") / f"{name}.yaml"
        if target.exists() and not force:
            raise OutputError("exists; choose another --out or pass --force to replace it", where=target,
                              field="--out")
        proposal = propose(name, csv, root=root, labels=label or [], task_type=task_type.value if task_type else None,
                           patient=patient, path=path, separator=separator, dataset=dataset)
        with tempfile.TemporaryDirectory() as tmp:
            proposal, problems = checked_proposal(proposal, Path(tmp))
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(task_yaml(proposal), encoding="utf-8")
        summary = inspect_task(parse_task_file(target), DataLocations(overrides={proposal.dataset: proposal.root}))
    except typer.Exit:
        raise
    except Exception as err:
        fail(err)
        return
    con = console()
    con.print(f"wrote {target}: {proposal.type} task, labels {proposal.labels}; read it and change what is wrong",
              markup=False, soft_wrap=True)
    print_inspection(summary)
    tasks_dir = target.parent
    data = f"--data {proposal.dataset}={proposal.root}"
    con.print(f"next: medbench data inspect {name} --tasks-dir {tasks_dir} {data}\n"
              f"      medbench run --backbone BACKBONE --task {name} --tasks-dir {tasks_dir} {data} --dry-run",
              markup=False, soft_wrap=True)
    if problems:
        con.print(f"fix them in {target} (the problems above), then check again with the first command",
                  markup=False, soft_wrap=True)
