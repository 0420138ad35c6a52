"""Calibration: ECE/MCE equal netcal's, Brier/NLL equal sklearn's; temperature scaling; reliability diagrams."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
from conftest import run_cli
from fake_runs import write_run
from netcal.metrics import ECE, MCE
from sklearn.metrics import brier_score_loss, log_loss

from medbench.data.base import label_column
from medbench.predictions import Predictions
from medbench.scoring import compute_metrics, get_metric
from medbench.scoring.bootstrap import Resampling, evaluate
from medbench.scoring.calibration import (
    apply_temperatures,
    bin_edges,
    calibration_axis,
    fit_temperature_details,
    fit_temperatures,
    reliability_png,
)
from medbench.spec import ScoringSpec


def _preds(y: np.ndarray, p: np.ndarray, task_type: str) -> Predictions:
    labels = [f"c{i}" for i in range(y.shape[1])]
    table = pl.DataFrame({"sample_id": [f"s{i}" for i in range(len(y))], "patient_id": [f"p{i}" for i in range(len(y))]})
    table = table.with_columns(**{label_column(lab): pl.Series([None if np.isnan(v) else int(v) for v in y[:, j]],
                                                               dtype=pl.Int8) for j, lab in enumerate(labels)})
    return Predictions.build(table, p, labels, task_type)


def _random(task_type: str, seed: int, n: int = 500, scale: float = 1.0) -> Predictions:
    rng = np.random.default_rng(seed)
    k = {"binary": 1, "multilabel": 4, "multiclass": 4}[task_type]
    if task_type == "multiclass":
        z = rng.normal(0, 1.5, (n, k))
        true = np.array([rng.choice(k, p=np.exp(r) / np.exp(r).sum()) for r in z])
        y = np.eye(k)[true]
        q = np.exp(scale * z)
        return _preds(y, q / q.sum(1, keepdims=True), task_type)
    z = rng.normal(0, 1.5, (n, k))
    y = (rng.random((n, k)) < 1 / (1 + np.exp(-z))).astype(float)
    if task_type == "multilabel":
        y[rng.random((n, k)) < 0.1] = np.nan
    return _preds(y, 1 / (1 + np.exp(-scale * z)), task_type)


def _targets(preds: Predictions):
    """(confidence, outcome) per calibrated quantity, computed independently of medbench."""
    y, p = preds.y_true(), preds.y_prob()
    if preds.task_type == "multiclass":
        return [(p, y.argmax(1))]  # netcal's own multiclass path: top-label
    return [(p[~np.isnan(y[:, k]), k], y[~np.isnan(y[:, k]), k].astype(int)) for k in range(y.shape[1])]


@pytest.mark.parametrize("task_type", ["binary", "multilabel", "multiclass"])
@pytest.mark.parametrize("binning", ["uniform", "adaptive"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ece_mce_equal_netcal(task_type: str, binning: str, seed: int) -> None:
    preds = _random(task_type, seed, scale=2.5)
    cfg = ScoringSpec(ece_bins=15, ece_binning=binning)
    m = compute_metrics(preds, ["ece", "mce"], cfg)
    kw = {"bins": 15, "equal_intervals": binning == "uniform"}
    ref_ece = np.mean([ECE(**kw).measure(c, o) for c, o in _targets(preds)])
    ref_mce = np.mean([MCE(**kw).measure(c, o) for c, o in _targets(preds)])
    assert m["ece"] == pytest.approx(ref_ece, abs=1e-6)
    assert m["mce"] == pytest.approx(ref_mce, abs=1e-6)
    # the vectorized (bootstrap) form on unit weights gives the same numbers
    point = evaluate(len(preds), [lambda st, n=n: get_metric(n).builder(preds, cfg)(st) for n in ("ece", "mce")],
                     None).point
    assert point["ece"] == pytest.approx(ref_ece, abs=1e-6) and point["mce"] == pytest.approx(ref_mce, abs=1e-6)


def _binary(p: np.ndarray, y: np.ndarray) -> Predictions:
    return _preds(np.asarray(y, dtype=float).reshape(-1, 1), np.asarray(p, dtype=float).reshape(-1, 1), "binary")


def _point_and_vectorized(preds: Predictions, cfg: ScoringSpec, names=("ece", "mce")):
    point = compute_metrics(preds, list(names), cfg)
    vec = evaluate(len(preds), [lambda st, n=n: get_metric(n).builder(preds, cfg)(st) for n in names], None).point
    return point, vec


def test_ece_mce_by_hand_equal_width() -> None:
    """A 10-image example worked out by hand (5 bins of width 0.2): per bin |frequency - confidence| x size is
    0.8, 0.65, 0.05, 0.3, 0.8, so ECE = 2.6 / 10 = 0.26 and MCE = 0.4 (the first bin)."""
    p = [0.1, 0.1, 0.3, 0.35, 0.5, 0.55, 0.7, 0.9, 0.95, 0.95]
    y = [0, 1, 0, 0, 1, 0, 1, 1, 1, 0]
    point, vec = _point_and_vectorized(_binary(p, y), ScoringSpec(ece_bins=5, ece_binning="uniform"))
    for got in (point, vec):
        assert got["ece"] == pytest.approx(0.26, abs=1e-12) and got["mce"] == pytest.approx(0.4, abs=1e-12)


def test_adaptive_ece_by_hand_with_tied_confidences() -> None:
    """Six of ten confidences tied at 0.2, 5 adaptive bins: the quantile edges 0, 0.2, 0.2, 0.36, 0.72, 1 merge
    to 0, 0.2, 0.36, 0.72, 1; the bins hold {}, six x 0.2 (3 positive), {0.6, 0.7} (both positive) and
    {0.8, 0.9} (one positive): ECE = (6 x 0.3 + 2 x 0.35 + 2 x 0.35) / 10 = 0.32, MCE = 0.35."""
    p = [0.2] * 6 + [0.6, 0.7, 0.8, 0.9]
    y = [1, 1, 1, 0, 0, 0, 1, 1, 0, 1]
    cfg = ScoringSpec(ece_bins=5, ece_binning="adaptive")
    assert bin_edges(np.asarray(p), 5, "adaptive") == pytest.approx([0.0, 0.2, 0.36, 0.72, 1.0], abs=1e-12)
    point, vec = _point_and_vectorized(_binary(p, y), cfg)
    for got in (point, vec):
        assert got["ece"] == pytest.approx(0.32, abs=1e-12) and got["mce"] == pytest.approx(0.35, abs=1e-12)


def test_adaptive_ece_with_180_of_200_tied_at_0_3() -> None:
    """The reported crash: netcal's quantile edges repeat 0.3; merged, the bins are [0, 0.3) and [0.3, 1]."""
    rng = np.random.default_rng(0)
    p = np.full(200, 0.3)
    p[:20] = rng.random(20)
    y = (rng.random(200) < p).astype(float)
    cfg = ScoringSpec(ece_binning="adaptive")
    assert bin_edges(p, 15, "adaptive") == pytest.approx([0.0, 0.3, 1.0])
    point, vec = _point_and_vectorized(_binary(p, y), cfg)
    below, rest = p < 0.3, p >= 0.3
    gaps = [abs(y[m].mean() - p[m].mean()) for m in (below, rest)]
    assert point["ece"] == pytest.approx(sum(m.mean() * g for m, g in zip((below, rest), gaps)), abs=1e-12)
    assert point["mce"] == pytest.approx(max(gaps), abs=1e-12)
    assert vec["ece"] == pytest.approx(point["ece"], abs=1e-12) and vec["mce"] == pytest.approx(point["mce"], abs=1e-12)


@pytest.mark.parametrize("task_type", ["binary", "multilabel", "multiclass"])
@pytest.mark.parametrize("seed", range(6))
def test_adaptive_binning_with_heavy_ties_point_equals_vectorized(task_type: str, seed: int) -> None:
    """Randomized heavy ties (60-95 % of the confidences equal to one value; on odd seeds the others rounded
    to one decimal): no crash anywhere (metrics, calibration axis, bootstrap, reliability diagram), the
    duplicate quantile edges merged, and the point values equal to the vectorized form's, per label too."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(50, 400))
    preds = _random(task_type, 40 + seed, n=n, scale=float(rng.uniform(0.5, 3.0)))
    p, y = preds.y_prob(), preds.y_true()
    if seed % 2:
        p = np.round(p, 1)
    f = rng.uniform(0.6, 0.95)
    if task_type == "multiclass":
        p = p / p.sum(1, keepdims=True)
        tied = rng.random(n) < f
        p[tied] = [np.roll([0.7, 0.1, 0.1, 0.1], int(r)) for r in rng.integers(0, 4, int(tied.sum()))]
        targets = [p.max(1)]
    else:
        p = np.where(rng.random(p.shape) < f, float(rng.choice([0.05, 0.3, 0.5, 0.9])), p)
        targets = [p[~np.isnan(y[:, k]), k] for k in range(p.shape[1])]
    preds = _preds(y, p, task_type)
    bins = int(rng.integers(5, 25))
    cfg = ScoringSpec(ece_bins=bins, ece_binning="adaptive")
    for conf in targets:  # the ties do produce duplicate quantile edges (netcal's crash), merged here
        raw = np.quantile(np.clip(conf, 1e-16, 1 - 1e-16), np.linspace(0, 1, bins + 1))
        assert (np.diff(raw[1:-1]) == 0).any() and len(bin_edges(conf, bins, "adaptive")) < bins + 1
    point, vec = _point_and_vectorized(preds, cfg)
    assert point.keys() == vec.keys()
    for key, v in point.items():
        assert v is not None and np.isfinite(v) and vec[key] == pytest.approx(v, abs=1e-9), key
    values, builders, after = calibration_axis(preds, preds, cfg)
    out = evaluate(len(preds), builders, Resampling.of(preds, n_resamples=20, seed=seed, scope="test"))
    assert np.isfinite(out.replicates[("calibration", "after", "ece")]).all()
    for which in ("before", "after"):
        assert out.point[("calibration", which, "ece")] == pytest.approx(values[which]["ece"], abs=1e-9)
        assert out.point[("calibration", which, "mce")] == pytest.approx(values[which]["mce"], abs=1e-9)
    assert reliability_png(preds, after, cfg, "ties")[:4] == b"\x89PNG"


def test_score_cli_with_adaptive_bins_on_rounded_probabilities(tmp_path) -> None:
    """``medbench score --ece-binning adaptive`` on a run whose probabilities are rounded to one decimal."""
    run = write_run(tmp_path, seed=0, overconfidence=2.5)
    for name in ("test", "val"):
        path = run.prediction_file(name)
        table = pl.read_parquet(path)
        table.with_columns(pl.col(c).round(1) for c in table.columns if c.startswith("prob:")).write_parquet(path)
    proc = run_cli("score", str(run.path), "--bootstrap", "20", "--ece-binning", "adaptive")
    assert proc.returncode == 0, proc.stderr
    m = json.loads((run.path / "metrics.json").read_text())
    assert m["calibration"]["binning"] == "adaptive" and m["calibration"]["before"]["ece"] > 0
    assert m["ci"]["calibration"]["before"]["ece"]["low"] <= m["calibration"]["before"]["ece"]


@pytest.mark.parametrize("task_type", ["binary", "multilabel", "multiclass"])
def test_brier_nll_equal_sklearn(task_type: str) -> None:
    preds = _random(task_type, 5, scale=3.0)
    y, p = preds.y_true(), preds.y_prob()
    m = compute_metrics(preds, ["brier", "nll"])
    point = evaluate(len(preds), [lambda st, n=n: get_metric(n).builder(preds, ScoringSpec())(st) for n in ("brier", "nll")],
                     None).point
    if task_type == "multiclass":
        ref_b = brier_score_loss(y.argmax(1), p, labels=list(range(4)))
        ref_n = log_loss(y.argmax(1), p, labels=list(range(4)))
    else:
        keep = [~np.isnan(y[:, k]) for k in range(y.shape[1])]
        ref_b = np.mean([brier_score_loss(y[kk, k], p[kk, k]) for k, kk in enumerate(keep)])
        ref_n = np.mean([log_loss(y[kk, k], p[kk, k], labels=[0, 1]) for k, kk in enumerate(keep)])
    for got in (m, point):
        assert got["brier"] == pytest.approx(ref_b, abs=1e-9) and got["nll"] == pytest.approx(ref_n, abs=1e-9)


def test_calibration_replicates_match_netcal_on_resamples() -> None:
    preds = _random("binary", 9, n=300, scale=2.0)
    cfg = ScoringSpec()
    res = Resampling.of(preds, n_resamples=15, seed=0, scope="test")
    out = evaluate(300, [lambda st: get_metric("ece").builder(preds, cfg)(st)], res)
    counts = np.hstack(list(res.counts()))
    c, o = _targets(preds)[0]
    for b in range(15):
        idx = res.sample_indices(counts[:, b])
        assert out.replicates["ece"][b] == pytest.approx(ECE(bins=15).measure(c[idx], o[idx]), abs=1e-9)


@pytest.mark.parametrize("task_type", ["binary", "multilabel", "multiclass"])
def test_temperature_scaling_lowers_ece_of_an_overconfident_model(task_type: str, tmp_path, monkeypatch) -> None:
    """A model whose logits are 3x too large: T fitted on validation near 3, test ECE falls."""
    monkeypatch.chdir(tmp_path)
    val = _random(task_type, 11, n=1500, scale=3.0)
    test = _random(task_type, 12, n=1500, scale=3.0)
    values, builders, after = calibration_axis(test, val, ScoringSpec())
    temps = [t for t in values["temperature"].values() if t is not None]
    assert temps and all(2.3 < t < 3.8 for t in temps), temps
    assert values["fitted_on"] == "val" and set(values["temperature_status"].values()) == {"fitted"}
    assert values["after"]["ece"] < 0.5 * values["before"]["ece"], values
    assert values["after"]["nll"] < values["before"]["nll"]
    # a temperature keeps each label's ranking (AUC) and the multiclass argmax (accuracy)
    kept = "accuracy" if task_type == "multiclass" else "auc"
    assert compute_metrics(after, [kept])[kept] == pytest.approx(compute_metrics(test, [kept])[kept], abs=1e-6)
    assert not (tmp_path / "runs").exists()  # netcal's tensorboard logging stays off


@pytest.mark.parametrize("task_type", ["binary", "multilabel", "multiclass"])
def test_anti_correlated_validation_never_gives_a_negative_temperature(task_type: str) -> None:
    """Validation predictions that rank the wrong way: netcal's unconstrained weight 1/T is negative (T = -0.675
    was reported); medbench keeps the label unscaled (T None, identity) and says so, so the test probabilities
    are never flipped."""
    good = _random(task_type, 21, n=800, scale=2.0)
    p = good.y_prob()
    if task_type == "multiclass":
        wrong = 1.0 / np.clip(p, 1e-6, None)
        wrong /= wrong.sum(1, keepdims=True)  # the likeliest class becomes the least likely
    else:
        wrong = 1.0 - p
    val = _preds(good.y_true(), wrong, task_type)
    test = _random(task_type, 22, n=800, scale=2.0)
    temps, status = fit_temperature_details(val)
    assert set(status.values()) == {"not_positive"} and all(t is None for t in temps.values()), (temps, status)
    values, _, after = calibration_axis(test, val, ScoringSpec())
    assert values["temperature_status"] == status and values["temperature"] == temps
    assert values["fitted_on"] is None  # nothing was scaled: not claimed as fitted on val
    assert np.array_equal(after.y_prob(), test.y_prob())  # identity, not a flip
    assert values["after"] == values["before"]
    # a label fitted the right way keeps its (positive) temperature beside a rejected one
    if task_type == "multilabel":
        mixed = wrong.copy()
        mixed[:, 0] = p[:, 0]
        temps, status = fit_temperature_details(_preds(good.y_true(), mixed, task_type))
        assert status == {"c0": "fitted", "c1": "not_positive", "c2": "not_positive", "c3": "not_positive"}
        assert temps["c0"] > 0


def test_temperature_with_one_class_on_validation_is_identity() -> None:
    val = _random("multilabel", 3, n=200)
    y = val.y_true()
    y[:, 2] = 0.0
    val = _preds(y, val.y_prob(), "multilabel")
    temps = fit_temperatures(val)
    assert temps["c2"] is None and all(temps[c] is not None for c in ("c0", "c1", "c3"))
    assert fit_temperature_details(val)[1] == {"c0": "fitted", "c1": "fitted", "c2": "one_class", "c3": "fitted"}
    same = apply_temperatures(val, temps)
    assert np.array_equal(same.y_prob()[:, 2], val.y_prob()[:, 2])


def test_reliability_diagram_is_a_png() -> None:
    test = _random("multilabel", 4, n=200, scale=2.0)
    png = reliability_png(test, apply_temperatures(test, {"c0": 2.0}), ScoringSpec(), "title")
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
