"""``medbench score``, ``medbench leaderboard``, ``medbench paired``: scores and their aggregation."""

from __future__ import annotations

import json
import sys
from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer

from medbench.cli.app import app, finite
from medbench.limits import MAX_BINS, MAX_IMAGES, MAX_INTERSECTIONS, MAX_RESAMPLES
from medbench.cli.console import console, fail, plain, print_board, print_published, row, safe, score_line


class BinningChoice(str, Enum):
    uniform = "uniform"
    adaptive = "adaptive"


@app.command()
def score(
    run_dirs: List[Path] = typer.Argument(..., help="Run folders, or folders above them."),
    bootstrap: Optional[int] = typer.Option(None, "--bootstrap", min=0, max=MAX_RESAMPLES, help="Bootstrap resamples for intervals (0: none; default: the task's, 1000)."),
    ci_level: Optional[float] = typer.Option(None, "--ci-level", callback=finite, help="Confidence level of the intervals (default 0.95)."),
    threshold: Optional[str] = typer.Option(None, "--threshold", help="Fairness operating point chosen on validation: youden, or sensitivity:0.9."),
    ece_bins: Optional[int] = typer.Option(None, "--ece-bins", min=1, max=MAX_BINS, help="Calibration bins (default 15)."),
    ece_binning: Optional[BinningChoice] = typer.Option(None, "--ece-binning", help="uniform (equal width) or adaptive (equal mass)."),
    min_group_size: Optional[int] = typer.Option(None, "--min-group-size", min=1, max=MAX_IMAGES, help="Smallest subgroup scored (default 20 images)."),
    intersections: Optional[int] = typer.Option(None, "--intersections", min=1, max=MAX_INTERSECTIONS, help="Cross up to this many attributes (default 2)."),
) -> None:
    """Recompute every score and axis of finished runs from their saved predictions (no retraining)."""
    try:
        from medbench.errors import UsageError
        from medbench.store import find_run_dirs
        from medbench.store.scores import rescore
        from medbench.utils import undefined_numbers_reported

        overrides = _scoring_overrides(bootstrap, ci_level, threshold, ece_bins, ece_binning, min_group_size,
                                       intersections)
        runs = find_run_dirs(run_dirs)
        if not runs:
            raise UsageError("no completed run folders found", where=", ".join(map(str, run_dirs)), field="RUN_DIR")
        for r in runs:
            with undefined_numbers_reported():
                scores = rescore(r, overrides)
            print(plain(f"{r.path}: {score_line(scores)}"))
            for w in scores.get("warnings", []):
                print(plain(f"  warning [{w['code']}] {w['message']}"))
    except typer.Exit:
        raise
    except Exception as err:
        fail(err)


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
            if not 0 < out["target_sensitivity"] <= 1:  # also refuses nan and inf
                raise UsageError(f"target sensitivity must be in (0, 1], got {target!r}", field="--threshold")
    if ci_level is not None and not 0 < ci_level < 1:
        raise UsageError(f"must be between 0 and 1, got {ci_level}", field="--ci-level")
    return out


@app.command()
def leaderboard(
    run_dirs: List[Path] = typer.Argument(..., help="Run folders, or folders above them."),
    output: Path = typer.Option(..., "--output", "-o", help="Leaderboard JSON to write."),
    baseline: Optional[str] = typer.Option(None, "--baseline", help="Baseline backbone (NAME or NAME@INIT): adds paired comparisons, data-efficiency area, convergence and resolution relative to it."),
    published: bool = typer.Option(False, "--published", help="Also show the papers' published rows (CJ21, RZ19) for the same tasks."),
) -> None:
    """Aggregate finished runs into one leaderboard JSON (validated against the shipped JSON Schema)."""
    try:
        from medbench.board.aggregate import write_leaderboard
        from medbench.utils import undefined_numbers_reported
        from medbench.errors import UsageError
        from medbench.store import find_run_dirs
        from medbench.store.scores import rescore_outdated

        runs = find_run_dirs(run_dirs)
        if not runs:
            raise UsageError("no completed run folders found", where=", ".join(map(str, run_dirs)), field="RUN_DIR")
        rescore_outdated(runs, lambda text: console().print(safe(text), soft_wrap=True))  # scored by older scoring code: re-scored from the predictions
        base = None
        if baseline:
            name, _, base_init = baseline.partition("@")
            base = (name, base_init or None)
        with undefined_numbers_reported():
            board = write_leaderboard(runs, output, base)
        print_board(board)
        if published:
            print_published(board)
        print(f"leaderboard: {output}")
    except typer.Exit:
        raise
    except Exception as err:
        fail(err)


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
        from medbench.board.paired import compare_runs
        from medbench.errors import UsageError
        from medbench.store import find_run_dirs
        from medbench.store.scores import rescore_outdated

        sides = []
        for p in (runs_a, runs_b):
            runs = find_run_dirs([p])
            if not runs:
                raise UsageError("no completed run folders found", where=p, field="RUN_DIR")
            rescore_outdated(runs, lambda text: print(plain(text), file=sys.stderr))
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
        fail(err)
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
        row(table, t, fmt(r["a"]), fmt(r["b"]), fmt(r["delta"]),
                      f"[{ci['low']:.4f}, {ci['high']:.4f}] ({r['level']:.0%})" if ci else "-",
                      f"{r['p_value']:.4f}" if r["p_value"] is not None else "-", r["better"] or "n.s.",
                      f"{r['seeds']['a']}/{r['seeds']['b']}")
    console().print(table)
