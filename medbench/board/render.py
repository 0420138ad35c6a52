"""A leaderboard rendered for people: Markdown, or one self-contained HTML page.

Numbers are stored unrounded; they are rounded here only (``DIGITS``). Best
entry per task (and regime, and protocol) in bold; entries *not significantly different from
the best* (``significance.tied_with_best``, paired bootstrap, see
:mod:`medbench.board.significance`) in italics, as CJ21 does. Published
reference rows (``--published``) are listed beside the user's rows of the same
tasks, marked with their citation. A board with several protocols (fine-tuning,
linear probe, kNN) also gets them side by side: a Markdown section and the HTML
view ``protocols``, one row per task x backbone x init, one column per protocol.

The HTML page needs no network: CSS and JS are inline, plots are inline SVG
(matplotlib) and reliability diagrams base64 PNGs read from the board's own
run folders (:func:`run_image`: never another path a board lists). Every
value is escaped by the element builder of :mod:`medbench.board.html`, and a
Content-Security-Policy lets only the page's own script run. The table sorts on a header click; the URL hash
``#sort=COLUMN:asc|desc&view=VIEW`` sorts and selects a view on load
(``document.body.dataset.sorted`` / ``.view`` say what was applied).
"""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Any

from medbench.board.html import Markup, el, fragment, json_script, page

DIGITS = 4

VIEWS = [("overview", "Overview"), ("protocols", "Protocols"), ("significance", "Significance"), ("calibration", "Calibration"),
         ("fairness", "Fairness"), ("shift", "OOD shift"), ("convergence", "Convergence"),
         ("data-efficiency", "Data efficiency"), ("resolution", "Resolution"), ("published", "Published"),
         ("provenance", "Provenance")]


def num(v: Any, digits: int = DIGITS) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def mean_std(s: dict | None) -> str:
    if not isinstance(s, dict) or s.get("mean") is None:
        return "undefined"
    return num(s["mean"]) + (f" ± {num(s['std'])}" if s.get("std") is not None else "")


def interval(s: dict | None) -> str:
    ci = (s or {}).get("ci") if isinstance(s, dict) else None
    if not ci or ci.get("low") is None:
        return "–"
    return f"[{num(ci['low'])}, {num(ci['high'])}]"


def _m(s: Any) -> float | None:
    return s.get("mean") if isinstance(s, dict) else None


def label(e: dict) -> str:
    """init, regime and (for a probe) protocol of an entry: ``pretrained``, ``random (freeze-head)``,
    ``pretrained · linear``."""
    protocol = e.get("protocol") or "finetune"
    return e["init"] + (f" ({e['regime']})" if e.get("regime") else "") + (f" · {protocol}" if protocol != "finetune"
                                                                          else "")


def protocol_table(board: dict) -> tuple[list[str], list[tuple[tuple[str, str, str], dict[str, dict]]]]:
    """The protocols side by side: (protocols in order, rows of ((task, backbone, init), protocol -> entry)),
    when the board holds more than one protocol; ([], []) otherwise. Entries of a regime (``--freeze``) stay
    in the main table."""
    from medbench.probe.protocols import PROTOCOLS

    rows: dict[tuple[str, str, str], dict[str, dict]] = {}
    seen: set[str] = set()
    for e in board["entries"]:
        if e.get("regime") or e.get("published"):
            continue
        protocol = e.get("protocol") or "finetune"
        seen.add(protocol)
        rows.setdefault((e["task"], e["backbone"], e["init"]), {})[protocol] = e
    if len(seen) < 2:
        return [], []
    return [p for p in PROTOCOLS if p in seen], sorted(rows.items())


def mark(e: dict) -> str:
    sig = e.get("significance") or {}
    if sig.get("best"):
        return "best"
    if sig.get("tied_with_best"):
        return "tied"
    return ""


def ood_text(e: dict) -> str:
    metric = e["headline"]["metric"]
    parts = []
    for target, scores in (e.get("ood") or {}).items():
        drop = (((e.get("shift") or {}).get(target) or {}).get(metric) or {}).get("drop")
        parts.append(f"{target}: {num(_m(scores.get(metric)))}" + (f" (drop {num(_m(drop))})" if _m(drop) is not None else ""))
    return "; ".join(parts) or "–"


def ece_text(e: dict) -> str:
    cal = e.get("calibration") or {}
    b, a = _m((cal.get("before") or {}).get("ece")), _m((cal.get("after") or {}).get("ece"))
    return f"{num(b)} → {num(a)}" if b is not None else "–"


def temperature_text(e: dict) -> str:
    """Temperature scaling's status of an entry: ``fitted``, or which labels were left unscaled and why
    (``too_few: Edema``; statuses differing between seeds are all listed)."""
    status = ((e.get("calibration") or {}).get("temperature_status")) or {}
    by: dict[str, list[str]] = {}
    for label, v in status.items():
        values = v.get("values", []) if isinstance(v, dict) else [v]
        for x in dict.fromkeys(x for x in values if x is not None):
            by.setdefault(str(x), []).append("all classes" if label == "all" else str(label))
    if not by:
        return "–"
    if set(by) == {"fitted"}:
        return "fitted"
    parts = [f"{st}: {', '.join(labels)}" for st, labels in by.items() if st != "fitted"]
    if "fitted" in by:
        parts.insert(0, f"fitted: {', '.join(by['fitted'])}")
    return "; ".join(parts)


def warning_codes(e: dict) -> str:
    """The codes of an entry's warnings, each once (``–`` without any)."""
    return ", ".join(dict.fromkeys(w["code"] for w in e.get("warnings") or [])) or "–"


def warning_lines(e: dict) -> list[str]:
    """One line per warning of an entry: code, seeds (and variant), message."""
    out = []
    for w in e.get("warnings") or []:
        seeds = w.get("seeds") or []
        where = (f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}" if seeds else "")
        if w.get("variant"):
            where = f"{w['variant']}, {where}" if where else w["variant"]
        out.append(f"{w['code']}" + (f" ({where})" if where else "") + f": {w.get('message', '')}")
    return out


def p_text(e: dict) -> str:
    vs = (e.get("significance") or {}).get("vs_best") or {}
    return num(vs.get("p_value")) if vs else "–"


def published_value(e: dict) -> str:
    if e["headline"].get("mean") is not None:
        return mean_std(e["headline"])
    per = [f"{k.split('/', 1)[-1]} {num(_m(v))}" for k, v in e.get("metrics", {}).items() if _m(v) is not None]
    return "per label: " + ", ".join(per) if per else "undefined"


# --------------------------------------------------------------------------- Markdown


class Md(str):
    """Markdown the renderer made (emphasis around a number): :func:`md_text` leaves it as it is. Never
    construct it from a board's strings."""

    __slots__ = ()


#: what is Markdown (or HTML) anywhere in a line: code, emphasis, table cells, strikethrough, raw HTML and
#: autolinks (``<``, ``>``), an entity (``&`` before ``name;`` or ``#N;``), a link or image (``](``; without
#: it ``[`` is text: no reference is ever defined), an underscore at a word's edge (inside a word it is text)
_MD_INLINE = re.compile(r"[\\`*|~<>]|\](?=\()|&(?=#?[0-9A-Za-z]+;)|(?<![0-9A-Za-z])_|_(?![0-9A-Za-z])")
#: what would make a line (a list item's text, a heading) start a block: heading, quote, list, rule, setext
_MD_BLOCK_START = re.compile(r"^(?:[#>+=-]|\d+(?=[.)]))")
_MD_ENTITY = {"<": "&lt;", ">": "&gt;", "&": "&amp;"}


def md_text(v: Any) -> str:
    """A value from a board as Markdown text that may start a line (a list item, a heading): :func:`md_cell`,
    and a leading block marker (``#``, ``>``, ``-``, ``1.``) escaped."""
    text = md_cell(v)
    if isinstance(v, Md):
        return text
    start = _MD_BLOCK_START.match(text)
    if start is None:
        return text
    at = start.end() if start.group(0)[0].isdigit() else 0
    return text[:at] + "\\" + text[at:]


def md_emphasis(v: Any, marker: str) -> Md:
    """``v`` (escaped) in bold (``**``) or italics (``*``)."""
    return Md(f"{marker}{md_cell(v)}{marker}")


def md_cell(v: Any) -> str:
    """A value from a board inside a Markdown line (a table cell): on one line (line breaks folded); code,
    emphasis, link, image, table, strikethrough and HTML characters escaped (``<`` ``>`` ``&`` as entities,
    so no renderer reads raw HTML). Names stay readable: ``nih_cxr`` is left as it is (an underscore inside
    a word is no emphasis). :class:`Md` is kept as it is."""
    if isinstance(v, Md):
        return v
    text = " ".join(str(v).split())
    return _MD_INLINE.sub(lambda m: _MD_ENTITY.get(m.group(0), "\\" + m.group(0)), text)


def md_table(headers: list[str], rows: list[list[Any]]) -> list[str]:
    return ["| " + " | ".join(md_cell(h) for h in headers) + " |", "|" + "---|" * len(headers),
            *("| " + " | ".join(md_cell(c) for c in row) + " |" for row in rows)]


def steps_text(s: Any) -> str:
    """A step count over seeds: whole steps (a mean of whole numbers gets one decimal when it is not whole)."""
    if not isinstance(s, dict):
        return "–" if s is None else str(s)
    m = s.get("mean")
    if m is None:
        return "undefined"
    text = f"{m:.0f}" if float(m).is_integer() else f"{m:.1f}"
    return text + (f" ± {s['std']:.1f}" if s.get("std") is not None else "")


def _md_section(title: str, lines: list[str], empty: str) -> list[str]:
    return ["", f"## {title}", "", *(lines or [f"_{empty}_"])]


def render_markdown(board: dict, published: list[dict] | None = None) -> str:
    """The board as Markdown tables, one section per axis of the HTML page (overview, significance,
    calibration, fairness, OOD shift, convergence, data efficiency, resolution, published rows, provenance),
    for a pull-request comment or a paper draft."""
    published = published or []
    out = ["# medbench leaderboard", "",
           md_text(f"Created {board.get('created') or '–'} · medbench {board['provenance'].get('medbench_version', '–')} · "
                   f"git {board['provenance'].get('git_sha') or '–'} · format {board['schema']} v{board['schema_version']}"),
           "",
           "Test split; mean ± std over seeds; interval: seed mean over test resamples. **Bold**: best of its task; "
           "*italics*: not significantly different from the best" + md_cell(_method_note(board)) + ".", ""]
    rows = []
    for e in board["entries"]:
        value = mean_std(e["headline"])
        m = mark(e)
        value = md_emphasis(value, "**") if m == "best" else (md_emphasis(value, "*") if m == "tied" else value)
        rows.append([e["task"], e["backbone"], label(e), e["headline"]["metric"], value, interval(e["headline"]),
                     len(e.get("seeds") or []), p_text(e), ood_text(e), ece_text(e), temperature_text(e),
                     warning_codes(e)])
    out += md_table(["task", "backbone", "init", "metric", "mean ± std", "interval", "seeds", "p vs best",
                     "OOD (drop)", "ECE → T-scaled", "temperature", "warnings"], rows)
    warned = [e for e in board["entries"] if e.get("warnings")]
    if warned:
        out += ["", "## Warnings", ""]
        for e in warned:
            out.append(f"* {md_text(e['task'])} · {md_cell(e['backbone'])} · {md_cell(label(e))}:")
            out += [f"  * {md_text(line)}" for line in warning_lines(e)]
    protocols, prows = protocol_table(board)
    protocol_lines: list[str] = []
    if protocols:
        table_rows = []
        for (task, backbone, init), by in prows:
            metric = next(iter(by.values()))["headline"]["metric"]
            cells = []
            for p in protocols:
                e = by.get(p)
                value = mean_std(e["headline"]) if e else "–"
                cells.append(md_emphasis(value, "**") if e and mark(e) == "best" else value)
            table_rows.append([task, backbone, init, metric, *cells])
        protocol_lines = ["Headline metric, mean ± std over seeds (a probe of pre-trained weights on the full training "
                          "set has one seed: its fit is deterministic). **Bold**: best of its task within the protocol.",
                          "", *md_table(["task", "backbone", "init", "metric", *protocols], table_rows)]
    out += _md_section("Protocols", protocol_lines, "One protocol in this board: nothing to put side by side.")
    for title, section, empty in (
            ("Significance", _md_significance(board), "One entry per task: nothing to compare."),
            ("Calibration", _md_calibration(board), "No calibration blocks in this board."),
            ("Fairness", _md_fairness(board), "No fairness blocks in this board."),
            ("OOD shift", _md_shift(board), "No OOD targets in this board."),
            ("Convergence", _md_convergence(board), "No convergence blocks in this board."),
            ("Data efficiency", _md_efficiency(board), "No data-efficiency runs (--fractions/--shots) in this board."),
            ("Resolution", _md_resolution(board), "No resolution runs (--resolutions) in this board.")):
        out += _md_section(title, section, empty)
    if published:
        out += _md_section("Published reference rows (same tasks)", md_table(
            ["task", "backbone", "init", "metric", "mean ± std", "source", "paper's row / column"],
            [[e["task"], e["backbone"], label(e), e["headline"]["metric"], published_value(e), e.get("citation"),
              f"{(e.get('paper') or {}).get('target', '')} / {(e.get('paper') or {}).get('column', '')}"]
             for e in published]), "")
    out += _md_section("Provenance", _md_provenance(board), "")
    return "\n".join(out) + "\n"


def _md_significance(board: dict) -> list[str]:
    rows = []
    for e in board["entries"]:
        sig = e.get("significance")
        if not sig:
            continue
        vs = sig.get("vs_best") or {}
        ci = vs.get("ci") or {}
        rows.append([e["task"], e["backbone"], label(e), num(sig["best"]),
                     num(sig["tied_with_best"]) + (f" ({sig['reason']})" if sig.get("reason") else ""),
                     num(vs.get("delta")), f"[{num(ci.get('low'))}, {num(ci.get('high'))}]" if ci else "–",
                     num(vs.get("p_value"))])
    if not rows:
        return []
    method = board.get("significance") or {}
    note = md_text(f"Test: {method.get('test')}; alpha = {method.get('alpha')}; grouped by "
                   f"{', '.join(map(str, method.get('group_by') or []))}.") if method else ""
    return [note, "", *md_table(["task", "backbone", "init", "best", "tied with best", "Δ vs best", "paired interval",
                                 "p"], rows)]


def _md_calibration(board: dict) -> list[str]:
    rows = []
    for e in board["entries"]:
        cal = e.get("calibration")
        if not cal:
            continue
        b, a = cal.get("before") or {}, cal.get("after") or {}
        rows.append([e["task"], e["backbone"], label(e), *(mean_std(s.get(k)) for s, k in (
            (b, "ece"), (a, "ece"), (b, "mce"), (a, "mce"), (b, "brier"), (a, "brier"), (b, "nll"), (a, "nll")))])
    return md_table(["task", "backbone", "init", "ECE", "ECE (T-scaled)", "MCE", "MCE (T-scaled)", "Brier",
                     "Brier (T-scaled)", "NLL", "NLL (T-scaled)"], rows) if rows else []


def _md_fairness(board: dict) -> list[str]:
    out: list[str] = []
    for e in board["entries"]:
        attrs = (e.get("fairness") or {}).get("attributes") or {}
        if not attrs:
            continue
        rows = []
        for name, a in attrs.items():
            if a.get("status") == "unavailable" or (not a.get("groups") and a.get("reason")):
                rows.append([name, "unavailable", a.get("reason") or "–", "–", "–", "–"])
                continue
            worst = a.get("worst_group")
            worst = worst.get("auc") if isinstance(worst, dict) else worst
            groups = "; ".join(
                f"{g}: n {b.get('n', '–')}, AUC {num(_m(b.get('auc')))}" + (f" ({b['status']})" if b.get("status")
                                                                            not in (None, "ok") else "")
                for g, b in (a.get("groups") or {}).items() if isinstance(b, dict))
            rows.append([name, worst if isinstance(worst, str) else "varies over seeds",
                         mean_std((a.get("gap") or {}).get("auc")), mean_std(a.get("equalized_odds_difference")),
                         mean_std(a.get("demographic_parity_difference")), groups or "–"])
        out += ["", f"### {md_text(e['task'])} · {md_text(e['backbone'])} ({md_text(label(e))})", "",
                *md_table(["attribute", "worst group (AUC)", "AUC gap", "equalized odds diff.",
                           "demographic parity diff.", "groups"], rows)]
    return out[1:] if out else []


def _md_shift(board: dict) -> list[str]:
    out: list[str] = []
    for m in board.get("shift_matrix") or []:
        rows = [[c["trained_on"], c["evaluated_on"], c["metric"],
                 mean_std(c["value"]) if isinstance(c["value"], dict) else num(c["value"]),
                 mean_std(c["drop"]) if c.get("drop") else "–"] for c in m["cells"]]
        out += ["", f"### {md_text(m['backbone'])} ({md_text(m['init'])})", "",
                *md_table(["trained on", "evaluated on", "metric", "value", "drop"], rows)]
    rows = []
    for e in board["entries"]:
        for target, metrics in (e.get("shift") or {}).items():
            for metric, v in metrics.items():
                if isinstance(v, dict) and "drop" in v:
                    rows.append([e["task"], e["backbone"], label(e), target, metric, mean_std(v.get("in_distribution")),
                                 mean_std(v.get("target")), mean_std(v.get("drop")), mean_std(v.get("relative_drop"))])
    if rows:
        out += ["", "### Per entry", "", *md_table(["task", "backbone", "init", "target", "metric", "in distribution",
                                                    "target value", "drop", "relative drop"], rows)]
    return out[1:] if out else []


def _md_convergence(board: dict) -> list[str]:
    rows = []
    for e in board["entries"]:
        c = e.get("convergence")
        if not c:
            continue
        rows.append([e["task"], e["backbone"], label(e), c.get("metric", ""), steps_text(c.get("steps_to_95")),
                     steps_text(c.get("steps_to_99")), steps_text(c.get("total_steps"))])
    return md_table(["task", "backbone", "init", "validation metric", "steps to 95%", "steps to 99%", "total steps"],
                    rows) if rows else []


def _md_efficiency(board: dict) -> list[str]:
    rows = []
    for e in board["entries"]:
        for kind, curve in (e.get("data_efficiency") or {}).items():
            for p in curve["points"]:
                s = (p.get("metrics") or {}).get(curve["metric"])
                n = p.get("n_train")
                rows.append([e["task"], e["backbone"], label(e), kind, num(p[curve["x"]]),
                             steps_text(n) if isinstance(n, dict) else num(n), mean_std(s)])
            rows.append([e["task"], e["backbone"], label(e), f"{kind}: normalized area", "–", "–",
                         mean_std(curve.get("area"))])
    return md_table(["task", "backbone", "init", "kind", "x", "training images", "headline"], rows) if rows else []


def _md_resolution(board: dict) -> list[str]:
    rows = []
    for e in board["entries"]:
        res = e.get("resolution")
        if not res:
            continue
        for p in res["points"]:
            rel = p.get("relative_to_default") or {}
            rows.append([e["task"], e["backbone"], label(e), p["crop"], mean_std((p.get("metrics") or {}).get(res["metric"])),
                         num(rel.get("delta")), num(rel.get("p_value"))])
    return md_table(["task", "backbone", "init", "crop", "headline", "Δ vs default", "p"], rows) if rows else []


def _md_provenance(board: dict) -> list[str]:
    rows = []
    for e in board["entries"]:
        p = e.get("provenance") or {}
        rows.append([e["task"], e["backbone"], label(e), p.get("task_version"), (p.get("task_hash") or "")[:12],
                     (p.get("data_fingerprint") or "")[:12], (p.get("weights_sha256") or "–")[:12],
                     ", ".join(map(str, p.get("seeds") or [])), (p.get("device") or {}).get("device", "–"),
                     p.get("medbench_version"), (p.get("git_sha") or "–")[:12], p.get("date")])
    libs = board["provenance"].get("libraries") or {}
    return [*md_table(["task", "backbone", "init", "task version", "task hash", "data fingerprint", "weights sha256",
                       "seeds", "device", "medbench", "git sha", "date"], rows),
            "", "Libraries: " + md_cell(", ".join(f"{k} {v}" for k, v in libs.items() if v) or "–")]


# --------------------------------------------------------------------------- the regression gate's report

#: the columns of a compare report row, for the console table and the Markdown form
COMPARE_COLUMNS = ("task", "backbone", "init", "metric", "baseline", "new", "worse by", "paired interval",
                   "tolerance (set by)", "status")


def signed(v: float | None) -> str:
    return "–" if v is None else f"{v:+.{DIGITS}f}"


def compare_cells(row: dict) -> list[str]:
    """The cells of one ``medbench compare`` row (without the status, which each form marks its own way)."""
    iv = row.get("interval")
    if iv:
        pair = f"[{signed(iv['low'])}, {signed(iv['high'])}]"
    else:
        pair = "unpaired" if row.get("mode") == "unpaired" else "–"
    tol = "–" if row.get("tolerance") is None else f"{num(row['tolerance'])} ({row['set_by']})"
    return [row["task"], row["backbone"], label(row), row["metric"], num(row.get("baseline")), num(row.get("new")),
            signed(row.get("worse_by")), pair, tol]


def compare_status(row: dict) -> str:
    return {"ok": "pass", "better": "pass (better)", "regression": "REGRESSION",
            "invalid": "FAIL"}[row["status"]] + (f": {row['reason']}" if row.get("reason") else "")


def compare_summary(report: dict) -> str:
    return (f"{report['compared']} compared ({report['paired']} paired), {report['regressions']} regression(s), "
            f"{report['invalid']} not comparable, {len(report['duplicates'])} duplicate(s), "
            f"{len(report['missing'])} missing{' (allowed)' if report['missing'] and report['allow_missing'] else ''}, "
            f"{len(report['added'])} added")


def compare_lists(report: dict) -> list[tuple[str, str]]:
    """(kind, text) lines below the table: duplicates, missing and added entries, changed data, row notes."""
    def name(e: dict) -> str:
        return f"{e['task']} · {e['backbone']} · {label(e)}"

    out = [("duplicate", f"{d['board']} holds {name(d)} {len(d['entries'])} times (entries {d['entries']})")
           for d in report["duplicates"]]
    out += [("missing", f"in NEW: {name(e)}") for e in report["missing"]]
    out += [("added", f"in NEW: {name(e)}") for e in report["added"]]
    out += [("changed data", f"{name(e)}: {e['reason']} (--allow-changed-data)") for e in report["changed_data"]]
    out += [("note", f"{name(r)} {r['metric']}: {r['note']}") for r in report["rows"] if r.get("note")]
    return out


def render_compare_markdown(report: dict) -> str:
    """A ``medbench compare`` report as Markdown, e.g. for a pull-request comment."""
    passed = report["status"] == "pass"
    rule = report["rule"]
    out = [f"### medbench regression gate: {'✅ pass' if passed else '❌ regression'}", "",
           md_text(f"NEW {report['new']['path']} ({report['new']['kind']}) against BASELINE "
                   f"{report['baseline']['path']} ({report['baseline']['kind']}): {compare_summary(report)}."), "",
           *md_table(["", *COMPARE_COLUMNS], [["✅" if r["passed"] else "❌", *compare_cells(r), compare_status(r)]
                                              for r in report["rows"]])]
    lines = compare_lists(report)
    if lines:
        out += [""] + [f"* {md_emphasis(kind, '**')} {md_cell(text)}" for kind, text in lines]
    out += ["", "<details><summary>Rule</summary>", "",
            md_text(f"worse by = {rule['worse_by']}; paired: {rule['paired']}; unpaired: {rule['unpaired']}; "
                    f"regression when {rule['regression']}. abs_tol = {rule['abs_tol']:g}, k_seed = {rule['k_seed']:g}, "
                    f"k_ci = {rule['k_ci']:g} (calibration: {rule['calibration']})."), "", "</details>"]
    return "\n".join(out) + "\n"


def _method_note(board: dict) -> str:
    sig = board.get("significance")
    return f" ({sig['test']}, alpha = {sig['alpha']})" if sig else ""


# --------------------------------------------------------------------------- HTML

CSS = """
body{font:14px/1.4 system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:1.2em 2em;color:#222}
h1{font-size:1.4em;margin:0 0 .2em} .meta{color:#666;font-size:.9em}
nav{margin:1em 0;display:flex;flex-wrap:wrap;gap:.3em}
nav a{padding:.3em .7em;border:1px solid #bbb;border-radius:4px;text-decoration:none;color:#124}
nav a.active{background:#124;color:#fff}
section.view{display:none} section.view.active{display:block}
table{border-collapse:collapse;margin:.6em 0;font-variant-numeric:tabular-nums}
th,td{border:1px solid #ddd;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#f3f5f8;cursor:pointer;user-select:none;white-space:nowrap}
th[aria-sort=ascending]::after{content:" ▲"} th[aria-sort=descending]::after{content:" ▼"}
tr.best td.value{font-weight:bold} tr.tied td.value{font-style:italic}
tr.published td{background:#fbf8ee}
.plots{display:flex;flex-wrap:wrap;gap:1em;align-items:flex-start}
.plots svg{max-width:100%;height:auto} img.reliability{max-width:640px;border:1px solid #eee}
.note{color:#555;font-size:.9em;max-width:70em}
"""

JS = r"""
(function(){
  function cellValue(row, col){
    var td = row.cells[col]; if(!td) return null;
    var v = td.getAttribute('data-value');
    if(v !== null && v !== ''){ var f = parseFloat(v); return isNaN(f) ? v : f; }
    return td.textContent.trim();
  }
  function sortTable(table, col, dir){
    var body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function(a, b){
      var x = cellValue(a, col), y = cellValue(b, col);
      if(x === null || x === '–') return 1; if(y === null || y === '–') return -1;
      var c = (typeof x === 'number' && typeof y === 'number') ? x - y : String(x).localeCompare(String(y));
      return dir === 'desc' ? -c : c;
    });
    rows.forEach(function(r){ body.appendChild(r); });
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function(th, i){
      th.setAttribute('aria-sort', i === col ? (dir === 'desc' ? 'descending' : 'ascending') : 'none');
    });
    document.body.dataset.sorted = table.tHead.rows[0].cells[col].getAttribute('data-col') + ':' + dir;
  }
  function showView(name){
    var found = false;
    document.querySelectorAll('section.view').forEach(function(s){
      var on = s.id === 'view-' + name; s.classList.toggle('active', on); found = found || on; });
    if(!found){ name = 'overview'; document.getElementById('view-overview').classList.add('active'); }
    document.querySelectorAll('nav a').forEach(function(a){ a.classList.toggle('active', a.dataset.view === name); });
    document.body.dataset.view = name;
  }
  document.querySelectorAll('table.sortable').forEach(function(table){
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function(th, i){
      th.addEventListener('click', function(){
        var dir = th.getAttribute('aria-sort') === 'ascending' ? 'desc' : 'asc'; sortTable(table, i, dir); });
    });
  });
  document.querySelectorAll('nav a').forEach(function(a){
    a.addEventListener('click', function(ev){ ev.preventDefault(); showView(a.dataset.view); });
  });
  var params = {};
  location.hash.replace(/^#/, '').split('&').forEach(function(kv){
    var i = kv.indexOf('='); if(i > 0) params[decodeURIComponent(kv.slice(0, i))] = decodeURIComponent(kv.slice(i + 1)); });
  showView(params.view || 'overview');
  if(params.sort){
    var parts = params.sort.split(':'), table = document.getElementById('board-table');
    var ths = Array.prototype.slice.call(table.tHead.rows[0].cells);
    var col = ths.findIndex(function(th){ return th.getAttribute('data-col') === parts[0]; });
    if(col >= 0) sortTable(table, col, parts[1] === 'desc' ? 'desc' : 'asc');
  }
  document.body.dataset.ready = 'true';
})();
"""

def _td(content: Any, value: Any = None, cls: str = "") -> Markup:
    return el("td", {"class": cls or None, "data-value": None if value is None else str(value)}, content)


def _tr(cells: list[Markup], cls: str | None = None, **attrs: Any) -> Markup:
    return el("tr", {"class": cls, **{k.replace("_", "-"): v for k, v in attrs.items()}}, cells)


def _table(headers: list[tuple[str, str]], rows: list[Markup], *, table_id: str = "", sortable: bool = True) -> Markup:
    head = el("tr", None, [el("th", {"data-col": key, "aria-sort": "none"}, title) for key, title in headers])
    return el("table", {"id": table_id or None, "class": "sortable" if sortable else None},
              el("thead", None, head), el("tbody", None, rows))


def _note(*content: Any) -> Markup:
    return el("p", {"class": "note"}, *content)


def _overview(board: dict, published: list[dict]) -> Markup:
    headers = [("task", "task"), ("backbone", "backbone"), ("init", "init"), ("metric", "metric"),
               ("mean", "mean ± std"), ("interval", "interval"), ("seeds", "seeds"), ("p", "p vs best"),
               ("ood", "OOD (drop)"), ("ece", "ECE → T-scaled"), ("temperature", "temperature"),
               ("warnings", "warnings"), ("source", "source")]
    rows = []
    for e in board["entries"]:
        h = e["headline"]
        ci = h.get("ci") or {}
        n_seeds = len(e.get("seeds") or [])
        rows.append(_tr([_td(e["task"]), _td(e["backbone"]), _td(label(e)), _td(h["metric"]),
                         _td(mean_std(h), h.get("mean"), "value"), _td(interval(h), ci.get("low")),
                         _td(n_seeds, n_seeds),
                         _td(p_text(e), ((e.get("significance") or {}).get("vs_best") or {}).get("p_value")),
                         _td(ood_text(e)), _td(ece_text(e)), _td(temperature_text(e)), _td(warning_codes(e)),
                         _td("this board")],
                        f"entry {mark(e)}", data_key=json.dumps([e["task"], e["backbone"], label(e)])))
    for e in published:
        h = e["headline"]
        rows.append(_tr([_td(e["task"]), _td(e["backbone"]), _td(label(e)), _td(h["metric"]),
                         _td(published_value(e), h.get("mean"), "value"), _td("–"), _td(h.get("n") or "–", h.get("n")),
                         _td("–"), _td("–"), _td("–"), _td("–"), _td("–"), _td(f"published: {e.get('citation')}")],
                        "published"))
    note = _note("Test split. mean ± std over seeds (ddof=1); interval: percentile interval of the seed mean over "
                 "test resamples. ", el("b", None, "Bold"), ": best entry of its task; ", el("i", None, "italics"),
                 f": not significantly different from the best{_method_note(board)}. Click a header to sort.")
    return fragment(note, _table(headers, rows, table_id="board-table"), _warnings(board))


def _warnings(board: dict) -> Markup | None:
    items = []
    for e in board["entries"]:
        lines = warning_lines(e)
        if lines:
            items.append(el("li", None, f"{e['task']} · {e['backbone']} ({label(e)})",
                            el("ul", None, [el("li", None, line) for line in lines])))
    if not items:
        return None
    return fragment(el("h3", None, "Warnings"), el("ul", {"class": "warnings"}, items))


def _significance(board: dict) -> Markup:
    headers = [("task", "task"), ("backbone", "backbone"), ("init", "init"), ("best", "best"), ("tied", "tied with best"),
               ("delta", "Δ vs best"), ("interval", "paired interval"), ("p", "p")]
    rows = []
    for e in board["entries"]:
        sig = e.get("significance")
        if not sig:
            continue
        vs = sig.get("vs_best") or {}
        ci = vs.get("ci") or {}
        rows.append(_tr([_td(e["task"]), _td(e["backbone"]), _td(label(e)), _td(num(sig["best"])),
                         _td(num(sig["tied_with_best"]) + (f" ({sig['reason']})" if sig.get("reason") else "")),
                         _td(num(vs.get("delta")), vs.get("delta")),
                         _td(f"[{num(ci.get('low'))}, {num(ci.get('high'))}]" if ci else "–"),
                         _td(num(vs.get("p_value")), vs.get("p_value"))], mark(e) or None))
    method = board.get("significance")
    if method:
        note = _note(f"Test: {method['test']}; alpha = {method['alpha']}; grouped by "
                     f"{', '.join(map(str, method['group_by']))}.")
    else:
        note = _note("One entry per task: nothing to compare.")
    return fragment(note, _table(headers, rows) if rows else None)


#: a reliability diagram larger than this is not embedded (ours are tens of KB)
MAX_EMBEDDED_IMAGE_BYTES = 4 << 20
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run_image(entry: dict, path: str) -> tuple[bytes | None, str]:
    """The bytes of a figure the board names, or (None, why not). Only the reliability diagram medbench
    writes in a run folder of this very entry (``calibration/reliability-test.png`` of one of its ``runs``:
    a complete run folder, the file inside it once links are resolved, checked against the digest the
    run's ``result.json`` recorded), a PNG by its signature, at most :data:`MAX_EMBEDDED_IMAGE_BYTES`.
    Any other path a board lists (``/home/you/secret.png``) is never read."""
    import os

    from medbench.errors import MedbenchError
    from medbench.paths import is_inside
    from medbench.store import RunDir
    from medbench.store.scores import RELIABILITY

    wanted = os.path.realpath(path)
    for run_path in entry.get("runs") or []:
        if not isinstance(run_path, str):
            continue
        run = RunDir(Path(run_path))
        candidate = run.path / RELIABILITY
        if os.path.realpath(candidate) != wanted:
            continue
        if not is_inside(os.path.realpath(run.path), wanted):
            return None, "it lies outside its run folder"
        if not run.complete:
            return None, "its run folder holds no complete run"
        try:
            if candidate.stat().st_size > MAX_EMBEDDED_IMAGE_BYTES:
                return None, "it is larger than a reliability diagram"
            data = run.read_bytes(RELIABILITY)
        except (OSError, MedbenchError) as err:
            return None, str(err)
        if not data.startswith(PNG_SIGNATURE):
            return None, "it is not a PNG"
        return data, ""
    return None, "it is not the reliability diagram of one of this entry's runs"


def _reliability_images(e: dict, limit: int = 1, consider: int = 10) -> list[Markup]:
    """Up to ``limit`` of the entry's reliability diagrams (of the first ``consider`` paths it lists), and a
    note for each listed path that is not shown (:func:`run_image` says why)."""
    out = []
    shown = 0
    for p in ((e.get("calibration") or {}).get("reliability_diagrams") or [])[:consider]:
        if shown >= limit:
            break
        if not isinstance(p, str):
            continue
        data, why = run_image(e, p)
        if data is None:
            out.append(_note(f"Reliability diagram {p} not shown: {why}."))
            continue
        shown += 1
        src = "data:image/png;base64," + base64.b64encode(data).decode()
        out.append(el("figure", None,
                      el("img", {"class": "reliability", "data-plot": "reliability", "alt": "reliability diagram",
                                 "src": src}),
                      el("figcaption", None, f"{e['task']} · {e['backbone']} ({label(e)}), run {Path(p).parent.parent.name}")))
    return out


def _calibration(board: dict) -> Markup:
    from medbench.board.plots import calibration_bars

    headers = [("task", "task"), ("backbone", "backbone"), ("init", "init"), ("ece_b", "ECE"), ("ece_a", "ECE (T-scaled)"),
               ("brier_b", "Brier"), ("nll_b", "NLL"), ("temperature", "temperature scaling")]
    rows = []
    imgs: list[Markup] = []
    for e in board["entries"]:
        cal = e.get("calibration")
        if not cal:
            continue
        b, a = cal.get("before") or {}, cal.get("after") or {}
        rows.append(_tr([_td(e["task"]), _td(e["backbone"]), _td(label(e))]
                        + [_td(mean_std(s.get(k)), _m(s.get(k))) for s, k in ((b, "ece"), (a, "ece"), (b, "brier"), (b, "nll"))]
                        + [_td(temperature_text(e))]))
        imgs += _reliability_images(e)
    if not rows:
        return _note("No calibration blocks in this board.")
    return fragment(_table(headers, rows), el("div", {"class": "plots"}, calibration_bars(board["entries"]), imgs))


def _fairness(board: dict) -> Markup:
    from medbench.board.plots import fairness_groups

    parts = []
    for e in board["entries"]:
        attrs = ((e.get("fairness") or {}).get("attributes") or {})
        if not attrs:
            continue
        headers = [("attribute", "attribute"), ("worst", "worst group"), ("gap", "AUC gap"), ("eod", "equalized odds diff."),
                   ("groups", "groups (AUC)")]
        rows = []
        for name, a in attrs.items():
            worst = (a.get("worst_group") or {}).get("auc") if isinstance(a.get("worst_group"), dict) else a.get("worst_group")
            groups = ", ".join(f"{g}: {num(_m(b.get('auc')))}" for g, b in (a.get("groups") or {}).items()
                               if isinstance(b, dict))
            rows.append(_tr([_td(name), _td(worst if isinstance(worst, str) else "varies"),
                             _td(mean_std((a.get("gap") or {}).get("auc")), _m((a.get("gap") or {}).get("auc"))),
                             _td(mean_std(a.get("equalized_odds_difference")), _m(a.get("equalized_odds_difference"))),
                             _td(groups)]))
        plots = [fairness_groups(e, n) for n in list(attrs)[:3]]
        parts.append(fragment(el("h3", None, f"{e['task']} · {e['backbone']} ({label(e)})"), _table(headers, rows),
                              el("div", {"class": "plots"}, plots)))
    return fragment(parts) if parts else _note("No fairness blocks in this board.")


def _shift(board: dict) -> Markup:
    from medbench.board.plots import shift_heatmap

    parts = []
    for m in board.get("shift_matrix") or []:
        rows = [_tr([_td(c["trained_on"]), _td(c["evaluated_on"]), _td(c["metric"]),
                     _td(mean_std(c["value"]) if isinstance(c["value"], dict) else num(c["value"]), _m(c["value"])),
                     _td(mean_std(c["drop"]), _m(c["drop"])) if c.get("drop") else _td("–")]) for c in m["cells"]]
        parts.append(fragment(el("h3", None, f"{m['backbone']} ({m['init']})"),
                              el("div", {"class": "plots"}, shift_heatmap(m)),
                              _table([("trained", "trained on"), ("evaluated", "evaluated on"), ("metric", "metric"),
                                      ("value", "value"), ("drop", "drop")], rows)))
    return fragment(parts) if parts else _note("No OOD targets in this board.")


def _convergence(board: dict) -> Markup:
    rows = []
    for e in board["entries"]:
        c = e.get("convergence")
        if not c:
            continue
        rows.append(_tr([_td(e["task"]), _td(e["backbone"]), _td(label(e)), _td(c.get("metric", "")),
                         _td(mean_std(c.get("steps_to_95")), _m(c.get("steps_to_95"))),
                         _td(mean_std(c.get("steps_to_99")), _m(c.get("steps_to_99"))),
                         _td(c.get("total_steps", "–"), c.get("total_steps"))]))
    if not rows:
        return _note("No convergence blocks in this board.")
    return _table([("task", "task"), ("backbone", "backbone"), ("init", "init"), ("metric", "validation metric"),
                   ("s95", "steps to 95%"), ("s99", "steps to 99%"), ("total", "total steps")], rows)


def _efficiency(board: dict) -> Markup:
    from medbench.board.plots import efficiency_curves

    plots = [efficiency_curves(board["entries"], k) for k in ("fraction", "shots")]
    rows = []
    for e in board["entries"]:
        for kind, curve in (e.get("data_efficiency") or {}).items():
            for p in curve["points"]:
                s = (p.get("metrics") or {}).get(curve["metric"])
                rows.append(_tr([_td(e["task"]), _td(e["backbone"]), _td(kind), _td(p[curve["x"]], p[curve["x"]]),
                                 _td(mean_std(s), _m(s))]))
            rows.append(_tr([_td(e["task"]), _td(e["backbone"]), _td(f"{kind}: normalized area"), _td("–"),
                             _td(mean_std(curve.get("area")), _m(curve.get("area")))]))
    if not rows:
        return _note("No data-efficiency runs (--fractions/--shots) in this board.")
    return fragment(el("div", {"class": "plots"}, plots), _table(
        [("task", "task"), ("backbone", "backbone"), ("kind", "kind"), ("x", "x"), ("value", "headline")], rows))


def _resolution(board: dict) -> Markup:
    rows = []
    for e in board["entries"]:
        res = e.get("resolution")
        if not res:
            continue
        for p in res["points"]:
            s = (p.get("metrics") or {}).get(res["metric"])
            rel = (p.get("relative_to_default") or {})
            rows.append(_tr([_td(e["task"]), _td(e["backbone"]), _td(p["crop"], p["crop"]), _td(mean_std(s), _m(s)),
                             _td(num(rel.get("delta")), rel.get("delta")), _td(num(rel.get("p_value")), rel.get("p_value"))]))
    if not rows:
        return _note("No resolution runs (--resolutions) in this board.")
    return _table([("task", "task"), ("backbone", "backbone"), ("crop", "crop"), ("value", "headline"),
                   ("delta", "Δ vs default"), ("p", "p")], rows)


def _protocols(board: dict) -> Markup:
    protocols, rows = protocol_table(board)
    if not protocols:
        return _note("One protocol in this board. ", el("code", None, "medbench run --protocol finetune,linear,knn"),
                     " evaluates a backbone by fine-tuning, a linear probe and kNN on frozen features.")
    out = []
    for (task, backbone, init), by in rows:
        metric = next(iter(by.values()))["headline"]["metric"]
        cells = [_td(mean_std(by[p]["headline"]) if p in by else "–",
                     by[p]["headline"].get("mean") if p in by else None, "value") for p in protocols]
        out.append(_tr([_td(task), _td(backbone), _td(init), _td(metric), *cells]))
    note = _note("The headline metric of each protocol (mean ± std over seeds): full fine-tuning, a linear probe and "
                 "kNN on frozen features. A probe of pre-trained weights on the full training set has one seed (its "
                 "fit is deterministic).")
    return fragment(note, _table([("task", "task"), ("backbone", "backbone"), ("init", "init"), ("metric", "metric"),
                                  *[(p, p) for p in protocols]], out))


def _published(published: list[dict]) -> Markup:
    if not published:
        return _note("No published rows for these tasks (or --published not given).")
    rows = [_tr([_td(e["task"]), _td(e["backbone"]), _td(label(e)), _td(e["headline"]["metric"]),
                 _td(published_value(e), e["headline"].get("mean")), _td(e.get("citation")),
                 _td(f"{(e.get('paper') or {}).get('target', '')} / {(e.get('paper') or {}).get('column', '')}")],
                "published") for e in published]
    return _table([("task", "task"), ("backbone", "backbone"), ("init", "init"), ("metric", "metric"),
                   ("value", "mean ± std"), ("citation", "citation"), ("paper", "paper's row / column")], rows)


def _provenance(board: dict) -> Markup:
    rows = []
    for e in board["entries"]:
        p = e.get("provenance") or {}
        rows.append(_tr([_td(e["task"]), _td(e["backbone"]), _td(label(e)), _td(p.get("task_version")),
                         _td(str(p.get("task_hash") or "")[:12]), _td(str(p.get("data_fingerprint") or "")[:12]),
                         _td(str(p.get("weights_sha256") or "–")[:12]), _td(", ".join(map(str, p.get("seeds") or []))),
                         _td((p.get("device") or {}).get("device", "–")), _td(p.get("medbench_version")),
                         _td(str(p.get("git_sha") or "–")[:12]), _td(p.get("date"))]))
    libs = board["provenance"].get("libraries") or {}
    return fragment(_table([("task", "task"), ("backbone", "backbone"), ("init", "init"), ("tv", "task version"),
                            ("th", "task hash"), ("data", "data fingerprint"), ("w", "weights sha256"),
                            ("seeds", "seeds"), ("device", "device"), ("mv", "medbench"), ("git", "git sha"),
                            ("date", "date")], rows),
                    _note("Libraries: " + ", ".join(f"{k} {v}" for k, v in libs.items() if v)))


def render_html(board: dict, published: list[dict] | None = None, title: str = "medbench leaderboard") -> str:
    """One self-contained page: every value from the board escaped for its context by the element builder
    (:mod:`medbench.board.html`), a Content-Security-Policy that runs only the page's own script, nothing
    fetched; the board itself rides along as an inline JSON data block (``#leaderboard-data``)."""
    published = published or []
    prov = board["provenance"]
    sections = {"overview": _overview(board, published), "protocols": _protocols(board),
                "significance": _significance(board),
                "calibration": _calibration(board), "fairness": _fairness(board), "shift": _shift(board),
                "convergence": _convergence(board), "data-efficiency": _efficiency(board),
                "resolution": _resolution(board), "published": _published(published), "provenance": _provenance(board)}
    nav = el("nav", None, [el("a", {"href": f"#view={k}", "data-view": k}, t) for k, t in VIEWS])
    views = [el("section", {"class": "view", "id": f"view-{k}"}, el("h2", None, t), sections[k]) for k, t in VIEWS]
    meta = (f"created {board.get('created') or '–'} · medbench {prov.get('medbench_version', '–')} · git "
            f"{prov.get('git_sha') or '–'} · {board['schema']} v{board['schema_version']} · {len(board['entries'])} entries")
    body = fragment(el("h1", None, title), el("div", {"class": "meta"}, meta), nav, views,
                    json_script("leaderboard-data", board))
    return page(title, CSS, body, JS)
