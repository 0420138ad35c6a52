"""Training subsets, learning-curve area, convergence, shift; scoring run folders and the leaderboard axes
on generated predictions (no training)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from conftest import run_cli
from fake_runs import task_spec, write_run

from medbench.board.aggregate import build_leaderboard
from medbench.data.subsets import fraction_subset, shots_subset
from medbench.predictions import Predictions
from medbench.scoring.convergence import convergence
from medbench.scoring.efficiency import normalized_area
from medbench.scoring.shift import restrict_labels
from medbench.store import METRICS, find_run_dirs
from medbench.store.scores import BOOTSTRAP, RELIABILITY, read_replicates, rescore


def _train_table(n: int = 600, seed: int = 0) -> tuple[pl.DataFrame, np.ndarray]:
    rng = np.random.default_rng(seed)
    patients = rng.integers(0, 200, n)
    table = pl.DataFrame({"sample_id": [f"s{i}" for i in range(n)], "patient_id": [f"p{x}" for x in patients]})
    y = (rng.random((n, 3)) < [0.05, 0.2, 0.4]).astype(float)
    y[rng.random((n, 3)) < 0.05] = np.nan
    return table, y


def test_fraction_subsets_are_nested_grouped_and_seeded() -> None:
    table, _ = _train_table()
    rows = np.arange(table.height)
    patient = np.asarray(table["patient_id"].to_list())
    prev = np.array([], dtype=np.int64)
    for f in (0.01, 0.05, 0.1, 0.25, 0.5, 1.0):
        sub = fraction_subset(table, rows, f, seed=3)
        assert set(prev) <= set(sub)
        chosen = set(patient[sub])
        assert np.isin(patient, list(chosen)).sum() == len(sub)  # whole patients only
        assert round(f * len(rows)) <= len(sub) < round(f * len(rows)) + 8
        prev = sub
    assert len(prev) == len(rows)
    a, b = fraction_subset(table, rows, 0.1, 0), fraction_subset(table, rows, 0.1, 1)
    assert not np.array_equal(a, b)
    # the subset depends on the ids, not on the row order
    rev = table.reverse()
    ids = set(table["sample_id"].gather(a).to_list())
    assert ids == set(rev["sample_id"].gather(fraction_subset(rev, rows, 0.1, 0)).to_list())


def test_k_shot_rule_for_multilabel_and_multiclass() -> None:
    table, y = _train_table()
    rows = np.arange(table.height)
    prev: set = set()
    for k in (1, 5, 10, 100, 500):
        sub, per_class = shots_subset(table, y, rows, k, 0, "multilabel", ["rare", "mid", "common"])
        assert prev <= set(sub)
        prev = set(sub)
        for j, name in enumerate(["rare", "mid", "common"]):
            assert per_class[name] >= min(k, int(np.nansum(y[:, j] == 1)))
        assert per_class["(no finding)"] == min(k, int((~(y == 1).any(1) & ~np.isnan(y).all(1)).sum()))
    one, per = shots_subset(table, y, rows, 1, 0, "multilabel", ["rare", "mid", "common"])
    assert len(one) <= 4
    # k examples of a class come from k different patients when possible
    five, _ = shots_subset(table, y, rows, 5, 0, "multilabel", ["rare", "mid", "common"])
    patients = np.asarray(table["patient_id"].to_list())
    rare = five[y[five, 0] == 1]
    assert len(set(patients[rare])) == len(rare)
    mc = np.eye(3)[np.random.default_rng(1).integers(0, 3, table.height)]
    sub, per = shots_subset(table, mc, rows, 10, 0, "multiclass", ["a", "b", "c"])
    assert per == {"a": 10, "b": 10, "c": 10} and len(sub) == 30


def test_normalized_area_and_convergence() -> None:
    assert normalized_area([0.01, 0.1, 1.0], np.array([0.6, 0.7, 0.8])) == pytest.approx(0.7)
    assert normalized_area([1, 10], np.array([0.5, 0.9])) == pytest.approx(0.7)
    assert normalized_area([0.5], np.array([0.7])) is None
    reps = normalized_area([1, 10, 100], np.array([[0.5, 0.6], [0.7, 0.8], [0.9, 1.0]]))
    assert reps == pytest.approx([0.7, 0.8])
    hist = {"step": list(range(100)), "val_step": [10, 20, 30, 40, 100], "val_metric": [0.5, 0.77, 0.8, 0.79, 0.8]}
    c = convergence(hist, "auc")
    assert c["final"] == 0.8 and c["steps_to_95"] == 20 and c["steps_to_99"] == 30 and c["fraction_to_99"] == 0.3
    low = convergence({"step": [0, 1], "val_step": [1, 2], "val_metric": [0.3, 0.2]}, "ece", higher_is_better=False)
    assert low["steps_to_95"] == 2


def test_shift_compares_the_same_labels() -> None:
    from fake_runs import make_probs, make_table

    from medbench.predictions import Predictions

    labels = ["normal", "pneumonia", "COVID-19"]
    t = make_table(100, labels, "multiclass", 0)
    preds = Predictions.build(t, make_probs(t, labels, "multiclass", 0), labels, "multiclass")
    sub = restrict_labels(preds, ["normal", "COVID-19"])
    assert sub.label_names == ["normal", "COVID-19"]
    assert np.allclose(sub.y_prob().sum(1), 1.0)
    assert restrict_labels(preds, labels) is preds


@pytest.fixture(scope="module")
def fake_store(tmp_path_factory) -> Path:
    """Two backbones x two seeds of smoke-cxr with generated predictions, data-efficiency and resolution
    variants, all scored."""
    out = tmp_path_factory.mktemp("fake-store")
    lean = task_spec("smoke-cxr")
    lean["attributes"] = []  # variant points need no subgroups: keeps the fixture fast
    for backbone, strength in (("fake-strong", 1.8), ("fake-weak", 0.9)):
        for seed in (0, 1):
            write_run(out, backbone=backbone, seed=seed, strength=strength, overconfidence=2.5)
            for f, s in ((0.1, 0.5), (0.5, 0.75)):
                write_run(out, backbone=backbone, seed=seed, strength=strength * s, spec=lean,
                          variant={"kind": "fraction", "value": f, "n_train": int(400 * f)})
            for k, s in ((1, 0.3), (5, 0.5)):
                write_run(out, backbone=backbone, seed=seed, strength=strength * s, spec=lean,
                          variant={"kind": "shots", "value": k, "n_train": 6 * k})
            write_run(out, backbone=backbone, seed=seed, strength=strength * 0.9, spec=lean,
                      variant={"kind": "resolution", "value": 24, "resize": 30, "crop": 24})
    for run in find_run_dirs([out]):
        rescore(run, {"bootstrap": 200})
    return out


def test_scored_run_holds_every_axis(fake_store: Path) -> None:
    run = next(r for r in find_run_dirs([fake_store]) if r.path.name.startswith("random-seed0-fake-strong")
               or (r.result()["backbone"] == "fake-strong" and r.result()["seed"] == 0 and not r.result()["variant"]))
    m = run.read_json(METRICS)
    for axis in ("test", "val", "ood", "calibration", "fairness", "shift", "convergence", "ci", "scoring"):
        assert m[axis], axis
    assert m["ci"]["test"]["auc"]["low"] < m["test"]["auc"] < m["ci"]["test"]["auc"]["high"]
    assert m["shift"]["site-b"]["auc"]["drop"] > 0.05  # the target is harder
    assert m["ci"]["shift"]["site-b"]["auc"]["drop"]["low"] > 0
    assert m["fairness"]["attributes"]["sex"]["worst_group"]["auc"] == "F"
    assert m["calibration"]["after"]["ece"] < m["calibration"]["before"]["ece"]
    assert m["scoring"]["resampling"]["test"]["unit"] == "patient"
    assert (run.path / RELIABILITY).read_bytes()[:4] == b"\x89PNG"
    reps = read_replicates(run)
    assert reps[("test", "auc")].shape == (200,)
    assert ("fairness", "attributes", "sex", "gap", "auc") in reps


def test_rescoring_is_deterministic_and_takes_overrides(fake_store: Path, tmp_path: Path) -> None:
    run = write_run(tmp_path, seed=0, strength=1.8, overconfidence=2.5)
    a = rescore(run, {"bootstrap": 100})
    b = rescore(run, {"bootstrap": 100})
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
    c = rescore(run, {"bootstrap": 50, "threshold": "sensitivity", "target_sensitivity": 0.95,
                      "ece_binning": "adaptive", "intersections": 1})
    assert c["scoring"]["threshold"] == "sensitivity" and c["scoring"]["bootstrap"] == 50
    assert all(t["val_tpr"] >= 0.95 for t in c["fairness"]["operating_point"]["thresholds"].values())
    assert not any("&" in name for name in c["fairness"]["attributes"])
    assert c["calibration"]["before"]["ece"] != a["calibration"]["before"]["ece"]


def test_leaderboard_carries_every_axis_with_intervals(fake_store: Path) -> None:
    board = build_leaderboard(find_run_dirs([fake_store]), baseline=("fake-weak", None))
    assert board["baseline"] == {"backbone": "fake-weak", "init": "random"}
    by = {e["backbone"]: e for e in board["entries"]}
    assert len(board["entries"]) == 2
    e = by["fake-strong"]
    assert e["seeds"] == [0, 1] and len(e["runs"]) == 2 and len(e["variant_runs"]) == 10
    head = e["headline"]
    assert head["n"] == 2 and head["ci"]["low"] < head["mean"] < head["ci"]["high"] and head["ci"]["level"] == 0.95
    assert e["metrics"]["auc/Edema"]["ci"] is not None and e["ood"]["site-b"]["auc"]["ci"] is not None
    cal = e["calibration"]
    assert cal["after"]["ece"]["mean"] < cal["before"]["ece"]["mean"] and cal["after"]["ece"]["ci"]
    sex = e["fairness"]["attributes"]["sex"]
    assert sex["gap"]["auc"]["mean"] > 0 and sex["gap"]["auc"]["ci"] and sex["worst_group"]["auc"] == "F"
    # group sizes are the same test set in every seed: plain counts (not seed summaries), equal to the images
    test = Predictions.load(find_run_dirs([fake_store])[0].prediction_file("test"))
    sexes = test.table["sex"].to_list()
    for g in ("F", "M"):
        assert type(sex["groups"][g]["n"]) is int and sex["groups"][g]["n"] == sexes.count(g) > 0, g
    assert sum(grp["n"] for grp in sex["groups"].values()) == len(test)
    assert isinstance(sex["groups"]["F"]["auc"], dict) and sex["groups"]["F"]["auc"]["n"] == 2  # measured: summary
    assert "per_label" not in sex
    drop = e["shift"]["site-b"]["auc"]["drop"]
    assert drop["mean"] > 0 and drop["ci"]["low"] > 0
    conv = e["convergence"]
    assert conv["steps_to_95"]["mean"] == 40 and conv["curve"]["step"][-1] == 80
    de = e["data_efficiency"]
    fr = de["fraction"]
    assert [p["fraction"] for p in fr["points"]] == [0.1, 0.5, 1.0]
    aucs = [p["metrics"]["auc"]["mean"] for p in fr["points"]]
    assert aucs == sorted(aucs)  # more data, better (by construction)
    assert fr["area"]["ci"]["low"] < fr["area"]["mean"] < fr["area"]["ci"]["high"]
    assert min(aucs) < fr["area"]["mean"] < max(aucs)
    assert [p["shots"] for p in de["shots"]["points"]] == [1, 5] and de["shots"]["full_data"]
    res = e["resolution"]
    assert [p["crop"] for p in res["points"]] == [24, 32] and res["default_crop"] == 32
    assert res["points"][0]["relative_to_default"]["delta"] < 0
    rel = e["relative_to_baseline"]
    assert rel["backbone"] == "fake-weak" and rel["headline"]["better"] == "a" and rel["headline"]["delta"] > 0
    assert rel["fraction_curve"]["area"]["delta"] > 0 and rel["fraction_curve"]["area"]["ci"]["low"] > 0
    assert rel["resolution"][0]["crop"] == 24 and "convergence" in rel
    assert "relative_to_baseline" not in by["fake-weak"]
    matrix = board["shift_matrix"]
    assert {m["backbone"] for m in matrix} == {"fake-strong", "fake-weak"}
    cells = {(c["trained_on"], c["evaluated_on"]): c for c in matrix[0]["cells"]}
    assert set(cells) == {("smoke-cxr", "smoke-cxr"), ("smoke-cxr", "smoke-cxr-siteb")}
    assert cells[("smoke-cxr", "smoke-cxr-siteb")]["drop"]["mean"] > 0
    json.dumps(board)  # serializable


def test_paired_cli_and_score_cli(fake_store: Path, tmp_path: Path) -> None:
    strong = fake_store / "runs" / "smoke-cxr" / "fake-strong"
    weak = fake_store / "runs" / "smoke-cxr" / "fake-weak"
    proc = run_cli("paired", str(strong), str(weak), "--json")
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)["smoke-cxr"]
    assert res["better"] == "a" and res["seeds"] == {"a": 2, "b": 2} and res["p_value"] < 0.05
    proc = run_cli("paired", str(strong), str(weak), "--metric", "ece")
    assert proc.returncode == 0 and "smoke-cxr" in proc.stdout
    run = write_run(tmp_path, seed=0)
    proc = run_cli("score", str(run.path), "--bootstrap", "20", "--threshold", "sensitivity:0.8")
    assert proc.returncode == 0, proc.stderr
    assert "ECE" in proc.stdout and "AUC gap sex" in proc.stdout and "site-b auc drop" in proc.stdout
    assert (run.path / BOOTSTRAP).is_file()
    proc = run_cli("score", str(run.path), "--threshold", "median")
    assert proc.returncode == 2 and "--threshold" in proc.stderr and "Traceback" not in proc.stderr


def test_nan_predictions_fail_scoring_with_one_line(tmp_path: Path) -> None:
    run = write_run(tmp_path, seed=0)
    path = run.prediction_file("test")
    table = pl.read_parquet(path)
    table = table.with_columns(pl.when(pl.int_range(pl.len()) == 5).then(float("nan")).otherwise(pl.col("prob:Edema"))
                               .alias("prob:Edema"))
    table.write_parquet(path)
    proc = run_cli("score", str(run.path))
    assert proc.returncode == 2, proc.stdout
    assert "test.parquet: prob:Edema: 1 predicted probabilities are NaN" in proc.stderr
    assert proc.stderr.strip().count("\n") == 0


def test_task_spec_scoring_block_is_validated(tmp_path: Path) -> None:
    spec = task_spec("smoke-tb")
    assert spec["scoring"]["bootstrap"] == 1000 and spec["scoring"]["ece_bins"] == 15
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: bad\ninclude: " + str(Path(__file__).resolve().parent.parent / "tasks/smoke/smoke-tb.yaml")
                   + "\nscoring: {threshold: median}\n")
    proc = run_cli("list", "tasks", "--tasks-dir", str(tmp_path))
    assert proc.returncode == 2 and "scoring.threshold" in proc.stderr
