"""A leaderboard rendered for people: Markdown, or one self-contained HTML page.

Numbers are stored unrounded; they are rounded here only (``DIGITS``). Best
entry per task (and regime, and protocol) in bold; entries *not significantly different from
the best* (``significance.tied_with_best``, paired bootstrap, see
:mod:`medbench.board.significance`) in italics, as CJ21 does. Published
reference rows (``--published``) are listed beside the user's rows of the same
tasks, marked with their citation. A board with several protocols (fine-tuning,
linear probe, kNN) also gets them side by side: a Markdown section and the HTML
view ``protocols``, one row per task x backbone x init, one column per protocol.

Each axis table (overview, protocols, significance, calibration, fairness, OOD shift, convergence, data
efficiency, resolution, published rows, provenance) has one definition, ``*_table(board)``: a
:class:`Table` of columns and rows of plain cell values with the marks the formats need (best / tied,
the HTML sort key and class). Two thin renderers consume it: :func:`md_rows` (through :func:`md_table`,
escaped by :func:`md_cell`) and ``_html_table`` (through the element builder); so both formats show the
same cells, and the page adds only what Markdown cannot carry (plots, figures, sorting, a column or two the
Markdown form has in another section: ``Column.html_only``).

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
from dataclasses import dataclass, field
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


# --------------------------------------------------------------------------- the axis tables
#
# One definition per axis: a function returning a :class:`Table` (columns, and rows of plain values with the
# marks the formats need). The Markdown renderer (:func:`md_rows`, escaped by :func:`md_cell`) and the HTML
# renderer (:func:`_html_table`, escaped by the element builder) both consume it; what only the page shows
# (plots, figures, the sort keys and CSS classes) stays in the HTML renderer on top of the same rows.

#: a cell's mark as Markdown emphasis: the best entry in bold, entries tied with it in italics
EMPHASIS = {"best": "**", "tied": "*"}


@dataclass(frozen=True)
class Cell:
    """One cell: ``text`` as both formats show it (a value from a board or text the renderer rounded; never
    markup), ``value`` the HTML sort key (``data-value``), ``cls`` the HTML cell class, ``mark`` the
    Markdown emphasis (``best`` / ``tied``: :data:`EMPHASIS`)."""

    text: Any
    value: Any = None
    cls: str = ""
    mark: str = ""


@dataclass(frozen=True)
class Column:
    """A column: ``key`` names it in the HTML page (``data-col``, the ``#sort=`` hash), ``title`` is its
    header in both formats; ``html_only`` for what the Markdown form leaves to other sections."""

    key: str
    title: str
    html_only: bool = False


@dataclass(frozen=True)
class Row:
    """A row of cells (a plain value stands for ``Cell(value)``), with the HTML row's class and attributes."""

    cells: list[Any]
    cls: str | None = None
    attrs: dict[str, Any] = field(default_factory=dict)

    def cell(self, i: int) -> Cell:
        c = self.cells[i]
        return c if isinstance(c, Cell) else Cell(c)


@dataclass(frozen=True)
class Table:
    columns: list[Column]
    rows: list[Row]


def _columns(*spec: tuple[str, str] | Column) -> list[Column]:
    return [c if isinstance(c, Column) else Column(*c) for c in spec]


def _sort_value(s: Any) -> Any:
    """The sort key of a summary over seeds (its mean) or of a plain number."""
    return _m(s) if isinstance(s, dict) else s


def _summary(s: Any) -> Cell:
    """A summary over seeds (mean ± std), sorted on its mean."""
    return Cell(mean_std(s), _m(s))


def _number(v: Any) -> Cell:
    """A number rounded to :data:`DIGITS`, sorted on its value."""
    return Cell(num(v), v)


_ENTRY = (("task", "task"), ("backbone", "backbone"), ("init", "init"))


def _entry(e: dict) -> list[Any]:
    return [e["task"], e["backbone"], label(e)]


def _with(board: dict, key: str) -> list[tuple[dict, Any]]:
    """The entries holding a block ``key`` (``calibration``, ``convergence``, ...), each with the block."""
    return [(e, e[key]) for e in board["entries"] if e.get(key)]


def overview_table(board: dict) -> Table:
    """One row per entry: its headline (best in bold, tied with the best in italics), interval, seeds, p vs
    best, OOD, calibration, temperature scaling and warnings."""
    rows = []
    for e in board["entries"]:
        h = e["headline"]
        n_seeds = len(e.get("seeds") or [])
        rows.append(Row([*_entry(e), h["metric"], Cell(mean_std(h), h.get("mean"), "value", mark(e)),
                         Cell(interval(h), (h.get("ci") or {}).get("low")), Cell(n_seeds, n_seeds),
                         Cell(p_text(e), ((e.get("significance") or {}).get("vs_best") or {}).get("p_value")),
                         ood_text(e), ece_text(e), temperature_text(e), warning_codes(e), "this board"],
                        f"entry {mark(e)}", {"data_key": json.dumps([e["task"], e["backbone"], label(e)])}))
    return Table(_columns(*_ENTRY, ("metric", "metric"), ("mean", "mean ± std"), ("interval", "interval"),
                          ("seeds", "seeds"), ("p", "p vs best"), ("ood", "OOD (drop)"), ("ece", "ECE → T-scaled"),
                          ("temperature", "temperature"), ("warnings", "warnings"),
                          Column("source", "source", html_only=True)), rows)


def protocols_table(board: dict) -> Table:
    """The protocols side by side (:func:`protocol_table`): one row per task x backbone x init, one column per
    protocol; the best of its task within a protocol marked. No rows for a board of one protocol."""
    protocols, by_key = protocol_table(board)
    rows = []
    for (task, backbone, init), by in by_key:
        metric = next(iter(by.values()))["headline"]["metric"]
        cells = [Cell(mean_std(by[p]["headline"]), by[p]["headline"].get("mean"), "value",
                      "best" if mark(by[p]) == "best" else "") if p in by else Cell("–", None, "value")
                 for p in protocols]
        rows.append(Row([task, backbone, init, metric, *cells]))
    return Table(_columns(*_ENTRY, ("metric", "metric"), *[(p, p) for p in protocols]), rows)


def significance_table(board: dict) -> Table:
    """Each compared entry against the best of its task: paired difference, its interval and p."""
    rows = []
    for e, sig in _with(board, "significance"):
        vs = sig.get("vs_best") or {}
        ci = vs.get("ci") or {}
        rows.append(Row([*_entry(e), num(sig["best"]),
                         num(sig["tied_with_best"]) + (f" ({sig['reason']})" if sig.get("reason") else ""),
                         _number(vs.get("delta")), f"[{num(ci.get('low'))}, {num(ci.get('high'))}]" if ci else "–",
                         _number(vs.get("p_value"))], mark(e) or None))
    return Table(_columns(*_ENTRY, ("best", "best"), ("tied", "tied with best"), ("delta", "Δ vs best"),
                          ("interval", "paired interval"), ("p", "p")), rows)


#: the calibration metrics, before and after temperature scaling
_CALIBRATION = (("ece", "ECE"), ("mce", "MCE"), ("brier", "Brier"), ("nll", "NLL"))


def calibration_table(board: dict) -> Table:
    rows = []
    for e, cal in _with(board, "calibration"):
        b, a = cal.get("before") or {}, cal.get("after") or {}
        rows.append(Row([*_entry(e), *(_summary(s.get(k)) for k, _ in _CALIBRATION for s in (b, a)),
                         temperature_text(e)]))
    return Table(_columns(*_ENTRY, *(c for k, title in _CALIBRATION
                                     for c in ((f"{k}_b", title), (f"{k}_a", f"{title} (T-scaled)"))),
                          Column("temperature", "temperature scaling", html_only=True)), rows)


def fairness_tables(board: dict) -> list[tuple[dict, Table]]:
    """Per entry with fairness blocks: one row per attribute (worst group, AUC gap, equalized odds and
    demographic parity differences, each group's size and AUC); an attribute that could not be evaluated
    says why."""
    out = []
    for e in board["entries"]:
        attrs = (e.get("fairness") or {}).get("attributes") or {}
        if not attrs:
            continue
        rows = []
        for name, a in attrs.items():
            if a.get("status") == "unavailable" or (not a.get("groups") and a.get("reason")):
                rows.append(Row([name, "unavailable", a.get("reason") or "–", "–", "–", "–"]))
                continue
            worst = a.get("worst_group")
            worst = worst.get("auc") if isinstance(worst, dict) else worst
            groups = "; ".join(
                f"{g}: n {b.get('n', '–')}, AUC {num(_m(b.get('auc')))}" + (f" ({b['status']})" if b.get("status")
                                                                            not in (None, "ok") else "")
                for g, b in (a.get("groups") or {}).items() if isinstance(b, dict))
            rows.append(Row([name, worst if isinstance(worst, str) else "varies over seeds",
                             _summary((a.get("gap") or {}).get("auc")), _summary(a.get("equalized_odds_difference")),
                             _summary(a.get("demographic_parity_difference")), groups or "–"]))
        out.append((e, Table(_columns(("attribute", "attribute"), ("worst", "worst group (AUC)"), ("gap", "AUC gap"),
                                      ("eod", "equalized odds diff."), ("dpd", "demographic parity diff."),
                                      ("groups", "groups")), rows)))
    return out


def shift_matrix_tables(board: dict) -> list[tuple[dict, Table]]:
    """Per backbone x init of the board's shift matrix: one row per trained-on x evaluated-on cell."""
    return [(m, Table(_columns(("trained", "trained on"), ("evaluated", "evaluated on"), ("metric", "metric"),
                               ("value", "value"), ("drop", "drop")),
                      [Row([c["trained_on"], c["evaluated_on"], c["metric"],
                            _summary(c["value"]) if isinstance(c["value"], dict) else Cell(num(c["value"])),
                            _summary(c["drop"]) if c.get("drop") else "–"]) for c in m["cells"]]))
            for m in board.get("shift_matrix") or []]


def shift_entries_table(board: dict) -> Table:
    """Per entry, OOD target and metric: in-distribution and target values, drop and relative drop."""
    rows = []
    for e in board["entries"]:
        for target, metrics in (e.get("shift") or {}).items():
            for metric, v in metrics.items():
                if isinstance(v, dict) and "drop" in v:
                    rows.append(Row([*_entry(e), target, metric, *(_summary(v.get(k)) for k in (
                        "in_distribution", "target", "drop", "relative_drop"))]))
    return Table(_columns(*_ENTRY, ("target", "target"), ("metric", "metric"), ("in", "in distribution"),
                          ("value", "target value"), ("drop", "drop"), ("relative", "relative drop")), rows)


def convergence_table(board: dict) -> Table:
    rows = []
    for e, c in _with(board, "convergence"):
        rows.append(Row([*_entry(e), c.get("metric", ""),
                         *(Cell(steps_text(c.get(k)), _sort_value(c.get(k)))
                           for k in ("steps_to_95", "steps_to_99", "total_steps"))]))
    return Table(_columns(*_ENTRY, ("metric", "validation metric"), ("s95", "steps to 95%"), ("s99", "steps to 99%"),
                          ("total", "total steps")), rows)


def efficiency_table(board: dict) -> Table:
    """Per entry and kind (``fraction``, ``shots``): one row per point, then the curve's normalized area."""
    rows = []
    for e in board["entries"]:
        for kind, curve in (e.get("data_efficiency") or {}).items():
            for p in curve["points"]:
                n = p.get("n_train")
                rows.append(Row([*_entry(e), kind, _number(p[curve["x"]]),
                                 Cell(steps_text(n) if isinstance(n, dict) else num(n), _sort_value(n)),
                                 _summary((p.get("metrics") or {}).get(curve["metric"]))]))
            rows.append(Row([*_entry(e), f"{kind}: normalized area", "–", "–", _summary(curve.get("area"))]))
    return Table(_columns(*_ENTRY, ("kind", "kind"), ("x", "x"), ("n_train", "training images"),
                          ("value", "headline")), rows)


def resolution_table(board: dict) -> Table:
    rows = []
    for e, res in _with(board, "resolution"):
        for p in res["points"]:
            rel = p.get("relative_to_default") or {}
            rows.append(Row([*_entry(e), Cell(p["crop"], p["crop"]),
                             _summary((p.get("metrics") or {}).get(res["metric"])), _number(rel.get("delta")),
                             _number(rel.get("p_value"))]))
    return Table(_columns(*_ENTRY, ("crop", "crop"), ("value", "headline"), ("delta", "Δ vs default"), ("p", "p")),
                 rows)


def published_table(published: list[dict]) -> Table:
    """Published reference rows of the board's tasks, with their citation and the paper's row / column."""
    return Table(_columns(*_ENTRY, ("metric", "metric"), ("value", "mean ± std"), ("citation", "source"),
                          ("paper", "paper's row / column")),
                 [Row([*_entry(e), e["headline"]["metric"], Cell(published_value(e), e["headline"].get("mean")),
                       e.get("citation"),
                       f"{(e.get('paper') or {}).get('target', '')} / {(e.get('paper') or {}).get('column', '')}"],
                      "published") for e in published])


def provenance_table(board: dict) -> Table:
    rows = []
    for e in board["entries"]:
        p = e.get("provenance") or {}
        rows.append(Row([*_entry(e), p.get("task_version"), str(p.get("task_hash") or "")[:12],
                         str(p.get("data_fingerprint") or "")[:12], str(p.get("weights_sha256") or "–")[:12],
                         ", ".join(map(str, p.get("seeds") or [])), (p.get("device") or {}).get("device", "–"),
                         p.get("medbench_version"), str(p.get("git_sha") or "–")[:12], p.get("date")]))
    return Table(_columns(*_ENTRY, ("tv", "task version"), ("th", "task hash"), ("data", "data fingerprint"),
                          ("w", "weights sha256"), ("seeds", "seeds"), ("device", "device"), ("mv", "medbench"),
                          ("git", "git sha"), ("date", "date")), rows)


def libraries_text(board: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in (board["provenance"].get("libraries") or {}).items() if v)


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


def md_rows(table: Table) -> list[str]:
    """An axis table as a Markdown table (every cell escaped by :func:`md_cell`; a marked cell emphasized)."""
    keep = [i for i, c in enumerate(table.columns) if not c.html_only]

    def text(c: Cell) -> Any:
        return md_emphasis(c.text, EMPHASIS[c.mark]) if c.mark in EMPHASIS else c.text

    return md_table([table.columns[i].title for i in keep], [[text(r.cell(i)) for i in keep] for r in table.rows])


def _md_section(title: str, lines: list[str], empty: str) -> list[str]:
    return ["", f"## {title}", "", *(lines or [f"_{empty}_"])]


def _md_axis(table: Table) -> list[str]:
    return md_rows(table) if table.rows else []


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
           "*italics*: not significantly different from the best" + md_cell(_method_note(board)) + ".", "",
           *md_rows(overview_table(board))]
    warned = [e for e in board["entries"] if e.get("warnings")]
    if warned:
        out += ["", "## Warnings", ""]
        for e in warned:
            out.append(f"* {md_text(e['task'])} · {md_cell(e['backbone'])} · {md_cell(label(e))}:")
            out += [f"  * {md_text(line)}" for line in warning_lines(e)]
    protocols = protocols_table(board)
    protocol_lines: list[str] = []
    if protocols.rows:
        protocol_lines = [("Headline metric, mean ± std over seeds (a probe of pre-trained weights on the full "
                           "training set has one seed: its fit is deterministic). **Bold**: best of its task within "
                           "the protocol."), "", *md_rows(protocols)]
    out += _md_section("Protocols", protocol_lines, "One protocol in this board: nothing to put side by side.")
    for title, section, empty in (
            ("Significance", _md_significance(board), "One entry per task: nothing to compare."),
            ("Calibration", _md_axis(calibration_table(board)), "No calibration blocks in this board."),
            ("Fairness", _md_fairness(board), "No fairness blocks in this board."),
            ("OOD shift", _md_shift(board), "No OOD targets in this board."),
            ("Convergence", _md_axis(convergence_table(board)), "No convergence blocks in this board."),
            ("Data efficiency", _md_axis(efficiency_table(board)),
             "No data-efficiency runs (--fractions/--shots) in this board."),
            ("Resolution", _md_axis(resolution_table(board)), "No resolution runs (--resolutions) in this board.")):
        out += _md_section(title, section, empty)
    if published:
        out += _md_section("Published reference rows (same tasks)", md_rows(published_table(published)), "")
    out += _md_section("Provenance", [*md_rows(provenance_table(board)), "",
                                      "Libraries: " + md_cell(libraries_text(board) or "–")], "")
    return "\n".join(out) + "\n"


def _md_significance(board: dict) -> list[str]:
    table = significance_table(board)
    if not table.rows:
        return []
    method = board.get("significance") or {}
    note = md_text(f"Test: {method.get('test')}; alpha = {method.get('alpha')}; grouped by "
                   f"{', '.join(map(str, method.get('group_by') or []))}.") if method else ""
    return [note, "", *md_rows(table)]


def _md_fairness(board: dict) -> list[str]:
    out: list[str] = []
    for e, table in fairness_tables(board):
        out += ["", f"### {md_text(e['task'])} · {md_text(e['backbone'])} ({md_text(label(e))})", "", *md_rows(table)]
    return out[1:]


def _md_shift(board: dict) -> list[str]:
    out: list[str] = []
    for m, table in shift_matrix_tables(board):
        out += ["", f"### {md_text(m['backbone'])} ({md_text(m['init'])})", "", *md_rows(table)]
    entries = shift_entries_table(board)
    if entries.rows:
        out += ["", "### Per entry", "", *md_rows(entries)]
    return out[1:]


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


def _html_table(table: Table, *, table_id: str = "", extra: list[Row] | None = None) -> Markup:
    """An axis table (and ``extra`` rows only the page shows) as a sortable HTML table: every cell through the
    element builder, with its sort key and class."""
    rows = [_tr([_td(c.text, c.value, c.cls) for c in map(r.cell, range(len(r.cells)))], r.cls, **r.attrs)
            for r in [*table.rows, *(extra or [])]]
    return _table([(c.key, c.title) for c in table.columns], rows, table_id=table_id)


def _overview(board: dict, published: list[dict]) -> Markup:
    dash = ["–"] * 5
    extra = [Row([*_entry(e), e["headline"]["metric"], Cell(published_value(e), e["headline"].get("mean"), "value"),
                  "–", Cell(e["headline"].get("n") or "–", e["headline"].get("n")), *dash,
                  f"published: {e.get('citation')}"], "published") for e in published]
    note = _note("Test split. mean ± std over seeds (ddof=1); interval: percentile interval of the seed mean over "
                 "test resamples. ", el("b", None, "Bold"), ": best entry of its task; ", el("i", None, "italics"),
                 f": not significantly different from the best{_method_note(board)}. Click a header to sort.")
    return fragment(note, _html_table(overview_table(board), table_id="board-table", extra=extra), _warnings(board))


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
    table = significance_table(board)
    method = board.get("significance")
    if method:
        note = _note(f"Test: {method['test']}; alpha = {method['alpha']}; grouped by "
                     f"{', '.join(map(str, method['group_by']))}.")
    else:
        note = _note("One entry per task: nothing to compare.")
    return fragment(note, _html_table(table) if table.rows else None)


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

    table = calibration_table(board)
    if not table.rows:
        return _note("No calibration blocks in this board.")
    imgs = [img for e in board["entries"] if e.get("calibration") for img in _reliability_images(e)]
    return fragment(_html_table(table), el("div", {"class": "plots"}, calibration_bars(board["entries"]), imgs))


def _fairness(board: dict) -> Markup:
    from medbench.board.plots import fairness_groups

    parts = []
    for e, table in fairness_tables(board):
        attrs = e["fairness"]["attributes"]
        plots = [fairness_groups(e, n) for n in list(attrs)[:3]]
        parts.append(fragment(el("h3", None, f"{e['task']} · {e['backbone']} ({label(e)})"), _html_table(table),
                              el("div", {"class": "plots"}, plots)))
    return fragment(parts) if parts else _note("No fairness blocks in this board.")


def _shift(board: dict) -> Markup:
    from medbench.board.plots import shift_heatmap

    parts = [fragment(el("h3", None, f"{m['backbone']} ({m['init']})"), el("div", {"class": "plots"}, shift_heatmap(m)),
                      _html_table(table)) for m, table in shift_matrix_tables(board)]
    entries = shift_entries_table(board)
    if entries.rows:
        parts.append(fragment(el("h3", None, "Per entry"), _html_table(entries)))
    return fragment(parts) if parts else _note("No OOD targets in this board.")


def _convergence(board: dict) -> Markup:
    table = convergence_table(board)
    return _html_table(table) if table.rows else _note("No convergence blocks in this board.")


def _efficiency(board: dict) -> Markup:
    from medbench.board.plots import efficiency_curves

    table = efficiency_table(board)
    if not table.rows:
        return _note("No data-efficiency runs (--fractions/--shots) in this board.")
    plots = [efficiency_curves(board["entries"], k) for k in ("fraction", "shots")]
    return fragment(el("div", {"class": "plots"}, plots), _html_table(table))


def _resolution(board: dict) -> Markup:
    table = resolution_table(board)
    return _html_table(table) if table.rows else _note("No resolution runs (--resolutions) in this board.")


def _protocols(board: dict) -> Markup:
    table = protocols_table(board)
    if not table.rows:
        return _note("One protocol in this board. ", el("code", None, "medbench run --protocol finetune,linear,knn"),
                     " evaluates a backbone by fine-tuning, a linear probe and kNN on frozen features.")
    note = _note("The headline metric of each protocol (mean ± std over seeds): full fine-tuning, a linear probe and "
                 "kNN on frozen features. A probe of pre-trained weights on the full training set has one seed (its "
                 "fit is deterministic).")
    return fragment(note, _html_table(table))


def _published(published: list[dict]) -> Markup:
    if not published:
        return _note("No published rows for these tasks (or --published not given).")
    return _html_table(published_table(published))


def _provenance(board: dict) -> Markup:
    return fragment(_html_table(provenance_table(board)), _note("Libraries: " + libraries_text(board)))


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
