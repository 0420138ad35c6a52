"""Leaderboard plots as inline SVG text (matplotlib, Agg; no files, no network).

Each function takes leaderboard blocks and returns an ``<svg>`` element (markup of
:mod:`medbench.board.html`: checked, names escaped), or None when the board holds nothing to plot.
Used by :mod:`medbench.board.render`.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from medbench.board.html import Markup


def _figure(w: float = 5.2, h: float = 3.4):
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    plt.rcParams["svg.fonttype"] = "none"  # text stays text (smaller, selectable)
    plt.rcParams["text.parse_math"] = False  # names from a board are text, never mathtext ($...$)
    plt.rcParams["text.usetex"] = False
    fig, ax = plt.subplots(figsize=(w, h), dpi=100)
    return fig, ax


def _svg(fig, label: str) -> "Markup":
    """The figure as inline SVG for the page: checked and re-serialised by :func:`medbench.board.html.svg`,
    ``label`` (which may hold a name from the board) set as escaped attributes."""
    import matplotlib.pyplot as plt

    from medbench.board.html import svg

    buf = io.StringIO()
    fig.tight_layout()
    fig.savefig(buf, format="svg", metadata={"Date": None})
    plt.close(fig)
    return svg(buf.getvalue(), {"class": "plot", "data-plot": label, "role": "img", "aria-label": label})


def _number(v: Any) -> float | None:
    """``v`` as a finite float, else None (a board's numbers are only checked for their JSON type)."""
    import math

    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def _mean(s: Any) -> float | None:
    return _number(s.get("mean")) if isinstance(s, dict) else _number(s)


def _spread(s: Any) -> float:
    """The std of a summary as a non-negative error bar (0 when absent or not a number)."""
    v = _number(s.get("std")) if isinstance(s, dict) else None
    return abs(v) if v is not None else 0.0


def efficiency_curves(entries: list[dict], kind: str) -> "Markup | None":
    """Headline metric vs training fraction (or shots per class), one line per entry, ± std error bars."""
    lines = []
    for e in entries:
        curve = (e.get("data_efficiency") or {}).get(kind)
        if not curve:
            continue
        xs, ys, err = [], [], []
        for p in curve["points"]:
            s = (p.get("metrics") or {}).get(curve["metric"]) or {}
            x = _number(p.get(curve["x"]))
            if _mean(s) is None or x is None:
                continue
            xs.append(x)
            ys.append(_mean(s))
            err.append(_spread(s))
        if xs:
            lines.append((f"{e['task']} · {e['backbone']} ({e['init']})", xs, ys, err, curve["metric"]))
    if not lines:
        return None
    fig, ax = _figure()
    for label, xs, ys, err, _ in lines:
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=label)
    ax.set_xlabel("fraction of the training set" if kind == "fraction" else "examples per class")
    if kind == "shots" or (min(min(x for x in ln[1]) for ln in lines) > 0 and kind == "fraction"):
        ax.set_xscale("log")
    ax.set_ylabel(lines[0][4])
    ax.set_title(f"data efficiency ({kind})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _svg(fig, f"data-efficiency-{kind}")


def shift_heatmap(matrix: dict) -> "Markup | None":
    """Trained on (rows) x evaluated on (columns): the headline metric's seed mean, annotated."""
    import numpy as np

    rows, cols = matrix["rows"], matrix["columns"]
    if not rows or not cols:
        return None
    grid = np.full((len(rows), len(cols)), np.nan)
    for c in matrix["cells"]:
        v = _mean(c.get("value"))
        if v is not None and c["trained_on"] in rows and c["evaluated_on"] in cols:
            grid[rows.index(c["trained_on"]), cols.index(c["evaluated_on"])] = v
    fig, ax = _figure(max(4.0, 1.1 * len(cols) + 2.5), max(2.6, 0.45 * len(rows) + 1.8))
    im = ax.imshow(grid, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(cols)), cols, rotation=35, ha="right", fontsize=7)
    ax.set_yticks(range(len(rows)), rows, fontsize=7)
    for i in range(len(rows)):
        for j in range(len(cols)):
            if not np.isnan(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.3f}", ha="center", va="center", fontsize=7,
                        color="white" if grid[i, j] < np.nanmean(grid) else "black")
    ax.set_xlabel("evaluated on")
    ax.set_ylabel("trained on")
    ax.set_title(f"OOD shift: {matrix['backbone']} ({matrix['init']})")
    fig.colorbar(im, ax=ax, fraction=0.04)
    return _svg(fig, "shift-matrix")


def calibration_bars(entries: list[dict]) -> "Markup | None":
    """ECE before and after temperature scaling per entry (seed mean ± std)."""
    rows = []
    for e in entries:
        cal = e.get("calibration") or {}
        b, a = (cal.get("before") or {}).get("ece"), (cal.get("after") or {}).get("ece")
        if _mean(b) is not None and _mean(a) is not None:
            rows.append((f"{e['task']}\n{e['backbone']}", b, a))
    if not rows:
        return None
    import numpy as np

    fig, ax = _figure(max(4.0, 0.9 * len(rows) + 2), 3.2)
    x = np.arange(len(rows))
    for off, idx, label in ((-0.2, 1, "before"), (0.2, 2, "after T-scaling")):
        ax.bar(x + off, [_mean(r[idx]) for r in rows], 0.4, yerr=[_spread(r[idx]) for r in rows],
               capsize=2, label=label)
    ax.set_xticks(x, [r[0] for r in rows], fontsize=7)
    ax.set_ylabel("ECE")
    ax.set_title("calibration error")
    ax.legend(fontsize=7)
    return _svg(fig, "calibration-ece")


def fairness_groups(entry: dict, attribute: str, metric: str = "auc") -> "Markup | None":
    """One bar per group of ``attribute``: the metric's seed mean with its test-resampling interval."""
    attr = ((entry.get("fairness") or {}).get("attributes") or {}).get(attribute)
    if not attr:
        return None
    names, means, lo, hi = [], [], [], []
    for g, block in attr.get("groups", {}).items():
        s = block.get(metric) if isinstance(block, dict) else None
        m = _mean(s)
        if m is None:
            continue
        ci = s.get("ci") if isinstance(s, dict) and isinstance(s.get("ci"), dict) else {}
        low, high = _number(ci.get("low")), _number(ci.get("high"))
        names.append(f"{g}\n(n={block.get('n')})")
        means.append(m)
        lo.append(max(0.0, m - low) if low is not None else 0.0)  # an interval that misses its mean: no bar
        hi.append(max(0.0, high - m) if high is not None else 0.0)
    if not names:
        return None
    fig, ax = _figure(max(3.0, 0.7 * len(names) + 1.8), 2.8)
    ax.bar(range(len(names)), means, yerr=[lo, hi], capsize=3, color="#4c78a8")
    ax.set_xticks(range(len(names)), names, fontsize=7)
    ax.set_ylim(max(0.0, min(means) - 0.15), min(1.0, max(means) + 0.1))
    ax.set_ylabel(metric)
    ax.set_title(f"{entry['task']} · {entry['backbone']}: {metric} by {attribute}", fontsize=8)
    return _svg(fig, f"fairness-{attribute}")
