"""``medbench render`` and ``medbench compare``: leaderboards for people and for CI."""

from __future__ import annotations

import json
import sys
from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer

from medbench.board.compare import ABS_TOL, K_CI, K_SEED
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
    baseline: Path = typer.Argument(..., help="Baseline: a leaderboard JSON (e.g. leaderboards/smoke-cpu.json) or a run store (the --out folder of 'medbench run')."),
    new: Path = typer.Argument(..., help="New leaderboard JSON or run store to check against it."),
    metric: Optional[List[str]] = typer.Option(None, "--metric", "-m", help="Compare these too (repeatable): 'headline' (default), a test metric (accuracy, auc/Edema) or ood:TARGET:METRIC."),
    tolerance: float = typer.Option(ABS_TOL, "--tolerance", callback=finite, help="abs_tol: the least consistent drop of a seed mean that counts as a regression (default calibrated on benign changes: docs/regression-gate.md)."),
    k_seed: float = typer.Option(K_SEED, "--k-seed", callback=finite, help="Multiple of the standard error of the per-seed differences (paired) or of the difference of seed means (unpaired) that is tolerated."),
    k_ci: float = typer.Option(K_CI, "--k-ci", callback=finite, help="Multiple of the half-width of the paired interval of the difference (unpaired: of the combined test-resampling intervals) that is tolerated."),
    allow_missing: bool = typer.Option(False, "--allow-missing", help="Entries missing from NEW do not fail the gate."),
    allow_changed_data: bool = typer.Option(False, "--allow-changed-data", help="Entries whose task hash or dataset fingerprint differ are compared (unpaired) instead of a usage error."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable report on stdout."),
    markdown: Optional[Path] = typer.Option(None, "--markdown", help="Also write the report as Markdown (e.g. a pull-request comment) to this file; '-' prints it instead of the table."),
) -> None:
    """Regression gate: exit 1 when NEW is worse than BASELINE beyond the tolerance, or holds what is not a number (0 pass, 2 usage error)."""
    try:
        from medbench.board.compare import Tolerance, compare_sides, load_side
        from medbench.errors import UsageError

        if min(tolerance, k_seed, k_ci) < 0:
            raise UsageError("expected non-negative numbers", field="--tolerance/--k-seed/--k-ci")
        note = lambda text: print(text, file=sys.stderr)  # noqa: E731  (runs re-scored from their predictions)
        base_side = load_side(baseline, "BASELINE", note)
        new_side = load_side(new, "NEW", note)
        metrics = list(dict.fromkeys(["headline", *(metric or [])]))
        report = compare_sides(base_side, new_side, metrics, Tolerance(tolerance, k_seed, k_ci), allow_missing,
                               allow_changed_data)
        text = None
        if markdown is not None:
            from medbench.board.render import render_compare_markdown

            text = render_compare_markdown(report)
            if str(markdown) != "-":
                from medbench.utils import atomic_write_text

                atomic_write_text(markdown, text)
    except typer.Exit:
        raise
    except Exception as err:
        fail(err)
        return
    if as_json:
        print(json.dumps(report, indent=2))
    elif text is not None and str(markdown) == "-":
        print(text, end="")
    else:
        print_compare(report)
    if report["status"] != "pass":
        raise typer.Exit(1)
