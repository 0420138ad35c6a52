"""Console output of the commands: one-line errors, tables (rich), progress."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import typer

DEBUG = {"on": False}

#: control characters (C0 but tab and newline, DEL, C1): a name from a board or a data file could otherwise
#: move the cursor, retitle or clear the terminal
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def plain(value: object) -> str:
    """A value as one line of terminal text: control characters removed, whitespace runs as one space."""
    return " ".join(_CONTROL.sub("", str(value)).split())


def safe(value: object) -> str:
    """A value from data (a board, a task, a label file) inside rich markup: :func:`plain`, with rich's markup
    escaped (``[/]`` would otherwise be a markup error, ``[link=...]`` a hyperlink)."""
    from rich.markup import escape

    return escape(plain(value))


def cell(value: object, style: str | None = None):
    """A table cell that is text, never markup (rich parses ``str`` cells as markup)."""
    from rich.text import Text

    return value if isinstance(value, Text) else Text(plain(value), style=style or "")


def row(table, *cells: object) -> None:
    table.add_row(*(cell(c) for c in cells))


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
        code, text = err.exit_code, plain(err)
    else:  # not a user error: still one line; --debug shows where it came from
        code, text = 2, f"unexpected {type(err).__name__}: {plain(err)} (--debug shows the traceback)"
    print(f"medbench: error: {text}", file=sys.stderr)
    raise typer.Exit(code)


def interrupted(err: KeyboardInterrupt) -> None:
    """Ctrl-C / SIGTERM: say what is kept and how to go on, exit 128 + signal."""
    detail = f" ({err})" if str(err) else ""
    print(f"medbench: interrupted{detail}; completed runs are kept and interrupted runs resume from their last "
          "checkpoint: rerun the same command", file=sys.stderr)
    raise typer.Exit(getattr(err, "exit_code", 130))


def normalization_label(mean, std) -> str:
    """``ImageNet``, ``per model config``, else the numbers (one when the three channels agree)."""
    from medbench.backbones.backbone import IMAGENET_MEAN, IMAGENET_STD

    if mean is None or std is None:
        return "per model config"
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
    from rich.table import Table

    from medbench.board.render import label, temperature_text, warning_codes, warning_lines

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
        init = label(e)
        sig = e.get("significance") or {}  # best of its task in bold, not significantly different in italics
        value = cell(_fmt(e["headline"]), "bold" if sig.get("best") else ("italic" if sig.get("tied_with_best") else None))
        row(table, e["task"], e["backbone"], init, metric, value,
                      f"[{ci['low']:.4f}, {ci['high']:.4f}]" if ci else "-",
                      _fmt(e["metrics"].get("accuracy")), str(len(e["seeds"])), ood or "-", ece, temperature_text(e),
                      _largest_gap(e), warning_codes(e))
    con = console()
    con.print(table)
    for e in board["entries"]:
        for line in warning_lines(e):
            con.print(f"[yellow]warning[/yellow] {safe(e['task'])} · {safe(e['backbone'])} · {safe(label(e))}: "
                      f"{safe(line)}", soft_wrap=True)
    print_protocols(board)


def print_protocols(board: dict) -> None:
    """The protocols side by side (fine-tuning, linear probe, kNN), when the board has more than one."""
    from rich.table import Table

    from medbench.board.render import mark, mean_std, protocol_table

    protocols, rows = protocol_table(board)
    if not protocols:
        return
    table = Table(title="protocols side by side (headline, mean ± std over seeds; bold: best of the task in its protocol)")
    for col in ("task", "backbone", "init", "headline", *protocols):
        table.add_column(col)
    for (task, backbone, init), by in rows:
        cells = []
        for p in protocols:
            e = by.get(p)
            value = mean_std(e["headline"]) if e else "-"
            cells.append(cell(value, "bold" if e and mark(e) == "best" else None))
        row(table, task, backbone, init, next(iter(by.values()))["headline"]["metric"], *cells)
    console().print(table)


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


def duration(hours: float | None) -> str:
    """A time estimate in the unit that reads: ``40 s``, ``12.5 min``, ``3.20 h``; ``?`` when unknown."""
    if hours is None:
        return "?"
    seconds = hours * 3600
    if seconds < 1:
        return "< 1 s"
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{hours:.2f} h"


def print_plan(plans: list, backbone: str, assume_tflops: float) -> None:
    """The ``--dry-run`` table of :func:`medbench.run.plan.plan_runs` and what it implies."""
    from rich.table import Table

    table = Table(title=f"plan: {backbone} on {len(plans)} task(s); time per run at {assume_tflops:g} TFLOP/s "
                        "sustained (--assume-tflops); lr = base_lr x batch / 512")
    for col in ("task", "dataset", "data", "n_train", "steps", "batch", "lr", "input", "seeds", "GFLOP/img",
                "PFLOP/run", "time/run", "GB/device"):
        table.add_column(col)
    total_h = 0.0
    for p in plans:
        n = f"{p.n_train:,} ({p.n_train_source})" if p.n_train else "unknown"
        h = p.hours_per_run
        total_h += (h or 0.0) * p.seeds
        pflops = "?"
        if p.pflops_per_run:  # "+?": evaluation unknown (split sizes not counted), training only
            pflops = f"{p.pflops_per_run:.3g}" + ("" if p.eval_pflops_per_run is not None else "+?")
        row(table, p.task, p.dataset, p.data_status, n, str(int(p.steps)) if p.steps else "?", str(p.batch_size),
            f"{p.lr:.3g}" if p.lr is not None else "?", f"{p.resize}->{p.crop}", str(p.seeds),
            f"{p.gflops_per_image:.1f}", pflops, duration(h), _gb(p.memory))
    con = console()
    con.print(table)
    runs = sum(p.seeds for p in plans)
    no_eval = sum(1 for p in plans if p.steps and p.eval_pflops_per_run is None)
    con.print(f"{runs} runs; estimated {total_h:.1f} device-hours ({duration(total_h)}) at {assume_tflops:g} TFLOP/s "
              "sustained "
              "(training + evaluation: validation during training, val/test predictions, OOD tests; "
              "schedules of tasks with unknown size not counted"
              + (f"; evaluation of {no_eval} task(s) without counted splits not counted ('+?')" if no_eval else "")
              + ")")
    from medbench.run.plan import gpu_visible, matmul_tflops

    if not gpu_visible():  # the default rate is a GPU's: on a CPU the times above are not this machine's
        cpu = matmul_tflops()
        con.print(f"no GPU visible: the times assume {assume_tflops:g} TFLOP/s (a data-centre GPU); this CPU "
                  f"multiplies float32 matrices at {cpu:.3g} TFLOP/s (measured now) and trains at a third to a half "
                  f"of that (docs/performance.md): --assume-tflops {cpu / 2.5:.2g} estimates a run here",
                  soft_wrap=True)
    worst = max((p for p in plans if p.memory), key=lambda p: p.memory["total"], default=None)
    if worst is not None:
        m = worst.memory
        con.print(f"memory per device, largest task ({safe(worst.task)}, micro-batch {m['micro_batch']}): "
                  f"params {m['params'] / 1e9:.2f} GB + grads {m['grads'] / 1e9:.2f} + optimizer "
                  f"{m['optimizer'] / 1e9:.2f} + activations {m['activations'] / 1e9:.2f} (measured on the meta "
                  f"device{', fp32 upper bound' if m['activations_upper_bound'] else ''}) = {m['total'] / 1e9:.2f} GB; "
                  "--micro-batch N lowers the activations")
        auto, free = m.get("auto_micro_batch"), m.get("assumed_free_bytes", 0) / 1e9
        con.print(f"--micro-batch auto (the default on GPUs) on a device with {free:.0f} GB free (--assume-memory): "
                  + (f"micro-batch {auto} x {m['per_device_batch'] // auto} accumulation steps for {worst.task}, "
                     "confirmed by a trial step when the run starts" if auto else
                     f"not even 1 image of {worst.task} fits; use a smaller input or backbone"), soft_wrap=True)
    told = set()
    for p in plans:
        if p.data_status in ("missing", "incomplete"):
            where = p.data_path or f"--data {p.dataset}=PATH or --data-root DIR"
            con.print(f"[yellow]missing[/yellow] dataset {safe(repr(p.dataset))} for {safe(p.task)} (looked in "
                      f"{safe(where)}): {safe(p.how_to_get)}")
            told.add(p.dataset)
    for p in plans:  # an OOD target without data is skipped and recorded at run time: not an error
        for o in p.ood or []:
            if o["data_status"] not in ("missing", "incomplete"):
                continue
            where = o["data_path"] or f"--data {o['dataset']}=PATH or --data-root DIR"
            how = "how to get it: see above" if o["dataset"] in told else o["how_to_get"]
            told.add(o["dataset"])
            con.print(f"[yellow]OOD target[/yellow] {safe(repr(o['name']))} of {safe(p.task)} has no data (dataset "
                      f"{safe(repr(o['dataset']))}, looked in {safe(where)}); it will be skipped and recorded, not an "
                      f"error; {safe(how)}")


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
        row(table, e["task"], e["backbone"], label(e), e["headline"]["metric"], published_value(e), e["citation"],
                      f"{paper.get('target', '')} / {paper.get('column', '')}")
    if not rows:
        table.add_row("-", "-", "-", "-", "no published rows for these tasks", "-", "-")
    console().print(table)


def print_compare(report: dict) -> None:
    from rich.table import Table

    from medbench.board.render import COMPARE_COLUMNS, compare_cells, compare_lists, compare_status, compare_summary

    new, base = report["new"], report["baseline"]
    table = Table(title=safe(f"medbench compare: {new['path']} ({new['kind']}) against {base['path']} ({base['kind']}); "
                             "worse by > tolerance fails"))
    for col in COMPARE_COLUMNS:
        table.add_column(col)
    for r in report["rows"]:
        row(table, *compare_cells(r), cell(compare_status(r), "green" if r["passed"] else "red"))
    con = console()
    con.print(table)
    colors = {"duplicate": "red", "missing": "red" if not report["allow_missing"] else "yellow", "added": "yellow",
              "changed data": "yellow", "note": "dim"}
    for kind, text in compare_lists(report):
        con.print(f"[{colors[kind]}]{kind}[/{colors[kind]}] {safe(text)}", soft_wrap=True)
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
            row(table, j["name"], j["launcher"] or "-", j["job_id"] or "-", j["state"],
                          f"{j['seconds']:.0f}" if j["seconds"] is not None else "-", j["error"] or "")
        con.print(table)
    table = Table(title="runs")
    for col in ("task", "backbone", "run", "state", "checkpoint step", "error"):
        table.add_column(col)
    for r in report["runs"]:
        row(table, r["task"], r["backbone"], r["run"], r["state"],
                      str(r["checkpoint_step"]) if r["checkpoint_step"] else "-", r["error"] or "")
    con.print(table)
    for what, counts in report["counts"].items():
        con.print(f"{what}: " + ", ".join(f"{n} {c}" for c, n in counts.items()))


def print_inspection(summary: dict) -> None:
    from rich.table import Table

    con = console()
    con.print(f"task {safe(summary['task'])} (dataset {safe(summary['dataset'])}, adapter {safe(summary['adapter'])}, "
              f"root {safe(summary['root'] or '-')}): {summary['n']:,} images, {summary['patients']:,} patients")
    splits = summary["splits"]
    table = Table(title="labels per split: positive / negative / missing (prevalence: positive share of the "
                        "labelled images)")
    table.add_column("label")
    for name, part in splits.items():
        table.add_column(f"{name} ({part['n']:,} img, {part['patients']:,} pat)")
    labels = next(iter(splits.values()))["labels"]

    def prevalence_cell(c: dict) -> str:
        prev = c.get("prevalence")
        return (f"{c['pos']:,} / {c['neg']:,} / {c['missing']:,}"
                + (f" ({100 * prev:.1f} %)" if prev is not None else ""))

    for label in labels:
        row(table, label, *[prevalence_cell(p["labels"][label]) for p in splits.values()])
    con.print(table)
    attrs = Table(title="attributes per split")
    attrs.add_column("attribute")
    attrs.add_column("value")
    for name in splits:
        attrs.add_column(name)
    for attr, values in next(iter(splits.values()))["attributes"].items():
        every = sorted({v for p in splits.values() for v in p["attributes"].get(attr, {})})
        for v in every:
            row(attrs, attr, v, *[f"{p['attributes'][attr].get(v, 0):,}" for p in splits.values()])
    con.print(attrs)
    if summary["images"] == "files":
        con.print(f"image files: {summary['files_checked']:,} checked, {summary['missing_files']:,} missing"
                  + (f" (e.g. {safe(', '.join(summary['missing_examples'][:3]))})" if summary["missing_files"] else ""))
    for key, value in summary["notes"].items():
        con.print(f"{safe(key)}: {safe(value)}", soft_wrap=True)
    problems = summary.get("problems") or []
    for problem in problems:  # what would stop 'medbench run' before training
        con.print(f"[red]problem[/red]: {safe(problem)}", soft_wrap=True)
    if problems:
        con.print(f"{len(problems)} problem(s): 'medbench run' refuses this task before training until they are "
                  "fixed", soft_wrap=True)


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class LogReporter:
    """Progress as plain lines on stderr, for logs (CI, ``nohup``, SLURM): no bars, no control characters.

    One line when a run starts and when it ends (status, time, headline), and one every
    ``every_percent`` % of its steps with the loss, the time elapsed and the estimated time left
    (from the steps done in this process: a resumed run's earlier steps are not counted).
    """

    def __init__(self, every_percent: float = 5.0, stream=None):
        self.every_percent = every_percent
        self.stream = stream
        self._run: dict = {}
        self._work: dict = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    def _print(self, text: str) -> None:
        import time

        stream = self.stream or sys.stderr
        print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {plain(text)}", file=stream, flush=True)

    def run_started(self, index, total, request, steps) -> None:
        import math
        import time

        name = f"{request.task} seed {request.seed}" + (f" {request.folder_suffix}" if request.folder_suffix else "")
        self._run = {"name": name, "steps": int(steps), "start": time.monotonic(), "first": None,
                     "every": max(1, math.ceil(int(steps) * self.every_percent / 100)), "index": index, "total": total}
        self._print(f"run {index + 1}/{total} started: {name}, backbone {request.backbone}, {int(steps)} steps")

    def step(self, step, loss) -> None:
        import time

        run = self._run
        if not run:
            return
        done = int(step) + 1
        if run["first"] is None:  # the first step this process trains (later than 1 when resumed)
            run["first"], run["first_time"] = done, time.monotonic()
        if done % run["every"] and done != run["steps"]:
            return
        elapsed = time.monotonic() - run["start"]
        trained = done - run["first"] + 1
        rate = (time.monotonic() - run["first_time"]) / max(trained - 1, 1) if trained > 1 else None
        left = f"{_clock(rate * (run['steps'] - done))}" if rate is not None else "?"
        self._print(f"{run['name']}: step {done}/{run['steps']} ({100 * done // run['steps']}%), loss {loss:.4f}, "
                    f"elapsed {_clock(elapsed)}, left ~{left}")

    def run_finished(self, outcome) -> None:
        import time

        req = outcome.request
        name = self._run.get("name") if self._run else f"{req.task} seed {req.seed}"
        took = f" in {_clock(time.monotonic() - self._run['start'])}" if self._run else ""
        head = ((outcome.result or {}).get("headline") or {}) if outcome.status in ("ok", "skipped") else {}
        value = head.get("value")
        metric = f", {head.get('metric')} {value:.4f}" if isinstance(value, (int, float)) else ""
        status = {"ok": "done", "skipped": "already complete, reused", "busy": "being trained by another process"}
        what = status.get(outcome.status, outcome.status)
        error = f": {outcome.error}" if outcome.status == "failed" and outcome.error else ""
        self._print(f"run {name}: {what}{took if outcome.status == 'ok' else ''}{metric}{error}")
        self._run = {}

    def message(self, text) -> None:
        self._print(text)

    def work_progress(self, label: str, done: int, total: int) -> None:
        """Work counted in items (a preprocessing cache being built; the first call, with 0 done, starts the
        clock): a line with the rate and the time left every 30 s, and a last one when it took 10 s or more
        (short work and its errors stay one line)."""
        import time

        w = _work_rate(self._work, label, done, total)
        now = time.monotonic()
        if (w["finished"] and w["elapsed"] >= 10) or (not w["finished"] and now - w["printed"] >= 30):
            w["printed"] = now
            self._print(f"{label}: {done:,}/{total:,} ({done / max(total, 1):.0%}), {w['info']}")


def _work_rate(work: dict, label: str, done: int, total: int) -> dict:
    """The state of the work ``label`` in ``work`` (its clock starts at the first call) with this call's
    elapsed seconds, rate, ``info`` (rate and time left) and whether it finished (then it is forgotten)."""
    import time

    now = time.monotonic()
    state = work.setdefault(label, {"start": now, "printed": now, "bar": None})
    elapsed = max(now - state["start"], 1e-9)
    rate = done / elapsed
    left = (total - done) / rate if rate > 0 else float("inf")
    finished = done >= total
    if finished:
        work.pop(label, None)
    state.update(elapsed=elapsed, rate=rate, finished=finished,
                 info=f"{rate:,.1f}/s" if finished else f"{rate:,.1f}/s, {_duration(left)} left")
    return state


def progress_reporter():
    """The progress display of ``medbench run``: bars on a terminal, plain log lines otherwise
    (:class:`LogReporter`). ``MEDBENCH_PROGRESS=bars`` (or ``1``) forces bars, ``log`` forces lines."""
    choice = (os.environ.get("MEDBENCH_PROGRESS") or "").strip().lower()
    if choice == "log":
        return LogReporter()
    if choice in ("bars", "1", "true", "yes", "on") or sys.stderr.isatty():
        return RichReporter()
    return LogReporter()


def _duration(seconds: float) -> str:
    if seconds == float("inf"):
        return "?"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}h{rest // 60:02d}m" if h else (f"{rest // 60}m{rest % 60:02d}s" if rest >= 60 else f"{rest}s")


class RichReporter:
    """Progress bars for a suite on a terminal: one for runs, one for the steps of the current run."""

    def __enter__(self):
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                 console=console(stderr=True), transient=False)
        self.progress.__enter__()
        self.suite_bar = None
        self.step_bar = None
        self._work: dict = {}
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
            self.progress.console.print(f"[red]failed[/red] {safe(outcome.request.task)} seed {outcome.request.seed}: "
                                        f"{safe(outcome.error)}", soft_wrap=True)

    def message(self, text) -> None:
        self.progress.console.print(cell(text), soft_wrap=True)

    def work_progress(self, label: str, done: int, total: int) -> None:
        """Work counted in items (a preprocessing cache being built; the first call, with 0 done, starts the
        clock): a bar with the rate; when it took 10 s or more, a last line with the time and the rate."""
        w = _work_rate(self._work, label, done, total)
        if w["bar"] is None:
            w["bar"] = self.progress.add_task(safe(label), total=total, info="")
        self.progress.update(w["bar"], completed=done, info=w["info"])
        if w["finished"]:
            self.progress.remove_task(w["bar"])
            if w["elapsed"] >= 10:
                self.progress.console.print(cell(f"{label}: done in {_duration(w['elapsed'])} ({w['rate']:,.1f}/s)"),
                                            soft_wrap=True)
