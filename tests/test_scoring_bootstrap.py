"""The vectorized bootstrap: rank AUC and accuracy against sklearn, resampling, intervals, paired comparisons."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from sklearn.metrics import accuracy_score, roc_auc_score

from medbench.data.base import label_column
from medbench.errors import DataError
from medbench.predictions import Predictions
from medbench.scoring import compute_metrics, get_metric
from medbench.scoring.bootstrap import (
    LinearStats,
    Resampling,
    evaluate,
    interval,
    per_resample_loop,
)
from medbench.scoring.classification import auc_rows
from medbench.scoring.paired import paired_bootstrap, paired_difference
from medbench.spec import ScoringSpec


def _preds(y: np.ndarray, p: np.ndarray, task_type: str, patients: list[str] | None = None) -> Predictions:
    n, k = y.shape
    labels = [f"l{i}" for i in range(k)]
    table = pl.DataFrame({"sample_id": [f"s{i}" for i in range(n)],
                          "patient_id": patients or [f"p{i}" for i in range(n)]})
    table = table.with_columns(**{label_column(lab): pl.Series([None if np.isnan(v) else int(v) for v in y[:, j]],
                                                               dtype=pl.Int8) for j, lab in enumerate(labels)})
    return Predictions.build(table, p, labels, task_type)


def _point(n: int, builder) -> dict:
    return evaluate(n, [builder], None).point


@pytest.mark.parametrize("trial", range(40))
def test_rank_auc_equals_sklearn(trial: int) -> None:
    rng = np.random.default_rng(trial)
    n = int(rng.integers(2, 400))
    y = (rng.random(n) < rng.uniform(0.02, 0.98)).astype(float)
    # half the trials with heavy ties (scores on a coarse grid), some with missing labels
    p = np.round(rng.random(n), int(rng.integers(1, 3))) if trial % 2 else rng.random(n)
    if trial % 3 == 0:
        y[rng.random(n) < 0.15] = np.nan
    stats = LinearStats(n)
    f = auc_rows(stats, y, p)
    value = f(stats.point_sums())[0]
    keep = ~np.isnan(y)
    if np.unique(y[keep]).size < 2:
        assert np.isnan(value)
    else:
        assert value == pytest.approx(roc_auc_score(y[keep], p[keep]), abs=1e-12)


@pytest.mark.parametrize("task_type", ["binary", "multilabel", "multiclass"])
def test_replicates_equal_sklearn_on_each_resample(task_type: str) -> None:
    """Replicate b of the vectorized AUC/accuracy = sklearn on resample b's rows (patients resampled whole)."""
    rng = np.random.default_rng(7)
    n, k = 300, {"binary": 1, "multilabel": 4, "multiclass": 3}[task_type]
    if task_type == "multiclass":
        y = np.eye(k)[rng.integers(0, k, n)]
        p = rng.dirichlet(np.ones(k), n)
    else:
        y = (rng.random((n, k)) < 0.3).astype(float)
        p = np.round(rng.random((n, k)), 2)  # ties
    patients = [f"p{i // 3}" for i in range(n)]
    preds = _preds(y, p, task_type, patients)
    res = Resampling.of(preds, n_resamples=25, seed=3, scope="test")
    assert res.unit == "patient" and res.n_units == 100
    cfg = ScoringSpec()
    builders = [lambda st, m=m: get_metric(m).builder(preds, cfg)(st) for m in ("auc", "accuracy")]
    out = evaluate(n, builders, res)
    assert out.point["auc"] == pytest.approx(compute_metrics(preds, ["auc"])["auc"], abs=1e-6)
    assert out.point["accuracy"] == pytest.approx(compute_metrics(preds, ["accuracy"])["accuracy"], abs=1e-6)
    counts = np.hstack(list(res.counts()))
    for b in range(25):
        idx = res.sample_indices(counts[:, b])
        c = np.bincount(idx, minlength=n)
        assert (c[0::3] == c[1::3]).all() and (c[1::3] == c[2::3]).all()  # patients are drawn whole
        if task_type == "multiclass":
            ref_auc = roc_auc_score(y[idx].argmax(1), p[idx], multi_class="ovr", average="macro")
            ref_acc = accuracy_score(y[idx].argmax(1), p[idx].argmax(1))
        else:
            ref_auc = np.mean([roc_auc_score(y[idx, j], p[idx, j]) for j in range(k)])
            ref_acc = np.mean([accuracy_score(y[idx, j], p[idx, j] > 0.5) for j in range(k)])
        assert out.replicates["auc"][b] == pytest.approx(ref_auc, abs=1e-9)
        assert out.replicates["accuracy"][b] == pytest.approx(ref_acc, abs=1e-12)


def test_resamples_are_deterministic_chunk_independent_and_shared_by_runs() -> None:
    rng = np.random.default_rng(0)
    y = (rng.random((50, 1)) < 0.5).astype(float)
    a = _preds(y, rng.random((50, 1)), "binary")
    b = _preds(y, rng.random((50, 1)), "binary")  # another model, the same test samples
    ra = Resampling.of(a, n_resamples=30, seed=0, scope="test")
    rb = Resampling.of(b, n_resamples=30, seed=0, scope="test")
    assert ra.fingerprint == rb.fingerprint and ra.unit == "sample"
    full = np.hstack(list(ra.counts()))
    assert np.array_equal(full, np.hstack(list(ra.counts(chunk=7))))
    assert np.array_equal(full, np.hstack(list(rb.counts())))
    assert (full.sum(0) == 50).all()
    other = Resampling.of(a, n_resamples=30, seed=0, scope="ood:x")
    assert not np.array_equal(full, np.hstack(list(other.counts())))


def test_interval_and_undefined_replicates() -> None:
    reps = np.r_[np.linspace(0, 1, 101), [np.nan] * 4]
    ci = interval(reps, 0.9)
    assert ci["low"] == pytest.approx(0.05) and ci["high"] == pytest.approx(0.95) and ci["n_undefined"] == 4
    assert interval(np.full(5, np.nan), 0.95) is None


def test_label_with_one_class_is_undefined_not_a_crash() -> None:
    rng = np.random.default_rng(1)
    y = (rng.random((80, 3)) < 0.4).astype(float)
    y[:, 1] = 0.0  # no positive for label l1 in the test set
    preds = _preds(y, rng.random((80, 3)), "multilabel")
    m = compute_metrics(preds, ["auc", "accuracy"])
    assert m["auc/l1"] is None and m["auc"] is not None and m["accuracy/l1"] is not None
    res = Resampling.of(preds, n_resamples=50, seed=0, scope="test")
    out = evaluate(80, [lambda st: get_metric("auc").builder(preds, ScoringSpec())(st)], res)
    assert np.isnan(out.replicates["auc/l1"]).all() and np.isfinite(out.replicates["auc"]).all()
    assert out.point["auc"] == pytest.approx(m["auc"], abs=1e-6)


def test_nan_predictions_are_a_clear_error() -> None:
    rng = np.random.default_rng(2)
    p = rng.random((20, 2))
    p[3, 1] = np.nan
    preds = _preds((rng.random((20, 2)) < 0.5).astype(float), p, "multilabel")
    with pytest.raises(DataError, match=r"prob:l1.*1 predicted probabilities are NaN"):
        compute_metrics(preds, ["auc"])


def test_generic_per_resample_loop_matches_vectorized() -> None:
    """A registered metric without linear statistics is bootstrapped by a loop over the same resamples."""
    rng = np.random.default_rng(4)
    y = (rng.random((60, 2)) < 0.4).astype(float)
    preds = _preds(y, rng.random((60, 2)), "multilabel", [f"p{i // 2}" for i in range(60)])
    res = Resampling.of(preds, n_resamples=20, seed=1, scope="test")
    loop = per_resample_loop(preds, get_metric("auc"), res)
    vec = evaluate(60, [lambda st: get_metric("auc").builder(preds, ScoringSpec())(st)], res).replicates
    assert np.allclose(loop["auc"], vec["auc"], atol=1e-6)


def test_paired_comparison() -> None:
    rng = np.random.default_rng(5)
    n = 400
    y = (rng.random((n, 1)) < 0.5).astype(float)
    good = 1 / (1 + np.exp(-(2.0 * (2 * y - 1) + rng.standard_normal((n, 1)))))
    weak = 1 / (1 + np.exp(-(0.5 * (2 * y - 1) + rng.standard_normal((n, 1)))))
    a, b = _preds(y, good, "binary"), _preds(y, weak, "binary")
    res = paired_bootstrap(a, b, "auc", n_resamples=500)
    assert res["delta"] > 0.2 and res["ci"]["low"] > 0 and res["p_value"] < 0.01 and res["better"] == "a"
    same = paired_bootstrap(a, a, "auc", n_resamples=200)
    assert same["delta"] == 0 and same["p_value"] == 1.0 and same["better"] is None
    # lower-is-better metrics: the smaller ECE wins
    ece = paired_difference(0.05, np.full(100, 0.05), 0.2, np.full(100, 0.2), higher_is_better=False)
    assert ece["better"] == "a" and ece["p_value"] < 0.05
    with pytest.raises(Exception, match="same test samples"):
        paired_bootstrap(a, _preds(y[:-1], good[:-1], "binary"), "auc")


def test_identical_blocks_are_shared_and_chunks_and_threads_change_no_bit(monkeypatch) -> None:
    """ECE and MCE bin the same confidences, Brier and NLL count the same images: their rows are registered once.
    The sparse product split over threads gives the same bits; one resample per chunk (another BLAS path for the
    dense rows) the same values to 1e-12; and every resample's values equal netcal / sklearn on its rows."""
    import medbench.scoring.bootstrap as bs
    from netcal.metrics import ECE, MCE
    from sklearn.metrics import brier_score_loss

    from medbench.scoring.registry import metric_builders

    rng = np.random.default_rng(5)
    n, k = 240, 3
    y = (rng.random((n, k)) < 0.35).astype(float)
    y[rng.random((n, k)) < 0.05] = np.nan
    p = np.round(rng.random((n, k)), 2)
    preds = _preds(y, p, "multilabel", [f"p{i // 2}" for i in range(n)])
    res = Resampling.of(preds, n_resamples=12, seed=1, scope="test")
    cfg = ScoringSpec()

    def rows(names: list[str]) -> int:
        stats = LinearStats(n, res.unit_of, res.n_units)
        for b in metric_builders(preds, names, cfg)[0]:
            b(stats)
        return stats.n_rows

    assert rows(["ece", "mce"]) == rows(["ece"]) and rows(["brier", "nll"]) < rows(["brier"]) + rows(["nll"])
    names = ["auc", "accuracy", "ece", "mce", "brier", "nll"]
    monkeypatch.setattr(bs, "THREADS", 1)
    one = evaluate(n, metric_builders(preds, names, cfg)[0], res)
    monkeypatch.setattr(bs, "THREADS", 3)
    threaded = evaluate(n, metric_builders(preds, names, cfg)[0], res)
    monkeypatch.setattr(bs, "SUMS_CELLS", 1)  # one resample per chunk
    split = evaluate(n, metric_builders(preds, names, cfg)[0], res)
    assert one.replicates.keys() == threaded.replicates.keys() == split.replicates.keys()
    for key, values in one.replicates.items():
        assert np.array_equal(values, threaded.replicates[key], equal_nan=True), key
        assert np.allclose(values, split.replicates[key], rtol=0, atol=1e-12, equal_nan=True), key
    counts = np.hstack(list(res.counts()))
    eps = np.finfo(np.float64).eps
    for b in range(12):
        idx = res.sample_indices(counts[:, b])
        for j in range(k):
            keep = idx[~np.isnan(y[idx, j])]
            yy, pp = y[keep, j].astype(int), np.clip(p[keep, j], eps, 1 - eps)
            assert split.replicates[f"ece/l{j}"][b] == pytest.approx(ECE(bins=15).measure(pp, yy), abs=1e-9)
            assert split.replicates[f"mce/l{j}"][b] == pytest.approx(MCE(bins=15).measure(pp, yy), abs=1e-9)
            assert split.replicates[f"brier/l{j}"][b] == pytest.approx(brier_score_loss(yy, p[keep, j]), abs=1e-12)


def test_reused_buffers_give_the_exact_auc_of_every_resample(monkeypatch) -> None:
    """The sums of several resamples at a time go to two reused buffers (and the counts to one reused array):
    every AUC replicate is then still the correctly rounded Mann-Whitney fraction of its resample, computed here
    exactly in integers (the AUC's sums are whole numbers, so no order of additions may change a bit), with one
    thread or two, and the resample counts are the stream drawn from the generator one resample at a time."""
    from fractions import Fraction

    import medbench.scoring.bootstrap as bs

    rng = np.random.default_rng(11)
    n, k = 300, 3
    y = (rng.random((n, k)) < np.array([0.1, 0.4, 0.7])).astype(float)
    y[rng.random((n, k)) < 0.05] = np.nan
    p = np.round(rng.random((n, k)), 1)  # many ties
    preds = _preds(y, p, "multilabel", [f"p{i // 2}" for i in range(n)])
    res = Resampling.of(preds, n_resamples=25, seed=4, scope="test")
    draws = res.rng().integers(0, res.n_units, size=(25, res.n_units), dtype=np.uint32)
    expected = np.stack([np.bincount(d, minlength=res.n_units) for d in draws], axis=1).astype(float)
    reused = [c.copy() for c in res.counts(chunk=6, reuse=True)]
    assert np.array_equal(np.hstack(reused), expected) and np.array_equal(np.hstack(list(res.counts())), expected)

    cfg = ScoringSpec()
    monkeypatch.setattr(bs, "CHUNK_CELLS", 6 * res.n_units)  # chunks of 6 resamples
    runs = []
    for threads in (1, 2):
        monkeypatch.setattr(bs, "THREADS", threads)
        stats_rows = LinearStats(n, res.unit_of, res.n_units)
        get_metric("auc").builder(preds, cfg)(stats_rows)
        monkeypatch.setattr(bs, "SUMS_CELLS", 4 * stats_rows.n_rows)  # parts of 4 resamples: 4, 2 in a chunk
        runs.append(evaluate(n, [get_metric("auc").builder(preds, cfg)], res).replicates)
    assert runs[0].keys() == runs[1].keys()
    for key in runs[0]:
        assert np.array_equal(runs[0][key], runs[1][key], equal_nan=True), key
    for b in range(25):
        w = expected[res.unit_of, b].astype(np.int64)  # each image weighted by its patient's count
        for j in range(k):
            keep = ~np.isnan(y[:, j])
            pos, neg = keep & (y[:, j] == 1), keep & (y[:, j] == 0)
            wp, wn = w[pos], w[neg]
            above = (p[pos, j][:, None] > p[neg, j][None, :]).astype(np.int64)
            tied = (p[pos, j][:, None] == p[neg, j][None, :]).astype(np.int64)
            twice = int(wp @ (2 * above + tied) @ wn)
            total = 2 * int(wp.sum()) * int(wn.sum())
            exact = float(Fraction(twice, total)) if total else np.nan
            got = runs[0][f"auc/l{j}"][b]
            assert (np.isnan(got) and np.isnan(exact)) or got == exact, (b, j, got, exact)
