"""Scoring speed (P3): every bootstrapped score of a 100k-image x 14-label test set with 1000 resamples,
vectorized (``medbench score``) against a per-resample loop over sklearn/netcal/fairlearn (the usual way).

"Every score" is what :func:`medbench.store.scores.score_run` bootstraps for a multilabel task with two
subgroup attributes and one OOD target, i.e. every column of ``bootstrap.parquet``:

* ``test``: auc, accuracy, ece, mce, brier, nll (per label and the mean over labels);
* ``calibration.before`` / ``calibration.after``: ece, mce, brier, nll before and after temperature scaling
  (temperatures fitted on validation, held fixed over the resamples);
* ``fairness.attributes.<sex | age_group>``: per scored group auc, accuracy, balanced accuracy, tpr, fpr, fnr,
  selection rate (thresholds chosen on validation by Youden's J, held fixed); worst and gap of auc, accuracy
  and balanced accuracy; gaps of the rates; equalized-odds and demographic-parity differences;
* ``shift.site-b``: in-distribution auc/accuracy on the target's labels, target value, drop, relative drop;
* ``ood.site-b``: auc and accuracy of the OOD set (its own resamples).

The medbench side is one ``score_run`` on a run folder (loading predictions, point values, temperature fit,
thresholds, subgroups and intersections, reliability diagram and the vectorized bootstrap: all of it is
timed). The loop computes the same numbers independently per resample: roc_auc_score, accuracy_score,
balanced_accuracy_score, brier_score_loss, log_loss (sklearn), ECE/MCE (netcal, 15 equal-width bins),
temperatures (a scipy minimisation of the validation NLL over T, once) and the scaled probabilities, the Youden
threshold (sklearn's roc_curve, once on validation), the group rates (fairlearn MetricFrame),
equalized_odds_difference and demographic_parity_difference (fairlearn). Means, worst groups and gaps follow
medbench's strict rule (docs/metrics.md): over the components defined on the whole test set, undefined in a
resample where one of them is. It is timed on ``LOOP_RESAMPLES`` resamples and scaled to
``RESAMPLES`` (its cost is linear in the number of resamples); its values on those resamples must equal
medbench's replicates (atol 1e-6), and it must produce exactly the set of replicate columns medbench does
(nothing bootstrapped escapes the comparison). The loop is given the same work medbench's tables hold once
only: ``calibration.before`` equals the ``test`` calibration scores and ``shift.*.in_distribution`` is the
mean of the ``test`` per-label values over the target's labels, so it reuses them.

Run the full benchmark with ``python -m pytest benchmarks/test_bench_scoring.py -n 0 --benchmark-only -s``
(minutes; not part of the default test run). Environment knobs (a smaller size proves the comparison works;
the >= 50x target is asserted only at the full size, 100 000 x 1000):

* ``MEDBENCH_BENCH_N`` test images (default 100000; validation and OOD sets are N/5 each),
* ``MEDBENCH_BENCH_RESAMPLES`` bootstrap resamples (default 1000),
* ``MEDBENCH_BENCH_LOOP_RESAMPLES`` resamples the loop is timed on (default 3: about 100 s each at the full size).
"""

from __future__ import annotations

import json
import os
import time
import warnings
from functools import partial

import numpy as np
import polars as pl
import pytest
from fairlearn.metrics import (
    MetricFrame,
    demographic_parity_difference,
    equalized_odds_difference,
    false_negative_rate,
    false_positive_rate,
    selection_rate,
    true_positive_rate,
)
from netcal.metrics import ECE, MCE
from scipy.optimize import minimize_scalar
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    brier_score_loss,
    log_loss,
    roc_auc_score,
    roc_curve,
)

from medbench.data.base import label_column
from medbench.predictions import Predictions
from medbench.scoring.bootstrap import Resampling
from medbench.spec import ScoringSpec
from medbench.store import CONFIG, RunDir
from medbench.store.scores import score_run

FULL_N, FULL_RESAMPLES = 100_000, 1000
N = int(os.environ.get("MEDBENCH_BENCH_N", str(FULL_N)))
RESAMPLES = int(os.environ.get("MEDBENCH_BENCH_RESAMPLES", str(FULL_RESAMPLES)))
LOOP_RESAMPLES = min(int(os.environ.get("MEDBENCH_BENCH_LOOP_RESAMPLES", "3")), RESAMPLES)
LABELS = 14
OOD_LABELS = 8  # the OOD target scores the first 8 labels (a harmonized subset)
N_VAL = N_OOD = max(N // 5, 200)
METRICS = ["auc", "accuracy", "ece", "mce", "brier", "nll"]
CALIBRATION = ("ece", "mce", "brier", "nll")
RATES = ("tpr", "fpr", "fnr", "selection_rate")
AGE_BINS = [0, 40, 65, 200]
MIN_GROUP = 20
OOD = "site-b"
TARGET_SPEEDUP = 50.0
NAMES = [f"finding{k:02d}" for k in range(LABELS)]


# --------------------------------------------------------------------------- the run folder


def _split(n: int, seed: int, strength: float, labels: list[str], prefix: str) -> Predictions:
    """Two images per patient; sex (5 % missing) and age per patient; a weaker signal for women (a subgroup
    gap) and overconfident probabilities rounded to 4 decimals (ties); 3 % of the labels missing."""
    rng = np.random.default_rng(seed)
    k = len(labels)
    patients = np.arange(n) // 2
    n_pat = int(patients[-1]) + 1
    sex = rng.choice(np.array(["M", "F", ""]), n_pat, p=[0.475, 0.475, 0.05])[patients]
    age = rng.uniform(18, 90, n_pat)[patients]
    prevalence = np.linspace(0.02, 0.4, LABELS)[:k]
    y = (rng.random((n, k)) < prevalence).astype(float)
    s = np.where(sex == "F", 0.7 * strength, strength)[:, None]
    z = s * (2 * y - 1) + rng.standard_normal((n, k))
    p = np.round(1 / (1 + np.exp(-1.8 * z)), 4)
    y[rng.random((n, k)) < 0.03] = np.nan
    table = pl.DataFrame({"sample_id": [f"{prefix}{i:06d}" for i in range(n)],
                          "patient_id": [f"{prefix}p{i:06d}" for i in patients],
                          "sex": pl.Series([v or None for v in sex.tolist()], dtype=pl.Utf8), "age": age})
    table = table.with_columns(**{label_column(name): pl.Series(y[:, j]).fill_nan(None).cast(pl.Int8)
                                  for j, name in enumerate(labels)})
    return Predictions.build(table, p, labels, "multilabel")


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> RunDir:
    run = RunDir(tmp_path_factory.mktemp("bench-run"))
    _split(N, 0, 1.2, NAMES, "T").save(run.prediction_file("test"))
    _split(N_VAL, 1, 1.2, NAMES, "V").save(run.prediction_file("val"))
    _split(N_OOD, 2, 0.8, NAMES[:OOD_LABELS], "O").save(run.prediction_file(f"ood-{OOD}"))
    spec = {"task": "bench", "version": 1, "type": "multilabel", "labels": NAMES, "metrics": METRICS,
            "headline": "auc",
            "attributes": [{"name": "sex"}, {"name": "age_group", "column": "age", "bins": AGE_BINS}],
            "scoring": {"bootstrap": RESAMPLES, "min_group_size": MIN_GROUP}}
    config = {"task": "bench", "task_spec": spec, "backbone": "bench", "init": "random", "seed": 0,
              "ood_targets": [{"name": OOD, "task": "bench-siteb", "n": N_OOD}]}
    (run.path / CONFIG).write_text(json.dumps(config))
    return run


# --------------------------------------------------------------------------- the per-resample loop


def _groups(table: pl.DataFrame) -> dict[str, np.ndarray]:
    """Group name per image, named as medbench reports them."""
    sex = np.asarray([v if v is not None else "(missing)" for v in table["sex"].to_list()], dtype=object)
    age = table["age"].to_numpy()
    names = [f"[{a:g}, {b:g})" for a, b in zip(AGE_BINS, AGE_BINS[1:])]
    age_group = np.asarray([names[i] for i in np.digitize(age, AGE_BINS) - 1], dtype=object)
    return {"sex": sex, "age_group": age_group}


def _auc(y: np.ndarray, p: np.ndarray) -> float:
    return float(roc_auc_score(y, p)) if 0 < y.sum() < y.size else np.nan


def _balanced(y: np.ndarray, d: np.ndarray) -> float:
    if not y.size:
        return np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # one class present: sklearn averages over the classes present
        return float(balanced_accuracy_score(y, d))


def _calibration(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    return {"ece": float(ECE(bins=15).measure(p, y)), "mce": float(MCE(bins=15).measure(p, y)),
            "brier": float(brier_score_loss(y, p)), "nll": float(log_loss(y, p, labels=[0, 1]))}


def _temperature(y: np.ndarray, p: np.ndarray) -> float:
    """The maximum-likelihood temperature of one label's validation probabilities (scipy, on their logits)."""
    eps = np.finfo(np.float64).eps
    z = np.log(np.clip(p, eps, 1 - eps)) - np.log1p(-np.clip(p, eps, 1 - eps))
    nll = lambda t: float(np.mean(np.logaddexp(0.0, -(2 * y - 1) * z / t)))  # noqa: E731
    return float(minimize_scalar(nll, bounds=(0.05, 20.0), method="bounded", options={"xatol": 1e-12}).x)


def _scale(p: np.ndarray, t: float) -> np.ndarray:
    eps = np.finfo(np.float64).eps
    c = np.clip(p, eps, 1 - eps)
    return 1.0 / (1.0 + np.exp(-(np.log(c) - np.log1p(-c)) / t))


class Loop:
    """Every bootstrapped score, recomputed by the libraries on each resample."""

    def __init__(self, run: RunDir):
        test = Predictions.load(run.prediction_file("test"))
        val = Predictions.load(run.prediction_file("val"))
        self.ood = Predictions.load(run.prediction_file(f"ood-{OOD}"))
        self.y, self.p = test.y_true(), test.y_prob()
        self.ood_y, self.ood_p = self.ood.y_true(), self.ood.y_prob()
        # fixed over the resamples, from validation only: temperatures (scipy) and Youden thresholds (sklearn)
        yv, pv = val.y_true(), val.y_prob()
        self.q = np.empty_like(self.p)
        self.d = np.empty_like(self.p)
        for k in range(LABELS):
            keep = ~np.isnan(yv[:, k])
            self.q[:, k] = _scale(self.p[:, k], _temperature(yv[keep, k], pv[keep, k]))
            fpr, tpr, thr = roc_curve(yv[keep, k].astype(int), pv[keep, k], drop_intermediate=False)
            i = 1 + int(np.argmax((tpr - fpr)[1:]))  # the first point (threshold inf) decides nothing
            self.d[:, k] = (self.p[:, k] >= thr[i]).astype(np.float64)
        self.group_of = _groups(test.table)
        # groups with at least MIN_GROUP test images are scored (on the whole test set: fixed over resamples)
        self.scored = {a: [g for g in sorted(set(g_of)) if (g_of == g).sum() >= MIN_GROUP]
                       for a, g_of in self.group_of.items()}
        self.test_res = Resampling.of(test, n_resamples=RESAMPLES, seed=ScoringSpec().bootstrap_seed, scope="test")
        self.ood_res = Resampling.of(self.ood, n_resamples=RESAMPLES, seed=ScoringSpec().bootstrap_seed,
                                     scope=f"ood:{OOD}")
        # which components are defined on the whole sets (the strict rule's point): one pass over every row
        self.defined: dict[tuple, bool] = {}
        self.recording = True
        self.resample(np.arange(len(self.y)))
        self.ood_resample(np.arange(len(self.ood_y)))
        self.recording = False

    def _agg(self, how: str, components: list[tuple[tuple, float]], at_least: int = 1) -> float:
        """mean / min / gap over the components defined at the point; NaN when one of them is not here."""
        if self.recording:
            for key, v in components:
                self.defined[key] = bool(np.isfinite(v))
        chosen = [v for key, v in components if self.defined.get(key)]
        if len(chosen) < at_least or not chosen or not np.all(np.isfinite(chosen)):
            return np.nan
        return {"mean": float(np.mean(chosen)), "min": float(min(chosen)),
                "gap": float(max(chosen) - min(chosen))}[how]

    def resample(self, idx: np.ndarray) -> dict[tuple, float]:
        """Every test-scope score of one resample (row indices)."""
        y, p, q, d = self.y[idx], self.p[idx], self.q[idx], self.d[idx]
        out: dict[tuple, float] = {}
        per: dict[str, list] = {m: [] for m in ("auc", "accuracy", *CALIBRATION)}
        after: dict[str, list] = {m: [] for m in CALIBRATION}
        for k, name in enumerate(NAMES):
            keep = ~np.isnan(y[:, k])
            yy, pp, qq = y[keep, k].astype(int), p[keep, k], q[keep, k]
            scores = {"auc": _auc(yy, pp), "accuracy": float(accuracy_score(yy, pp > 0.5)), **_calibration(yy, pp)}
            scaled = _calibration(yy, qq)
            for m, v in scores.items():
                per[m].append((("test", m, k), v))
                out[("test", f"{m}/{name}")] = v
            for m in CALIBRATION:
                after[m].append((("after", m, k), scaled[m]))
                out[("calibration", "before", f"{m}/{name}")] = scores[m]
                out[("calibration", "after", f"{m}/{name}")] = scaled[m]
        for m, values in per.items():
            out[("test", m)] = self._agg("mean", values)
        for m in CALIBRATION:
            out[("calibration", "before", m)] = out[("test", m)]
            out[("calibration", "after", m)] = self._agg("mean", after[m])
        for m in ("auc", "accuracy"):
            out[("shift", OOD, m, "in_distribution")] = self._agg("mean", per[m][:OOD_LABELS])
        for attribute, group_of in self.group_of.items():
            out.update(self._fairness(attribute, group_of[idx], y, p, d))
        return out

    def _fairness(self, attribute: str, group_of: np.ndarray, y, p, d) -> dict[tuple, float]:
        prefix = ("fairness", "attributes", attribute)
        scored = self.scored[attribute]
        out: dict[tuple, float] = {}
        values: dict[str, list] = {"auc": [], "accuracy": [], "balanced_accuracy": []}
        for g in scored:
            in_g = group_of == g
            comps: dict[str, list] = {m: [] for m in values}
            for k in range(LABELS):
                keep = in_g & ~np.isnan(y[:, k])
                yy, pp = y[keep, k].astype(int), p[keep, k]
                comps["auc"].append(((attribute, g, "auc", k), _auc(yy, pp)))
                comps["accuracy"].append(((attribute, g, "accuracy", k),
                                          float(accuracy_score(yy, pp > 0.5)) if yy.size else np.nan))
                comps["balanced_accuracy"].append(((attribute, g, "balanced_accuracy", k),
                                                   _balanced(yy, (pp > 0.5).astype(int))))
            for m, c in comps.items():
                v = self._agg("mean", c)
                out[(*prefix, "groups", g, m)] = v
                values[m].append(((attribute, "group", g, m), v))
        for m, vals in values.items():
            out[(*prefix, "worst", m)] = self._agg("min", vals)
            out[(*prefix, "gap", m)] = self._agg("gap", vals, 2)
        rates = {g: {m: [] for m in RATES} for g in scored}
        gaps: dict[str, list] = {m: [] for m in RATES}
        eods, dps = [], []
        for k in range(LABELS):
            keep = ~np.isnan(y[:, k]) & np.isin(group_of, scored)
            yy, dd, gg = y[keep, k].astype(int), d[keep, k].astype(int), group_of[keep].astype(str)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a group without positives: fairlearn warns and reports 0
                mf = MetricFrame(metrics={"tpr": partial(true_positive_rate, pos_label=1),
                                          "fpr": partial(false_positive_rate, pos_label=1),
                                          "fnr": partial(false_negative_rate, pos_label=1),
                                          "selection_rate": partial(selection_rate, pos_label=1)},
                                 y_true=yy, y_pred=dd, sensitive_features=gg)
                table = mf.by_group
                # a rate over an empty class is undefined (medbench's rule), not fairlearn's 0
                for g in table.index:
                    pos, neg = ((gg == g) & (yy == 1)).sum(), ((gg == g) & (yy == 0)).sum()
                    if not pos:
                        table.loc[g, ["tpr", "fnr"]] = np.nan
                    if not neg:
                        table.loc[g, "fpr"] = np.nan
                if self.recording:
                    for g in scored:
                        self.defined[(attribute, "both", g, k)] = bool(g in table.index and np.isfinite(
                            table.loc[g, "tpr"]) and np.isfinite(table.loc[g, "fpr"]))
                both = [g for g in scored if self.defined.get((attribute, "both", g, k))]
                lost = any(g not in table.index or not (np.isfinite(table.loc[g, "tpr"]) and
                                                        np.isfinite(table.loc[g, "fpr"])) for g in both)
                sel = np.isin(gg, both)
                eod = (np.nan if lost else float(equalized_odds_difference(yy[sel], dd[sel], sensitive_features=gg[sel]))) \
                    if len(both) >= 2 else np.nan
                eods.append(((attribute, "eod", k), eod))
            for m in RATES:
                comps = [((attribute, "rate", g, m, k), float(table.loc[g, m]) if g in table.index else np.nan)
                         for g in scored]
                gaps[m].append(((attribute, "gap", m, k), self._agg("gap", comps, 2)))
                for (key, v), g in zip(comps, scored):
                    rates[g][m].append((key, v))
            sel_groups = [g for g in scored if self.defined.get((attribute, "rate", g, "selection_rate", k))]
            sel_lost = any(g not in table.index for g in sel_groups)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                dp = (np.nan if sel_lost else float(demographic_parity_difference(
                    yy[np.isin(gg, sel_groups)], dd[np.isin(gg, sel_groups)],
                    sensitive_features=gg[np.isin(gg, sel_groups)]))) if len(sel_groups) >= 2 else np.nan
            dps.append(((attribute, "dp", k), dp))
        for g in scored:
            for m in RATES:
                out[(*prefix, "groups", g, m)] = self._agg("mean", rates[g][m])
        for m in RATES:
            out[(*prefix, "gap", m)] = self._agg("mean", gaps[m])
        out[(*prefix, "equalized_odds_difference")] = self._agg("mean", eods)
        out[(*prefix, "demographic_parity_difference")] = self._agg("mean", dps)
        return out

    def ood_resample(self, idx: np.ndarray) -> dict[tuple, float]:
        y, p = self.ood_y[idx], self.ood_p[idx]
        out: dict[tuple, float] = {}
        per: dict[str, list] = {"auc": [], "accuracy": []}
        for k, name in enumerate(self.ood.label_names):
            keep = ~np.isnan(y[:, k])
            yy, pp = y[keep, k].astype(int), p[keep, k]
            for m, v in (("auc", _auc(yy, pp)), ("accuracy", float(accuracy_score(yy, pp > 0.5)))):
                per[m].append((("ood", m, k), v))
                out[("ood", OOD, f"{m}/{name}")] = v
        for m, values in per.items():
            out[("ood", OOD, m)] = self._agg("mean", values)
        return out

    def run(self, n: int) -> tuple[dict[tuple, list[float]], float]:
        """(values per replicate column on the first ``n`` resamples, seconds spent)."""
        out: dict[tuple, list[float]] = {}
        test_counts, ood_counts = next(self.test_res.counts(n)), next(self.ood_res.counts(n))
        t0 = time.perf_counter()
        for b in range(n):
            values = self.resample(self.test_res.sample_indices(test_counts[:, b]))
            values.update(self.ood_resample(self.ood_res.sample_indices(ood_counts[:, b])))
            for m in ("auc", "accuracy"):
                i, t = values[("shift", OOD, m, "in_distribution")], values[("ood", OOD, m)]
                values[("shift", OOD, m, "target")] = t
                values[("shift", OOD, m, "drop")] = i - t
                values[("shift", OOD, m, "relative_drop")] = (i - t) / i
            for key, v in values.items():
                out.setdefault(key, []).append(v)
        return out, time.perf_counter() - t0


# --------------------------------------------------------------------------- the benchmark


def _load() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def test_scoring_speedup(benchmark, run: RunDir) -> None:
    scores, replicates = benchmark.pedantic(score_run, args=(run,), rounds=1, iterations=1)
    vec_seconds = benchmark.stats.stats.mean
    loop, spent = Loop(run).run(LOOP_RESAMPLES)
    loop_per_resample = spent / LOOP_RESAMPLES
    loop_seconds = loop_per_resample * RESAMPLES
    # the same columns: every score medbench bootstraps is recomputed by the loop, and nothing else
    missing, extra = sorted(set(replicates) - set(loop)), sorted(set(loop) - set(replicates))
    assert not missing and not extra, (missing[:10], extra[:10])
    assert {k[0] for k in replicates} == {"test", "calibration", "fairness", "shift", "ood"}
    for key, values in loop.items():  # the same numbers
        assert len(replicates[key]) == RESAMPLES, key
        got = replicates[key][:LOOP_RESAMPLES]
        assert np.allclose(got, values, atol=1e-6, rtol=0, equal_nan=True), (key, got, values)
    assert scores["calibration"]["temperature_status"] == {name: "fitted" for name in NAMES}
    assert scores["fairness"]["operating_point"]["chosen_on"] == "val"
    speedup = loop_seconds / vec_seconds
    full = (N, RESAMPLES) == (FULL_N, FULL_RESAMPLES)
    benchmark.extra_info.update({"vectorized_seconds": vec_seconds, "loop_seconds_per_resample": loop_per_resample,
                                 "loop_seconds_extrapolated": loop_seconds, "speedup": speedup, "n": N,
                                 "labels": LABELS, "resamples": RESAMPLES, "loop_resamples": LOOP_RESAMPLES,
                                 "replicate_columns": len(replicates), "full_size": full, "load_average": _load()})
    print(f"\nmedbench score {vec_seconds:.1f} s for {RESAMPLES} resamples ({len(replicates)} replicate columns, "
          f"N={N}); sklearn/netcal/fairlearn loop {loop_per_resample:.2f} s per resample ({LOOP_RESAMPLES} timed) "
          f"-> {loop_seconds:.0f} s extrapolated; load {_load()}; speed-up {speedup:.0f}x (target "
          f"{TARGET_SPEEDUP:.0f}x{'' if full else ', asserted at the full size only'})")
    if full:
        assert speedup >= TARGET_SPEEDUP
