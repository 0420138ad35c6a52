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
