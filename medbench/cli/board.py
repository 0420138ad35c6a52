"""``medbench render`` and ``medbench compare``: leaderboards for people and for CI."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer

from medbench.cli.app import app, finite
from medbench.cli.console import fail, print_compare


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
        from medbench.board.published import published_for
        from medbench.board.render import render_html, render_markdown
        from medbench.board.schema import load_board
        from medbench.utils import atomic_write_text

        board = load_board(board_file, field="BOARD")
        rows = published_for({e["task"] for e in board["entries"]}) if published else []
        text = render_markdown(board, rows) if fmt == RenderFormat.md else render_html(board, rows)
        atomic_write_text(output, text)
        print(f"{fmt.value}: {output} ({len(text.encode()) / 1024:.0f} KiB)")
    except typer.Exit:
        raise
    except Exception as err:
        fail(err)


@app.command()
def compare(
    baseline: Path = typer.Argument(..., help="Baseline leaderboard JSON (e.g. leaderboards/smoke-cpu.json)."),
    new: Path = typer.Argument(..., help="New leaderboard JSON to check against it."),
    metric: Optional[List[str]] = typer.Option(None, "--metric", "-m", help="Compare these too (repeatable): 'headline' (default), a test metric (accuracy, auc/Edema) or ood:TARGET:METRIC."),
    tolerance: float = typer.Option(0.005, "--tolerance", callback=finite, help="Absolute tolerance: the least drop that counts as a regression."),
    k_seed: float = typer.Option(2.0, "--k-seed", callback=finite, help="Multiple of the standard error of the difference of seed means that is tolerated."),
    k_ci: float = typer.Option(1.0, "--k-ci", callback=finite, help="Multiple of the combined half-width of the test-resampling intervals that is tolerated."),
    allow_missing: bool = typer.Option(False, "--allow-missing", help="Entries missing from NEW do not fail the gate."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Regression gate: exit 1 when NEW is worse than BASELINE beyond the tolerance (0 pass, 2 usage error)."""
    try:
        from medbench.board.compare import Tolerance, compare_boards
        from medbench.board.schema import load_board
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
        fail(err)
        return
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        print_compare(report, baseline, new)
    if report["status"] != "pass":
        raise typer.Exit(1)
