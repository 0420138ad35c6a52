"""The Markdown board carries every axis the HTML page has, as tables (issue 17), checked on the committed
smoke leaderboard (every axis present) against its JSON numbers formatted by hand."""

from __future__ import annotations

import json
import re

import pytest
from conftest import REPO

from medbench.board.render import VIEWS, render_html, render_markdown

SMOKE_CPU = REPO / "leaderboards" / "smoke-cpu.json"


@pytest.fixture(scope="module")
def board() -> dict:
    return json.loads(SMOKE_CPU.read_text())


def sections(md: str) -> dict[str, str]:
    parts = re.split(r"^## (.+)$", md, flags=re.M)
    return {parts[i].strip(): parts[i + 1] for i in range(1, len(parts), 2)}


def table_rows(text: str) -> list[list[str]]:
    """Body rows of the Markdown tables in ``text`` (header and rule lines skipped)."""
    rows, lines = [], text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("| ") and not (i + 1 < len(lines) and lines[i + 1].startswith("|---")) \
                and not line.startswith("|---"):
            rows.append([c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]])
    return rows


def f4(v: float) -> str:
    return f"{v:.4f}"


def test_every_html_view_has_a_markdown_section(board: dict) -> None:
    md = render_markdown(board)
    html = render_html(board)
    got = sections(md)
    for key, title in VIEWS:
        if key in ("overview", "published"):
            continue  # the headline table opens the page; published rows need --published
        assert f'id="view-{key}"' in html
        assert (title if key != "shift" else "OOD shift") in got, (title, list(got))


def test_markdown_axis_tables_hold_the_board_numbers(board: dict) -> None:
    got = sections(render_markdown(board))
    entries = board["entries"]
    cal = table_rows(got["Calibration"])
    assert len(cal) == sum(1 for e in entries if e.get("calibration"))
    for e, row in zip([e for e in entries if e.get("calibration")], cal):
        b, a = e["calibration"]["before"], e["calibration"]["after"]
        assert row[:3] == [e["task"], e["backbone"], e["init"]]
        assert row[3].startswith(f4(b["ece"]["mean"])) and row[4].startswith(f4(a["ece"]["mean"]))
        assert row[9].startswith(f4(b["nll"]["mean"])) and row[10].startswith(f4(a["nll"]["mean"]))

    fairness = got["Fairness"]
    for e in entries:
        for name, attr in (e.get("fairness") or {}).get("attributes", {}).items():
            gap = (attr.get("gap") or {}).get("auc")
            row = next(r for r in table_rows(fairness.split(f"### {e['task']} · {e['backbone']}")[1].split("###")[0])
                       if r[0] == name)
            if isinstance(gap, dict) and gap.get("mean") is not None:
                assert row[2].startswith(f4(gap["mean"]))
            for group, g in attr["groups"].items():
                assert f"{group}: n {g['n']}," in row[5]

    shift = table_rows(got["OOD shift"])
    cells = [c for m in board["shift_matrix"] for c in m["cells"]]
    assert cells
    for c in cells:
        assert any(r[:3] == [c["trained_on"], c["evaluated_on"], c["metric"]]
                   and r[3].startswith(f4(c["value"]["mean"])) for r in shift), c
    drops = [(e["task"], t, m, v["drop"]["mean"]) for e in entries for t, ms in (e.get("shift") or {}).items()
             for m, v in ms.items() if isinstance(v, dict) and (v.get("drop") or {}).get("mean") is not None]
    assert drops
    for task, target, metric, drop in drops:
        assert any(r[0] == task and r[3] == target and r[4] == metric and r[7].startswith(f4(drop)) for r in shift)

    conv = table_rows(got["Convergence"])
    for e, row in zip([e for e in entries if e.get("convergence")], conv):
        s95 = e["convergence"]["steps_to_95"]
        whole = f"{s95['mean']:.0f}" if float(s95["mean"]).is_integer() else f"{s95['mean']:.1f}"
        assert row[4].split(" ")[0] == whole  # steps are whole numbers, not 30.0000
        assert row[6] == str(e["convergence"]["total_steps"])

    eff = table_rows(got["Data efficiency"])
    points = [(e["task"], k, p[c["x"]], p["metrics"][c["metric"]]["mean"]) for e in entries
              for k, c in (e.get("data_efficiency") or {}).items() for p in c["points"]]
    assert points
    for task, kind, x, value in points:
        assert any(r[0] == task and r[3] == kind and r[4] == (f4(x) if isinstance(x, float) else str(x))
                   and r[6].startswith(f4(value)) for r in eff), (task, kind, x)

    res = table_rows(got["Resolution"])
    crops = [(e["task"], p["crop"], p["metrics"][e["resolution"]["metric"]]["mean"]) for e in entries
             if e.get("resolution") for p in e["resolution"]["points"]]
    assert crops
    for task, crop, value in crops:
        assert any(r[0] == task and r[3] == str(crop) and r[4].startswith(f4(value)) for r in res)

    prov = table_rows(got["Provenance"])
    assert [r[4] for r in prov] == [e["provenance"]["task_hash"][:12] for e in entries]


def test_markdown_cells_escape_pipes(board: dict) -> None:
    b = json.loads(json.dumps(board))
    b["entries"][0]["backbone"] = "my|net"
    md = render_markdown(b)
    assert "my\\|net" in md and "| my|net |" not in md


def html_tables(page: str) -> dict[str, list[tuple[list[str], list[list[str]]]]]:
    """The tables of each view of an HTML page as Python's own HTML parser (an independent oracle) reads them:
    view -> [(headers, rows of cell text)]."""
    from html.parser import HTMLParser

    views: dict[str, list[tuple[list[str], list[list[str]]]]] = {}
    state: dict = {"view": None, "cell": None}

    class P(HTMLParser):
        def handle_starttag(self, tag, attrs):
            a = dict(attrs)
            if tag == "section" and (a.get("id") or "").startswith("view-"):
                state["view"] = a["id"][len("view-"):]
                views[state["view"]] = []
            elif tag == "table":
                views[state["view"]].append(([], []))
            elif tag == "tr" and views.get(state["view"]):
                state["row"] = []
            elif tag in ("th", "td"):
                state["cell"] = []

        def handle_endtag(self, tag):
            if tag in ("th", "td") and state["cell"] is not None:
                text = "".join(state["cell"]).strip()
                (views[state["view"]][-1][0] if tag == "th" else state["row"]).append(text)
                state["cell"] = None
            elif tag == "tr" and state.get("row"):
                views[state["view"]][-1][1].append(state["row"])
                state["row"] = None

        def handle_data(self, data):
            if state["cell"] is not None:
                state["cell"].append(data)

    P(convert_charrefs=True).feed(page)
    return views


def md_tables(text: str) -> list[tuple[list[str], list[list[str]]]]:
    """The Markdown tables in ``text``: (headers, rows), cells unescaped (a backslash escape, the entities)."""
    def unescape(cell: str) -> str:
        return re.sub(r"\\(.)", r"\1", cell).replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")

    out: list[tuple[list[str], list[list[str]]]] = []
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if not line.startswith("| ") or line.startswith("|---"):
            continue
        cells = [unescape(c.strip().strip("*")) for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        if i + 1 < len(lines) and lines[i + 1].startswith("|---"):
            out.append((cells, []))
        else:
            out[-1][1].append(cells)
    return out


def test_each_axis_table_shows_the_same_cells_in_html_and_markdown(board: dict) -> None:
    """One definition per axis table: the HTML page shows every column of the Markdown table with the same text
    (read back by two independent parsers), plus what only the page has (the source, temperature scaling).
    The board adds probe protocols and significance blocks to the smoke board so that every view has a table."""
    b = json.loads(json.dumps(board))
    b["significance"] = {"test": "paired bootstrap", "alpha": 0.05, "group_by": ["task"]}
    for e in b["entries"]:
        e["significance"] = {"best": True, "tied_with_best": False}
    first = b["entries"][0]
    first["significance"] = {"best": False, "tied_with_best": True, "reason": "p >= alpha",
                             "vs_best": {"delta": -0.0125, "ci": {"low": -0.05, "high": 0.025}, "p_value": 0.31}}
    for protocol, scale in (("linear", 0.9), ("knn", 0.8)):
        probe = json.loads(json.dumps(first))
        probe["protocol"] = protocol
        probe["headline"]["mean"] *= scale
        b["entries"].append(probe)
    published = [{**json.loads(json.dumps(first)), "published": True, "citation": "Doe et al. 2024",
                  "paper": {"target": "Table 2", "column": "AUC"}}]
    page = html_tables(render_html(b, published))
    md = render_markdown(b, published)
    got = sections(md)
    md_by_view = {"overview": md_tables(md.split("\n## ", 1)[0]),
                  **{key: md_tables(got[title if key != "shift" else "OOD shift"]) for key, title in VIEWS
                     if key not in ("overview", "published")},
                  "published": md_tables(got["Published reference rows (same tasks)"])}
    for view, md_view in md_by_view.items():
        html_view = page[view]
        assert md_view and len(html_view) == len(md_view), view
        for (h_headers, h_rows), (m_headers, m_rows) in zip(html_view, md_view):
            assert set(m_headers) <= set(h_headers), (view, m_headers, h_headers)
            cols = [h_headers.index(h) for h in m_headers]
            rows = h_rows[:len(m_rows)] if view == "overview" else h_rows  # the page lists published rows too
            assert [[r[i] for i in cols] for r in rows] == m_rows, view
