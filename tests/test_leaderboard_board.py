"""Leaderboards people can trust: schema, published rows, significance, the regression gate, rendering.

Boards come from generated run folders (tests/fake_runs.py, no training), from the committed
``leaderboards/smoke-cpu.json``, and from the session's smoke suite (``smoke_run``). The HTML page is
checked in a real headless Chromium (Debian's ``chromium``): DOM after its script ran, and a screenshot.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from decimal import Decimal
from pathlib import Path

import pytest
from conftest import REPO, SHARED_DATA, run_cli
from fake_runs import task_spec, write_run

from medbench.board.aggregate import build_leaderboard
from medbench.board.schema import (
    SCHEMA_VERSION,
    LeaderboardFormatError,
    load_board,
    validate_board,
)
from medbench.store import find_run_dirs

SMOKE_CPU = REPO / "leaderboards" / "smoke-cpu.json"
PUBLISHED = REPO / "leaderboards" / "published"
CHROMIUM = Path("/usr/bin/chromium")


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def fake_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """smoke-cxr x 2 seeds for three backbones: 'strong', 'twin' (as strong, other noise: tied with it) and
    'weak'; strong and weak also on 10% and 50% of the data. Scored with 100 resamples."""
    from medbench.store.scores import rescore

    out = tmp_path_factory.mktemp("board-store")
    lean = task_spec("smoke-cxr")
    lean["attributes"] = []
    for backbone, strength, offset in (("fake-strong", 1.8, 0), ("fake-twin", 1.8, 50), ("fake-weak", 0.9, 0)):
        for seed in (0, 1):
            write_run(out, backbone=backbone, seed=seed, model_seed=seed + offset, strength=strength,
                      overconfidence=2.5, spec=None if backbone == "fake-strong" else lean)  # subgroups: one is enough
            if backbone == "fake-twin":
                continue
            for f, s in ((0.1, 0.5), (0.5, 0.75)):
                write_run(out, backbone=backbone, seed=seed, strength=strength * s, spec=lean,
                          variant={"kind": "fraction", "value": f, "n_train": int(400 * f)})
    for run in find_run_dirs([out]):
        rescore(run, {"bootstrap": 100})
    return out


@pytest.fixture(scope="module")
def fake_board(fake_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("board") / "board.json"
    proc = run_cli("leaderboard", str(fake_store), "-o", str(path))
    assert proc.returncode == 0, proc.stderr
    return path


def entries_by_backbone(board: dict) -> dict[str, dict]:
    return {e["backbone"]: e for e in board["entries"]}


# --------------------------------------------------------------------------- schema


def test_written_boards_follow_the_shipped_schema(fake_board: Path) -> None:
    from medbench.board.schema import schema_file

    assert schema_file().is_file() and schema_file().parent.name == "schemas"
    for path in (fake_board, SMOKE_CPU, *sorted(PUBLISHED.glob("*.json"))):
        board = load_board(path)
        assert board["schema_version"] == SCHEMA_VERSION
    board = load_board(fake_board)
    e = entries_by_backbone(board)["fake-strong"]
    prov = e["provenance"]
    for key in ("medbench_version", "git_sha", "task_version", "task_hash", "data_fingerprint", "backbone",
                "weights_sha256", "seeds", "device", "libraries", "date"):
        assert key in prov, key
    assert prov["seeds"] == e["seeds"] == [0, 1] and prov["backbone"] == "fake-strong"
    assert {"calibration", "fairness", "shift", "convergence", "data_efficiency"} <= set(e)


def test_smoke_suite_board_follows_the_schema(smoke_run: Path) -> None:
    board = load_board(smoke_run / "leaderboard.json")
    assert len(board["entries"]) == 6
    assert all(e["provenance"]["weights_sha256"] is None for e in board["entries"])  # random init: no weights file


@pytest.mark.parametrize("breakage, field", [
    (lambda b: b["entries"][0]["headline"].__setitem__("mean", "high"), "entries[0].headline.mean"),
    (lambda b: b["entries"][1]["provenance"].pop("weights_sha256"), "entries[1].provenance.weights_sha256"),
    (lambda b: b["entries"][0]["headline"].pop("ci"), "entries[0].headline.ci"),
    (lambda b: b["entries"][2]["calibration"].pop("before"), "entries[2].calibration.before"),
    (lambda b: b.__setitem__("schema_version", 1), "schema_version"),
])
def test_broken_board_is_rejected_naming_the_field(fake_board: Path, tmp_path: Path, breakage, field) -> None:
    board = json.loads(fake_board.read_text())
    breakage(board)
    with pytest.raises(LeaderboardFormatError) as err:
        validate_board(board, where="b.json")
    text = str(err.value)
    assert "\n" not in text and text.startswith(f"b.json: {field}: "), text
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(board))
    proc = run_cli("compare", str(fake_board), str(bad))
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"medbench: error: {bad}: {field}: {text.split(': ', 2)[2]}"


def test_string_task_version_is_written_and_read(tmp_path: Path) -> None:
    """TaskSpec.version may be a string ("1.2"): the board built from such runs is written (validated as
    built), read back by load_board and rendered; a version of another type is still rejected."""
    from medbench.board.aggregate import write_leaderboard
    from medbench.spec import TaskSpec
    from medbench.store import RESULT
    from medbench.store.scores import rescore

    spec = task_spec("smoke-cxr")
    spec["version"] = "1.2"
    assert TaskSpec.model_validate(spec).version == "1.2"  # the spec allows it ...
    for seed in (0, 1):
        run = write_run(tmp_path / "store", seed=seed, spec=spec)
        result = json.loads((run.path / RESULT).read_text())
        result["provenance"]["task_version"] = spec["version"]  # as the runner records it
        (run.path / RESULT).write_text(json.dumps(result))
        rescore(run, {"bootstrap": 20})
    path = tmp_path / "board.json"
    write_leaderboard(find_run_dirs([tmp_path / "store"]), path)  # ... and so does the board
    board = load_board(path)
    assert [e["provenance"]["task_version"] for e in board["entries"]] == ["1.2"]
    proc = run_cli("render", str(path), "--format", "md", "-o", str(tmp_path / "board.md"))
    assert proc.returncode == 0, proc.stderr
    board["entries"][0]["provenance"]["task_version"] = 1  # integer versions (every older board) stay valid
    validate_board(board)
    board["entries"][0]["provenance"]["task_version"] = 1.5
    with pytest.raises(LeaderboardFormatError, match=r"entries\[0\]\.provenance\.task_version: expected integer or "
                                                     r"string or null, got 1\.5"):
        validate_board(board)


# --------------------------------------------------------------------------- published rows


#: CJ21 Table 1 (full-shot transfer; accuracy % for COVIDx and Tuberculosis, mean AUC % for the others;
#: mean ± std over 5 seeds), transcribed from ../shared/PROTOCOL.md as printed
CJ21_TABLE1: dict[str, dict[str, tuple[str, str]]] = {
    "COVIDx": {"R50x1 1K": ("76.30", "1.30"), "R50x1 21K": ("78.35", "1.63"),
               "R152x4 1K": ("78.10", "0.95"), "R152x4 21K": ("78.90", "0.49")},
    "Tuberculosis": {"R50x1 1K": ("79.83", "1.50"), "R50x1 21K": ("83.47", "0.83"),
                     "R152x4 1K": ("81.49", "2.23"), "R152x4 21K": ("80.83", "2.51")},
    "MIMIC-CXR": {"R50x1 1K": ("85.41", "0.10"), "R50x1 21K": ("86.82", "0.10"),
                  "R152x4 1K": ("86.85", "0.06"), "R152x4 21K": ("87.79", "0.13")},
    "CheXpert": {"R50x1 1K": ("84.83", "0.14"), "R50x1 21K": ("86.60", "0.14"),
                 "R152x4 1K": ("86.82", "0.06"), "R152x4 21K": ("87.77", "0.07")},
    "PadChest": {"R50x1 1K": ("76.72", "0.27"), "R50x1 21K": ("80.99", "0.22"),
                 "R152x4 1K": ("79.59", "0.17"), "R152x4 21K": ("83.94", "0.19")},
    "PadChest-cl": {"R50x1 1K": ("80.17", "0.17"), "R50x1 21K": ("82.03", "0.17"),
                    "R152x4 1K": ("82.55", "0.05"), "R152x4 21K": ("84.02", "0.24")},
    "NIH": {"R50x1 1K": ("75.53", "0.47"), "R50x1 21K": ("81.02", "0.57"),
            "R152x4 1K": ("79.82", "0.38"), "R152x4 21K": ("82.80", "0.41")},
}
#: RZ19 (CheXpert, ResNet-50, AUC %): label -> (random init, ImageNet transfer), from ../shared/PROTOCOL.md
RZ19_TABLE2: dict[str, tuple[str, str]] = {
    "Atelectasis": ("79.52", "79.76"),
    "Cardiomegaly": ("75.23", "74.93"),
    "Consolidation": ("85.49", "84.42"),
    "Edema": ("88.34", "88.89"),
    "Pleural Effusion": ("88.70", "88.07"),
}


def _protocol() -> str | None:
    """../shared/PROTOCOL.md when it sits beside the repository (CI), else None (a user's clone)."""
    path = SHARED_DATA.parent / "PROTOCOL.md"
    return path.read_text() if path.is_file() else None


def _published(name: str) -> dict:
    return json.loads((PUBLISHED / name).read_text(), parse_float=Decimal)


def _fraction(percent: str) -> Decimal:
    return Decimal(percent) / 100  # exact: the paper's percent / 100, as medbench stores scores


def _cj21_from_protocol(text: str) -> dict[tuple[str, str], tuple[Decimal, Decimal]]:
    section = text.split("## Reference numbers (CJ21 Table 1", 1)[1].split("\n## ", 1)[0]
    lines = [ln for ln in section.splitlines() if ln.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    cells = {}
    for ln in lines[2:]:
        row = [c.strip() for c in ln.strip("|").split("|")]
        for col, cell in zip(header[1:], row[1:]):
            mean, std = cell.split("±")
            cells[(row[0], col)] = (Decimal(mean.strip()), Decimal(std.strip()))
    return cells


def _rz19_from_protocol(text: str) -> dict[str, tuple[Decimal, Decimal]]:
    text = " ".join(text.split())
    return {lab: (Decimal(a), Decimal(b)) for lab, a, b in re.findall(
        r"(Atelectasis|Cardiomegaly|Consolidation|Edema|Pleural Effusion) (\d+\.\d+) vs (\d+\.\d+)", text)}


def test_cj21_rows_equal_the_papers_table_cell_by_cell() -> None:
    from medbench.board.published import PAPER_MODELS, PAPER_TASKS

    expected = {(target, column): (_fraction(mean), _fraction(std))
                for target, row in CJ21_TABLE1.items() for column, (mean, std) in row.items()}
    assert len(expected) == 28
    board = _published("cj21-table1.json")
    assert board["published"] is True and "Cherti" in board["citation"]
    seen = {}
    for e in board["entries"]:
        paper = e["paper"]
        assert e["published"] is True and e["citation"] == "CJ21 Table 1"
        assert e["task"] == PAPER_TASKS[paper["target"]] and (e["backbone"], e["init"]) == PAPER_MODELS[paper["column"]]
        h = e["headline"]
        assert h["metric"] == ("accuracy" if paper["target"] in ("COVIDx", "Tuberculosis") else "auc")
        assert h["ci"] is None and h["values"] is None and h["seeds"] is None and h["n"] == 5
        assert (paper["target"], paper["column"]) not in seen  # one row per cell
        seen[(paper["target"], paper["column"])] = (h["mean"], h["std"])
        assert e["metrics"][h["metric"]]["mean"] == h["mean"] and e["metrics"][h["metric"]]["std"] == h["std"]
    assert seen == expected  # exact decimal equality, every cell
    text = _protocol()
    if text is not None:  # the transcription above is itself checked against the protocol where it is present
        assert _cj21_from_protocol(text) == {(t, c): (Decimal(m), Decimal(s))
                                             for t, row in CJ21_TABLE1.items() for c, (m, s) in row.items()}


def test_rz19_rows_equal_the_papers_numbers() -> None:
    board = _published("rz19-table2.json")
    rows = {e["init"]: e for e in board["entries"]}
    assert set(rows) == {"random", "pretrained"} and all(e["backbone"] == "resnet50" for e in rows.values())
    for e in rows.values():
        assert set(e["metrics"]) == {f"auc/{label}" for label in RZ19_TABLE2}
    for label, (random_init, imagenet) in RZ19_TABLE2.items():
        for init, expected in (("random", random_init), ("pretrained", imagenet)):
            s = rows[init]["metrics"][f"auc/{label}"]
            assert s["mean"] == _fraction(expected), (label, init)
            assert s["std"] is None and s["ci"] is None  # the paper gives none
    for e in rows.values():
        assert e["headline"]["mean"] is None  # no mean over labels in the paper: not invented
    text = _protocol()
    if text is not None:
        assert _rz19_from_protocol(text) == {lab: (Decimal(a), Decimal(b)) for lab, (a, b) in RZ19_TABLE2.items()}


def test_published_names_are_medbench_tasks_and_backbones() -> None:
    from medbench.backbones.registry import get_backbone
    from medbench.board.published import PAPER_MODELS, PAPER_TASKS, published_for
    from medbench.spec.catalog import Catalog

    catalog = Catalog([])
    for task in PAPER_TASKS.values():
        assert catalog.task(task).spec.task == task
    for backbone, _ in PAPER_MODELS.values():
        assert get_backbone(backbone).name == backbone
    rows = published_for({"chexpert", "smoke-cxr"})
    assert {e["citation"] for e in rows} == {"CJ21 Table 1", "RZ19 Table 2"} and len(rows) == 6


def test_leaderboard_published_shows_rows_beside_the_users(fake_store: Path, tmp_path: Path) -> None:
    proc = run_cli("leaderboard", str(fake_store), "-o", str(tmp_path / "b.json"), "--published")
    assert proc.returncode == 0, proc.stderr
    assert "published reference rows" in proc.stdout and "no published rows for these tasks" in proc.stdout


# --------------------------------------------------------------------------- significance


def test_entries_tied_with_the_best_are_marked(fake_store: Path, fake_board: Path) -> None:
    from medbench.board.paired import compare_runs

    board = load_board(fake_board)
    e = entries_by_backbone(board)
    assert board["significance"]["alpha"] == pytest.approx(0.05) and "paired bootstrap" in board["significance"]["test"]
    best = max(e.values(), key=lambda x: x["headline"]["mean"])
    assert best["significance"]["best"] is True and best["backbone"] in ("fake-strong", "fake-twin")
    other = e["fake-twin" if best["backbone"] == "fake-strong" else "fake-strong"]
    assert other["significance"]["tied_with_best"] is True  # same model, other noise
    assert other["significance"]["vs_best"]["p_value"] >= 0.05
    weak = e["fake-weak"]["significance"]
    assert weak["tied_with_best"] is False and weak["vs_best"]["p_value"] < 0.05
    assert weak["vs_best"]["ci"]["high"] < 0
    # the same test as 'medbench paired' on the same runs
    runs = find_run_dirs([fake_store])
    side = lambda b: [r for r in runs if r.result()["backbone"] == b and not r.result()["variant"]]  # noqa: E731
    direct = compare_runs(side("fake-weak"), side(best["backbone"]), ("test", "auc"))
    assert direct["p_value"] == weak["vs_best"]["p_value"] and direct["delta"] == pytest.approx(weak["vs_best"]["delta"])


# --------------------------------------------------------------------------- regression gate


def _compare(base: Path, new: Path, *extra: str):
    proc = run_cli("compare", str(base), str(new), "--json", *extra)
    return proc, (json.loads(proc.stdout) if proc.stdout.strip() else None)


def test_compare_passes_itself_and_fails_on_an_auc_lowered_by_0_1(tmp_path: Path) -> None:
    proc, report = _compare(SMOKE_CPU, SMOKE_CPU)
    assert proc.returncode == 0 and report["status"] == "pass" and report["compared"] == 6
    board = json.loads(SMOKE_CPU.read_text())
    rerun = copy.deepcopy(board)  # provenance of another run: other dates, paths, revision; same numbers
    rerun["created"] = "2030-01-01T00:00:00+00:00"
    rerun["provenance"]["git_sha"] = "f" * 40
    for e in rerun["entries"]:
        e["runs"] = [f"/elsewhere/{i}" for i, _ in enumerate(e["runs"])]
        e["provenance"]["date"] = "2030-01-01T00:00:00+00:00"
    (tmp_path / "rerun.json").write_text(json.dumps(rerun))
    proc, report = _compare(SMOKE_CPU, tmp_path / "rerun.json")
    assert proc.returncode == 0, report
    lowered = copy.deepcopy(board)
    cxr = next(e for e in lowered["entries"] if e["task"] == "smoke-cxr")
    assert cxr["headline"]["metric"] == "auc"
    cxr["headline"]["mean"] -= 0.1
    (tmp_path / "lowered.json").write_text(json.dumps(lowered))
    proc, report = _compare(SMOKE_CPU, tmp_path / "lowered.json")
    assert proc.returncode == 1 and report["status"] == "regression" and report["regressions"] == 1
    (row,) = [r for r in report["rows"] if r["status"] == "regression"]
    assert row["task"] == "smoke-cxr" and row["worse_by"] == pytest.approx(0.1) and row["tolerance"] < 0.1
    human = run_cli("compare", str(SMOKE_CPU), str(tmp_path / "lowered.json"))
    assert human.returncode == 1 and "REGRESSION" in human.stdout and "1 regression(s)" in human.stdout


def test_unpaired_tolerance_follows_seed_noise_and_intervals(fake_board: Path, tmp_path: Path) -> None:
    """Boards without replicates (made before the paired gate) and of other seeds are judged by the unpaired
    rule: the seed standard error of the difference of seed means and both boards' test-resampling
    half-widths."""
    board = json.loads(fake_board.read_text())
    for e in board["entries"]:
        e.pop("replicates")
    (tmp_path / "b.json").write_text(json.dumps(board))
    h = entries_by_backbone(board)["fake-weak"]["headline"]
    half = (h["ci"]["high"] - h["ci"]["low"]) / 2
    ci_term, seed_term = 2 ** 0.5 * half, 2 * (2 * h["std"] ** 2 / h["n"]) ** 0.5
    tol = max(0.001, ci_term, seed_term)
    slightly = copy.deepcopy(board)  # a drop within the noise passes, the same drop with --k-ci 0 --k-seed 0 fails
    s = entries_by_backbone(slightly)["fake-weak"]["headline"]
    s["mean"] -= 0.6 * tol
    s["seeds"] = [5, 6]  # other seeds: not paired on seeds either
    (tmp_path / "s.json").write_text(json.dumps(slightly))
    proc, report = _compare(tmp_path / "b.json", tmp_path / "s.json", "--tolerance", "0.001")
    row = next(r for r in report["rows"] if r["backbone"] == "fake-weak")
    assert row["mode"] == "unpaired" and row["seeds_paired"] is False
    assert row["terms"]["ci"] == pytest.approx(ci_term) and row["terms"]["seed"] == pytest.approx(seed_term)
    assert row["tolerance"] == pytest.approx(tol) and row["status"] == "ok" and proc.returncode == 0
    assert _compare(tmp_path / "b.json", tmp_path / "s.json", "--tolerance", "0.001", "--k-ci", "0", "--k-seed", "0"
                    )[0].returncode == 1


def test_compare_reports_missing_added_and_other_metrics(fake_board: Path, tmp_path: Path) -> None:
    board = json.loads(fake_board.read_text())
    changed = copy.deepcopy(board)
    removed = changed["entries"].pop(0)
    extra = copy.deepcopy(changed["entries"][0])
    extra["backbone"] = "fake-new"
    changed["entries"].append(extra)
    entries_by_backbone(changed)["fake-weak"]["metrics"]["accuracy"]["mean"] = None
    (tmp_path / "c.json").write_text(json.dumps(changed))
    proc, report = _compare(fake_board, tmp_path / "c.json")
    assert proc.returncode == 1 and report["regressions"] == 0
    assert report["missing"] == [{"task": "smoke-cxr", "backbone": removed["backbone"], "init": "random", "regime": None,
                                  "protocol": "finetune"}]
    assert [a["backbone"] for a in report["added"]] == ["fake-new"]
    proc, report = _compare(fake_board, tmp_path / "c.json", "--allow-missing")
    assert proc.returncode == 0 and report["status"] == "pass"
    proc, report = _compare(fake_board, tmp_path / "c.json", "--allow-missing", "--metric", "accuracy")
    assert proc.returncode == 1
    (row,) = [r for r in report["rows"] if not r["passed"]]
    assert row["metric"] == "accuracy" and row["backbone"] == "fake-weak" and row["reason"] == "undefined in NEW"
    assert row["status"] == "invalid" and report["invalid"] == 1


def test_compare_usage_errors_exit_2(fake_board: Path, tmp_path: Path) -> None:
    (tmp_path / "not.json").write_text("{not json")
    (tmp_path / "other.json").write_text(json.dumps({"schema": "something-else"}))
    for bad, expected in ((tmp_path / "missing.json", "no such file"), (tmp_path / "not.json", "not JSON"),
                          (tmp_path / "other.json", "schema: expected 'medbench-leaderboard'")):
        proc = run_cli("compare", str(fake_board), str(bad))
        assert proc.returncode == 2 and expected in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    proc = run_cli("compare", str(fake_board), str(fake_board), "--metric", "sensitivity")
    assert proc.returncode == 2 and "--metric: no entry of BASELINE has metric 'sensitivity'" in proc.stderr


# --------------------------------------------------------------------------- rendering


def test_markdown_marks_best_and_ties_and_rounds_only_there(fake_board: Path, tmp_path: Path) -> None:
    out = tmp_path / "board.md"
    proc = run_cli("render", str(fake_board), "--format", "md", "-o", str(out), "--published")
    assert proc.returncode == 0, proc.stderr
    text = out.read_text()
    board = load_board(fake_board)
    e = entries_by_backbone(board)
    best = next(x for x in e.values() if x["significance"]["best"])
    tied = next(x for x in e.values() if x["significance"]["tied_with_best"] and not x["significance"]["best"])
    assert f"**{best['headline']['mean']:.4f} ± {best['headline']['std']:.4f}**" in text
    assert f"*{tied['headline']['mean']:.4f} ± {tied['headline']['std']:.4f}*" in text
    weak = e["fake-weak"]["headline"]
    assert f"| {weak['mean']:.4f} ± {weak['std']:.4f} |" in text
    assert repr(weak["mean"]) not in text  # stored unrounded, rendered rounded
    assert "alpha = 0.05" in text
    chest = json.loads(fake_board.read_text())  # the same rows as if they were CheXpert's: the papers' rows beside them
    for entry in chest["entries"]:
        entry["task"] = "chexpert"
    (tmp_path / "chexpert.json").write_text(json.dumps(chest))
    assert run_cli("render", str(tmp_path / "chexpert.json"), "-f", "md", "-o", str(out), "--published").returncode == 0
    published = out.read_text().split("## Published reference rows", 1)[1]
    assert "| chexpert | bit-m-r152x4 | pretrained | auc | 0.8777 ± 0.0007 | CJ21 Table 1 | CheXpert / R152x4 21K |" in published
    assert "| chexpert | resnet50 | random | auc | per label: Atelectasis 0.7952," in published


def _chromium(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    profile = tmp_path / f"chromium-profile-{len(list(tmp_path.glob('chromium-profile-*')))}"
    cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-dev-shm-usage", f"--user-data-dir={profile}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180)


@pytest.mark.slow
def test_html_renders_in_headless_chromium(fake_board: Path, tmp_path: Path) -> None:
    if not CHROMIUM.is_file():
        pytest.skip(f"{CHROMIUM} is absent (Debian: apt-get install chromium; .ci/run installs it)")
    page = tmp_path / "board.html"
    proc = run_cli("render", str(fake_board), "--format", "html", "-o", str(page), "--published")
    assert proc.returncode == 0, proc.stderr
    html_text = page.read_text()
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", html_text)  # self-contained: nothing fetched
    url = page.as_uri() + "#sort=mean:asc&view=overview"
    dom = _chromium(["--dump-dom", url], tmp_path)
    assert dom.returncode == 0, dom.stderr[-2000:]
    text = dom.stdout
    assert 'data-ready="true"' in text and 'data-sorted="mean:asc"' in text and 'data-view="overview"' in text
    table = text.split('id="board-table"', 1)[1].split("</table>", 1)[0]
    values = [float(v) for v in re.findall(r'class="value" data-value="([^"]+)"', table)]
    assert len(re.findall(r"<tr class=\"entry", table)) == 3 and len(values) == 3  # 3 entries, no published row here
    assert values == sorted(values)  # sorted ascending by the script, from the URL
    board = json.loads(fake_board.read_text())
    assert values[0] == min(e["headline"]["mean"] for e in board["entries"])
    for plot in ("data-efficiency-fraction", "shift-matrix", "calibration-ece", "fairness-sex"):
        assert f'data-plot="{plot}"' in text, plot
    assert text.count('data-plot="reliability"') == 3 and "data:image/png;base64," in text
    shot = tmp_path / "board.png"
    res = _chromium([f"--screenshot={shot}", "--window-size=1280,900", page.as_uri() + "#view=shift"], tmp_path)
    assert res.returncode == 0 and shot.is_file(), res.stderr[-2000:]
    from PIL import Image

    with Image.open(shot) as img:
        assert img.size == (1280, 900)
        colors = img.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colors is not None and len(colors) > 50  # a drawn page (heatmap, text), not a blank one
    keep = Path(shutil.copy(shot, tmp_path / "kept.png"))
    assert keep.stat().st_size > 10_000


def test_render_usage_errors_exit_2(tmp_path: Path) -> None:
    proc = run_cli("render", str(tmp_path / "none.json"), "-o", str(tmp_path / "x.html"))
    assert proc.returncode == 2 and "none.json: BOARD: no such file" in proc.stderr
    assert not (tmp_path / "x.html").exists()


def test_runs_of_other_settings_are_not_pooled_as_seeds(tmp_path) -> None:
    """Two complete runs of one seed (e.g. a --max-steps 2 trial and the full run in one store), or seeds
    trained differently, are refused with one line naming both folders, never averaged into one entry."""
    from medbench.errors import UsageError
    from medbench.store import CONFIG
    from medbench.store.scores import rescore

    def set_plan(run, total_steps):  # as the run was trained (before it is scored: config.json is then recorded)
        config = json.loads((run.path / CONFIG).read_text())
        config["plan"] = {"batch_size": 32, "total_steps": total_steps}
        (run.path / CONFIG).write_text(json.dumps(config))

    runs = [write_run(tmp_path / "store", seed=s) for s in (0, 1)]
    for run in runs:
        set_plan(run, 80)
        rescore(run)
    assert build_leaderboard(runs)["entries"][0]["seeds"] == [0, 1]  # one setting: pooled

    other = [write_run(tmp_path / "mixed", seed=s) for s in (0, 1)]
    for run, steps in zip(other, (80, 2)):
        set_plan(run, steps)
        rescore(run)
    with pytest.raises(UsageError) as err:
        build_leaderboard(other)
    msg = str(err.value)
    assert "\n" not in msg and str(other[0].path) in msg and str(other[1].path) in msg
    assert "differ in plan.total_steps (80 vs 2)" in msg and "smoke-cxr · fake-a · random" in msg

    again = write_run(tmp_path / "other", seed=0)  # seed 0 once more, from another store
    set_plan(again, 80)
    rescore(again)
    with pytest.raises(UsageError, match=r"seed 0 has two complete runs"):
        build_leaderboard([*runs, again])
