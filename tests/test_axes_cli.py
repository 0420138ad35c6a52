"""Variant runs end to end: data-efficiency subsets and a resolution sweep through the runner and CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_cli


@pytest.fixture(scope="module")
def variant_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("variants")
    proc = run_cli("run", "--backbone", "cbr-tiny", "--task", "smoke-tb", "--seeds", "1", "--max-steps", "4",
                   "--fractions", "25,100", "--shots", "5", "--resolutions", "24,28", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _configs(out: Path) -> dict[str, dict]:
    runs = sorted((out / "runs" / "smoke-tb" / "cbr-tiny").iterdir())
    return {r.name.split("-")[2] if r.name.count("-") > 2 else "plain": json.loads((r / "config.json").read_text())
            for r in runs}


def test_variant_runs_have_their_own_folders_keys_and_subsets(variant_store: Path) -> None:
    configs = _configs(variant_store)
    # 100 % is the plain run, and 28 px is the task's own crop: neither is run twice
    assert sorted(configs) == ["frac25", "plain", "res24", "shots5"]
    keys = {c["key"] for c in configs.values()}
    assert len(keys) == 4
    full = configs["plain"]["data"]["n"]["train"]
    frac = configs["frac25"]
    assert frac["variant"]["kind"] == "fraction" and frac["variant"]["n_train_full"] == full
    assert round(0.25 * full) <= frac["data"]["n"]["train"] == frac["variant"]["n_train"] < round(0.25 * full) + 3
    assert frac["plan"]["n_train"] == frac["variant"]["n_train"]  # HyperRule sees the subset's size
    shots = configs["shots5"]
    assert shots["variant"]["per_class"] == {"tuberculosis": 5, "not tuberculosis": 5}
    assert shots["data"]["n"]["train"] == 10 and shots["variant"]["patients"] == 10
    res = configs["res24"]
    assert res["input"]["crop"] == 24 and res["input"]["resize"] == 30 and res["variant"]["crop"] == 24
    for name, c in configs.items():  # validation and test are untouched by the variants
        assert c["data"]["n"]["test"] == configs["plain"]["data"]["n"]["test"], name
        assert c["data"]["n"]["val"] == configs["plain"]["data"]["n"]["val"], name


def test_variant_leaderboard_blocks_and_reuse(variant_store: Path) -> None:
    board = json.loads((variant_store / "leaderboard.json").read_text())
    (e,) = board["entries"]
    assert e["seeds"] == [0] and len(e["variant_runs"]) == 3
    fr = e["data_efficiency"]["fraction"]
    assert [p["fraction"] for p in fr["points"]] == [0.25, 1.0] and fr["area"]["mean"] is not None
    assert fr["area"]["ci"] is not None
    assert [p["shots"] for p in e["data_efficiency"]["shots"]["points"]] == [5]
    res = e["resolution"]
    assert [p["crop"] for p in res["points"]] == [24, 28] and res["points"][0]["relative_to_default"]["ci"]
    proc = run_cli("run", "--backbone", "cbr-tiny", "--task", "smoke-tb", "--seeds", "1", "--max-steps", "4",
                   "--fractions", "25", "--shots", "5", "--resolutions", "24", "--out", str(variant_store))
    assert proc.returncode == 0 and "4 run(s) were already complete and reused" in proc.stdout


@pytest.mark.parametrize(("args", "fragment"), [
    (["--fractions", "0,50"], "--fractions: percentages must be in (0, 100]"),
    (["--shots", "five"], "--shots: expected comma-separated numbers"),
    (["--resolutions", "4"], "--resolutions: resolutions must be >= 8 px"),
])
def test_variant_options_errors(args: list[str], fragment: str, tmp_path: Path) -> None:
    proc = run_cli("run", "--backbone", "cbr-tiny", "--task", "smoke-tb", *args, "--out", str(tmp_path))
    assert proc.returncode == 2 and fragment in proc.stderr and "Traceback" not in proc.stderr
