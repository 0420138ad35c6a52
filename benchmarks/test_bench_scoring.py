"""Scoring speed: every headline score of a 100k-image x 14-label test set with 1000 bootstrap resamples,
vectorized (medbench) against a per-resample loop over sklearn/netcal (the usual way).

Run with ``python -m pytest benchmarks/ --benchmark-only`` (not part of the default test run). The loop
is timed on ``LOOP_RESAMPLES`` resamples and scaled to 1000 (its cost is linear in the number of
resamples); its values on those resamples must equal medbench's replicates. The target is a speed-up of
at least 50x; the measured ratio is stored in the benchmark's ``extra_info`` and printed.
"""

from __future__ import annotations

import os
import time

import numpy as np
import polars as pl
import pytest
from netcal.metrics import ECE, MCE
from sklearn.metrics import accuracy_score, brier_score_loss, log_loss, roc_auc_score

from medbench.data.base import label_column
from medbench.predictions import Predictions
from medbench.scoring import get_metric
from medbench.scoring.bootstrap import Resampling, evaluate
from medbench.specs import ScoringSpec

N, LABELS, RESAMPLES = 100_000, 14, 1000
LOOP_RESAMPLES = int(os.environ.get("MEDBENCH_BENCH_LOOP_RESAMPLES", "10"))
METRICS = ("auc", "accuracy", "ece", "mce", "brier", "nll")
TARGET_SPEEDUP = 50.0


@pytest.fixture(scope="module")
def big_test_set() -> Predictions:
    rng = np.random.default_rng(0)
    names = [f"finding{k:02d}" for k in range(LABELS)]
    prevalence = np.linspace(0.02, 0.4, LABELS)
    y = (rng.random((N, LABELS)) < prevalence).astype(float)
    z = 1.2 * (2 * y - 1) + rng.standard_normal((N, LABELS))
    p = np.round(1 / (1 + np.exp(-1.8 * z)), 4)  # overconfident, with ties
    y[rng.random((N, LABELS)) < 0.03] = np.nan  # uncertain labels, masked
    table = pl.DataFrame({"sample_id": [f"img{i:06d}" for i in range(N)],
                          "patient_id": [f"pat{i // 2:06d}" for i in range(N)]})  # 2 images per patient
    table = table.with_columns(**{label_column(n): pl.Series([None if np.isnan(v) else int(v) for v in y[:, k]],
                                                             dtype=pl.Int8) for k, n in enumerate(names)})
    return Predictions.build(table, p, names, "multilabel")


def vectorized(preds: Predictions):
    cfg = ScoringSpec()
    res = Resampling.of(preds, n_resamples=RESAMPLES, seed=0, scope="test")
    builders = [lambda st, m=m: get_metric(m).linear(preds, cfg, st) for m in METRICS]
    return evaluate(len(preds), builders, res)


def sklearn_loop(preds: Predictions, resampling: Resampling, n: int) -> dict[str, list[float]]:
    """The per-resample baseline: each score of each label recomputed by sklearn/netcal on each resample."""
    y, p = preds.y_true(), preds.y_prob()
    out: dict[str, list[float]] = {f"{m}/{name}": [] for m in METRICS for name in preds.label_names}
    counts = next(resampling.counts(n))
    for b in range(n):
        idx = resampling.sample_indices(counts[:, b])
        for k, name in enumerate(preds.label_names):
            keep = ~np.isnan(y[idx, k])
            yy, pp = y[idx, k][keep].astype(int), p[idx, k][keep]
            out[f"auc/{name}"].append(roc_auc_score(yy, pp))
            out[f"accuracy/{name}"].append(accuracy_score(yy, pp > 0.5))
            out[f"ece/{name}"].append(ECE(bins=15).measure(pp, yy))
            out[f"mce/{name}"].append(MCE(bins=15).measure(pp, yy))
            out[f"brier/{name}"].append(brier_score_loss(yy, pp))
            out[f"nll/{name}"].append(log_loss(yy, pp, labels=[0, 1]))
    return out


def _load() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def test_scoring_speedup(benchmark, big_test_set: Predictions) -> None:
    result = benchmark.pedantic(vectorized, args=(big_test_set,), rounds=1, iterations=1)
    vec_seconds = benchmark.stats.stats.mean
    t0 = time.perf_counter()
    loop = sklearn_loop(big_test_set, result.resampling, LOOP_RESAMPLES)
    loop_per_resample = (time.perf_counter() - t0) / LOOP_RESAMPLES
    loop_seconds = loop_per_resample * RESAMPLES
    for key, values in loop.items():  # the same numbers
        assert np.allclose(result.replicates[key][:LOOP_RESAMPLES], values, atol=1e-6, rtol=0), key
    speedup = loop_seconds / vec_seconds
    benchmark.extra_info.update({"vectorized_seconds": vec_seconds, "loop_seconds_per_resample": loop_per_resample,
                                 "loop_seconds_extrapolated": loop_seconds, "speedup": speedup,
                                 "n": N, "labels": LABELS, "resamples": RESAMPLES,
                                 "replicate_columns": len(result.replicates), "load_average": _load()})
    print(f"\nvectorized {vec_seconds:.1f} s for {RESAMPLES} resamples; sklearn/netcal loop {loop_per_resample:.2f} s "
          f"per resample ({LOOP_RESAMPLES} timed) -> {loop_seconds:.0f} s extrapolated; load {_load()}; speed-up {speedup:.0f}x (target {TARGET_SPEEDUP:.0f}x)")
    assert speedup >= TARGET_SPEEDUP
