"""Console output of the commands: one-line errors, tables (rich), progress."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import typer

DEBUG = {"on": False}


def console(stderr: bool = False):
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() else 200  # logs and pipes get whole rows
    return Console(stderr=stderr, highlight=False, width=width)


def fail(err: BaseException) -> None:
    """Print a user error in one line and exit with its code."""
    from medbench.errors import MedbenchError

    if DEBUG["on"]:
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


def interrupted(err: KeyboardInterrupt) -> None:
    """Ctrl-C / SIGTERM: say what is kept and how to go on, exit 128 + signal."""
    detail = f" ({err})" if str(err) else ""
    print(f"medbench: interrupted{detail}; completed runs are kept and interrupted runs resume from their last "
          "checkpoint: rerun the same command", file=sys.stderr)
    raise typer.Exit(getattr(err, "exit_code", 130))


def normalization_label(mean, std) -> str:
    """``ImageNet``, ``per timm config``, else the numbers (one when the three channels agree)."""
    from medbench.backbones.backbone import IMAGENET_MEAN, IMAGENET_STD

    if mean is None or std is None:
        return "per timm config"
    if tuple(mean) == IMAGENET_MEAN and tuple(std) == IMAGENET_STD:
        return "ImageNet"

    def triple(values) -> str:
        return f"{values[0]:g}" if len(set(values)) == 1 else ",".join(f"{v:g}" for v in values)

    return f"mean {triple(mean)} std {triple(std)}"


def _fmt(summary: dict | None, pct: bool = False) -> str:
    if not summary or summary.get("mean") is None:
        return "undefined"
    scale = 100.0 if pct else 1.0
    m = summary["mean"] * scale
    s = summary.get("std")
    return f"{m:.4f}" if s is None else f"{m:.4f} ± {s * scale:.4f}"


def print_board(board: dict) -> None:
    from rich.markup import escape
    from rich.table import Table

    from medbench.board.render import temperature_text, warning_codes, warning_lines

    table = Table(title="medbench results (test split; mean ± std over seeds, interval of the mean over test resamples)")
    for col in ("task", "backbone", "init", "headline", "value", "interval", "accuracy", "seeds", "OOD (drop)",
                "ECE → T-scaled", "temperature", "largest AUC gap", "warnings"):
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
                      _fmt(e["metrics"].get("accuracy")), str(len(e["seeds"])), ood or "-", ece, temperature_text(e),
                      _largest_gap(e), warning_codes(e))
    con = console()
    con.print(table)
    for e in board["entries"]:
        for line in warning_lines(e):
            init = e["init"] + (f" ({e['regime']})" if e.get("regime") else "")
            con.print(f"[yellow]warning[/yellow] {escape(e['task'])} · {escape(e['backbone'])} · {escape(init)}: "
                      f"{escape(line)}", soft_wrap=True)


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


def print_plan(plans: list, backbone: str, assume_tflops: float) -> None:
    """The ``--dry-run`` table of :func:`medbench.run.plan.plan_runs` and what it implies."""
    from rich.table import Table

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
    con = console()
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


def score_line(scores: dict) -> str:
    """One line per run: headline metrics with intervals and the axes' key numbers."""
    parts = []
    for k, v in scores.get("test", {}).items():
        if "/" in k or v is None:
            continue
        ci = scores.get("ci", {}).get("test", {}).get(k)
        parts.append(f"{k} {v:.4f}" + (f" [{ci['low']:.4f}, {ci['high']:.4f}]" if ci else ""))
    cal = scores.get("calibration")
    if cal and cal["before"].get("ece") is not None and cal["after"].get("ece") is not None:
        status = sorted(set((cal.get("temperature_status") or {}).values()))
        parts.append(f"ECE {cal['before']['ece']:.4f} -> {cal['after']['ece']:.4f} (temperature scaling: "
                     f"{', '.join(status) or '-'})")
    for name, attr in (scores.get("fairness") or {}).get("attributes", {}).items():
        if len(attr.get("attributes", [])) == 1 and attr.get("gap", {}).get("auc") is not None:
            parts.append(f"AUC gap {name} {attr['gap']['auc']:.4f} (worst {attr['worst_group']['auc']})")
    for name, s in (scores.get("shift") or {}).items():
        for m, v in s.items():
            if isinstance(v, dict) and v.get("drop") is not None:
                parts.append(f"{name} {m} drop {v['drop']:.4f}")
    return "; ".join(parts)


def print_published(board: dict) -> None:
    from rich.table import Table

    from medbench.board.published import published_for
    from medbench.board.render import label, published_value

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
    console().print(table)


def print_compare(report: dict) -> None:
    from rich.markup import escape
    from rich.table import Table

    from medbench.board.render import COMPARE_COLUMNS, compare_cells, compare_lists, compare_status, compare_summary

    new, base = report["new"], report["baseline"]
    table = Table(title=f"medbench compare: {new['path']} ({new['kind']}) against {base['path']} ({base['kind']}); "
                        "worse by > tolerance fails")
    for col in COMPARE_COLUMNS:
        table.add_column(col)
    for r in report["rows"]:
        status = escape(compare_status(r))
        status = f"[green]{status}[/green]" if r["passed"] else f"[red]{status}[/red]"
        table.add_row(*[escape(c) for c in compare_cells(r)], status)
    con = console()
    con.print(table)
    colors = {"duplicate": "red", "missing": "red" if not report["allow_missing"] else "yellow", "added": "yellow",
              "changed data": "yellow", "note": "dim"}
    for kind, text in compare_lists(report):
        con.print(f"[{colors[kind]}]{kind}[/{colors[kind]}] {escape(text)}", soft_wrap=True)
    verdict = "[green]pass[/green]" if report["status"] == "pass" else "[red]regression[/red]"
    rule = report["rule"]
    con.print(f"{verdict}: {compare_summary(report)} (abs_tol {rule['abs_tol']:g}, k_seed {rule['k_seed']:g}, "
              f"k_ci {rule['k_ci']:g})")


def print_status(report: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(report, indent=2))
        return
    from rich.table import Table

    con = console()
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


def print_inspection(summary: dict) -> None:
    from rich.table import Table

    con = console()
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


class RichReporter:
    """Progress bars for a suite: one for runs, one for the steps of the current run."""

    def __enter__(self):
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=console(stderr=True),
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
