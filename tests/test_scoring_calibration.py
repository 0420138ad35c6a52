"""Calibration: ECE/MCE equal netcal's, Brier/NLL equal sklearn's; temperature scaling; reliability diagrams."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from netcal.metrics import ECE, MCE
from sklearn.metrics import brier_score_loss, log_loss

from medbench.data.base import label_column
from medbench.predictions import Predictions
from medbench.scoring import compute_metrics, get_metric
from medbench.scoring.bootstrap import Resampling, evaluate
from medbench.scoring.calibration import apply_temperatures, calibration_axis, fit_temperatures, reliability_png
from medbench.specs import ScoringSpec


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
    point = evaluate(len(preds), [lambda st, n=n: get_metric(n).linear(preds, cfg, st) for n in ("ece", "mce")],
                     None).point
    assert point["ece"] == pytest.approx(ref_ece, abs=1e-6) and point["mce"] == pytest.approx(ref_mce, abs=1e-6)


@pytest.mark.parametrize("task_type", ["binary", "multilabel", "multiclass"])
def test_brier_nll_equal_sklearn(task_type: str) -> None:
    preds = _random(task_type, 5, scale=3.0)
    y, p = preds.y_true(), preds.y_prob()
    m = compute_metrics(preds, ["brier", "nll"])
    point = evaluate(len(preds), [lambda st, n=n: get_metric(n).linear(preds, ScoringSpec(), st) for n in ("brier", "nll")],
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
    out = evaluate(300, [lambda st: get_metric("ece").linear(preds, cfg, st)], res)
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
    assert values["after"]["ece"] < 0.5 * values["before"]["ece"], values
    assert values["after"]["nll"] < values["before"]["nll"]
    # a temperature keeps each label's ranking (AUC) and the multiclass argmax (accuracy)
    kept = "accuracy" if task_type == "multiclass" else "auc"
    assert compute_metrics(after, [kept])[kept] == pytest.approx(compute_metrics(test, [kept])[kept], abs=1e-6)
    assert not (tmp_path / "runs").exists()  # netcal's tensorboard logging stays off


def test_temperature_with_one_class_on_validation_is_identity() -> None:
    val = _random("multilabel", 3, n=200)
    y = val.y_true()
    y[:, 2] = 0.0
    val = _preds(y, val.y_prob(), "multilabel")
    temps = fit_temperatures(val)
    assert temps["c2"] is None and all(temps[c] is not None for c in ("c0", "c1", "c3"))
    same = apply_temperatures(val, temps)
    assert np.array_equal(same.y_prob()[:, 2], val.y_prob()[:, 2])


def test_reliability_diagram_is_a_png() -> None:
    test = _random("multilabel", 4, n=200, scale=2.0)
    png = reliability_png(test, apply_temperatures(test, {"c0": 2.0}), ScoringSpec(), "title")
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
