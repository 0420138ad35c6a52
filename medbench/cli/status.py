"""``medbench status OUT``."""

from __future__ import annotations

from pathlib import Path

import typer

from medbench.cli.app import app
from medbench.cli.console import fail, print_status


@app.command()
def status(
    out: Path = typer.Argument(..., help="Output folder of 'medbench run' (the run store)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
) -> None:
    """What is queued, running, done and failed in a run store (runs and dispatched jobs)."""
    try:
        from medbench.errors import UsageError
        from medbench.run.status import collect

        if not (out / "runs").is_dir() and not (out / "jobs").is_dir():
            raise UsageError("no run store here (expected runs/ or jobs/)", where=out, field="OUT")
        print_status(collect(out), as_json)
    except typer.Exit:
        raise
    except Exception as err:
        fail(err)
