"""Paired comparison of two backbones on the same test samples (bootstrap).

Every run of a task resamples its test set with the same units and seed
(:mod:`medbench.scoring.bootstrap`), so replicate ``b`` of backbone A and of
backbone B score the *same* resample. The difference of their replicates is
the bootstrap distribution of the paired difference; averaging replicates
over seeds first compares the seed means. Reported: the difference of the
point values, its percentile interval, and a two-sided bootstrap p-value
``2 * min(P(d* <= 0), P(d* >= 0))`` (with the +1 correction, so never 0),
which is below ``1 - level`` exactly when the interval excludes 0 (up to the
resolution of ``B`` resamples). A replicate undefined on either side (see the
strict rule of :mod:`medbench.scoring.bootstrap`) is undefined for the
difference: counted in ``n_undefined`` and left out of the interval and the
p-value, never replaced by a value over what remains.

:func:`paired_difference` works on point values and replicates (what
``metrics.json`` and ``bootstrap.parquet`` hold, so the leaderboard and
``medbench paired`` need no predictions: :func:`medbench.board.paired.compare_runs`
loads them from run folders); :func:`paired_bootstrap` recomputes from predictions.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from medbench.errors import UsageError
from medbench.predictions import Predictions


def paired_difference(point_a: float | None, reps_a: np.ndarray | None, point_b: float | None,
                      reps_b: np.ndarray | None, *, level: float = 0.95, higher_is_better: bool = True) -> dict:
    """``a - b``: difference, interval, p-value, and which side is better (None when not significant)."""
    out: dict = {"a": point_a, "b": point_b, "delta": None, "ci": None, "p_value": None, "level": level,
                 "n_resamples": 0, "n_undefined": 0, "better": None}
    if point_a is None or point_b is None:
        return out
    out["delta"] = float(point_a - point_b)
    if reps_a is None or reps_b is None or len(reps_a) != len(reps_b) or len(reps_a) == 0:
        return out
    d = np.asarray(reps_a, dtype=np.float64) - np.asarray(reps_b, dtype=np.float64)
    ok = d[np.isfinite(d)]
    out["n_resamples"] = int(d.size)
    out["n_undefined"] = int(d.size - ok.size)
    if ok.size == 0:
        return out
    alpha = (1 - level) / 2
    low, high = np.quantile(ok, [alpha, 1 - alpha])
    out["ci"] = {"low": float(low), "high": float(high)}
    n = ok.size
    p = 2 * min((np.sum(ok <= 0) + 1) / (n + 1), (np.sum(ok >= 0) + 1) / (n + 1))
    out["p_value"] = float(min(1.0, p))
    if out["p_value"] < 1 - level and out["delta"] != 0:
        a_better = (out["delta"] > 0) == higher_is_better
        out["better"] = "a" if a_better else "b"
    return out


def seed_mean(points: Sequence[float | None], reps: Sequence[np.ndarray | None]) -> tuple[float | None, np.ndarray | None]:
    """Mean over seeds of the point values and, replicate by replicate, of the replicates."""
    if not points or any(p is None for p in points):
        return None, None
    point = float(np.mean(points))
    if any(r is None for r in reps) or len({len(r) for r in reps}) != 1:
        return point, None
    return point, np.mean(np.vstack(reps), axis=0)


def paired_bootstrap(preds_a: Predictions, preds_b: Predictions, metric: str, *, n_resamples: int = 1000,
                     seed: int = 0, level: float = 0.95) -> dict:
    """Paired comparison recomputed from two prediction tables of the same test samples."""
    from medbench.scoring.bootstrap import Resampling, evaluate
    from medbench.scoring.registry import get_metric, loop_values
    from medbench.spec import ScoringSpec

    ids_a = preds_a.table["sample_id"].to_list()
    if ids_a != preds_b.table["sample_id"].to_list():
        raise UsageError("the two prediction tables do not hold the same test samples in the same order",
                         field="predictions")
    config = ScoringSpec(bootstrap=n_resamples, bootstrap_seed=seed, ci_level=level)
    d = get_metric(metric)
    res = Resampling.of(preds_a, n_resamples=n_resamples, seed=seed, scope="test")
    points, reps = [], []
    for preds in (preds_a, preds_b):
        if d.linear:
            out = evaluate(len(preds), [d.builder(preds, config)], res)
            point, rep = out.point, out.replicates
        else:
            point, rep = loop_values(preds, [d], config, res)
        points.append(point.get(metric))
        reps.append(rep[metric])
    return paired_difference(points[0], reps[0], points[1], reps[1], level=level,
                             higher_is_better=d.higher_is_better)
