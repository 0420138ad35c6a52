"""Calibration: ECE, MCE, Brier, NLL; temperature scaling fitted on validation; reliability diagrams.

What is calibrated:

* binary and multilabel tasks: each label's probability of the positive class
  against that label (images where the label is missing are left out), the
  *classwise* calibration of Kull et al. 2019 / Nixon et al. 2019 (for a binary
  task, Guo et al.'s top-label confidence ``max(p, 1 - p)`` is the other common
  choice; medbench calibrates the probability a reader acts on, as the
  reliability diagram shows it); aggregates are the mean over labels, details
  ``ece/<label>``;
* multiclass tasks: the top-label confidence (max probability) against top-1
  correctness for ECE and MCE (Guo et al. 2017); Brier is the multiclass Brier
  score, **the sum over classes** of the squared errors (Brier 1950; range 0..2),
  for any number of classes (scikit-learn's ``brier_score_loss`` halves it for
  two columns), and NLL the cross-entropy of the true class. Rows that are not
  labelled (no scored class, see :mod:`medbench.predictions`) are left out.

ECE = sum over bins of (bin share) x |observed frequency - mean confidence|;
MCE = the largest such gap over non-empty bins. Confidences are clipped to
``[eps, 1 - eps]`` (netcal's convention) and a confidence ``c`` falls in the bin
``[e_i, e_i+1)`` (the last bin closed). Bins:

* ``uniform``: ``ece_bins`` (15) bins of equal width;
* ``adaptive``: equal mass, edges at the quantiles ``0, 1/B, ..., 1`` of the
  scored (clipped) confidences, first and last edge set to 0 and 1 (netcal's
  convention). **Ties**: when many confidences are equal (e.g. 180 of 200 at
  0.3, or rounded probabilities) several quantiles coincide; duplicate edges
  are merged (``np.unique``), so a tied value never straddles two bins and
  there are fewer than ``ece_bins`` bins. Merging only removes bins of zero
  width, which hold no sample under the ``[e_i, e_i+1)`` rule: without ties
  the edges, and the values, are netcal's (tests check it); with ties netcal
  (scipy's ``binned_statistic_dd``) raises "The smallest edge difference is
  numerically 0" instead.

**One definition.** Every value (point and bootstrap replicate) is the
finalizer of linear statistics in :func:`calibration_rows`, with the bin edges
of the scored set held fixed over the resamples; netcal (ECE, MCE) and
scikit-learn (Brier, NLL) are the oracles in tests. Probabilities are float64
from the saved logits and the NLL is computed from log-sigmoid / log-softmax
of the logits (:mod:`medbench.predictions`), so a confident error costs its
full log-loss (no clipping at 1 - 2^-24 as float32 probabilities had).

**ECE's bias.** The binned ECE is biased upward (Kumar et al. 2019; Roelofs
et al. 2022): sampling noise in each bin adds to ``|frequency - confidence|``.
Bootstrap replicates add the same noise once more, so the plain percentile
interval can lie entirely above the point estimate. ECE and MCE are therefore
registered with the ``bias_corrected`` interval (see
:mod:`medbench.scoring.bootstrap` and docs/metrics.md): the interval of the
replicates shifted by their mean's excess over the point, with that excess
reported as ``bias``.

Temperature scaling (Guo et al. 2017) divides the logits by one temperature
per label (binary/multilabel) or one for all classes (multiclass), fitted on
the validation split by maximum likelihood and applied to the test split;
every metric is reported before and after. The NLL is convex in ``w = 1 / T``;
medbench finds its minimum on the logits (float64) by a bracketed root of the
derivative (scipy), and scaling is **guarded**: ``temperature_status`` says per
label (or ``all``) what happened, and the temperature is ``None`` (identity,
the label left unscaled) unless the status is ``fitted``:

* ``fitted``: the fit passed every check below;
* ``no_validation``: no validation predictions;
* ``one_class``: validation holds one class: nothing to fit;
* ``too_few``: fewer than ``MIN_VAL_IMAGES`` (20) labelled validation images,
  or fewer than ``MIN_VAL_PER_CLASS`` (5) of either class (multiclass: of
  right or of wrong top-1 decisions) — a temperature from 2 images (T = 0.035
  was reported) worsens the test NLL instead of improving it;
* ``not_positive``: the likelihood is maximal at ``w <= 0`` (validation
  predictions rank the wrong way; ``T = 1 / w`` would flip the test
  probabilities);
* ``out_of_range``: the maximum-likelihood ``T`` is outside
  ``[T_MIN, T_MAX]`` = [0.05, 20] (e.g. perfectly separated validation data
  drive ``T`` to 0).

The bootstrap resamples the test split with the fitted temperature held fixed.
netcal's ``TemperatureScaling`` (maximum likelihood) is the oracle in tests.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

from medbench.predictions import EPS, Predictions
from medbench.scoring.bootstrap import LinearStats, defined_at_point, evaluate, ratio, strict_mean
from medbench.scoring.registry import register_metric
from medbench.spec import ScoringSpec

#: temperature scaling guard (see the module docstring)
MIN_VAL_IMAGES = 20
MIN_VAL_PER_CLASS = 5
T_MIN, T_MAX = 0.05, 20.0
TEMPERATURE_STATUSES = ("fitted", "no_validation", "one_class", "too_few", "not_positive", "out_of_range")


@dataclass
class CalibrationTarget:
    """One calibrated quantity: confidences, 0/1 outcomes, and which rows are scored."""

    name: str
    confidence: np.ndarray
    outcome: np.ndarray
    valid: np.ndarray


def calibration_targets(preds: Predictions) -> list[CalibrationTarget]:
    """Per label (binary/multilabel) or the top label (multiclass)."""
    from medbench.scoring.classification import check_finite, top1

    check_finite(preds)
    p = preds.y_prob()
    if preds.task_type == "multiclass":
        keep, true, pred = top1(preds)
        conf = p.max(1) if p.size else np.zeros(len(preds))
        return [CalibrationTarget("top-label", conf, (true == pred).astype(np.float64), keep)]
    y = preds.y_true()
    return [CalibrationTarget(name, p[:, k], np.nan_to_num(y[:, k]), ~np.isnan(y[:, k]))
            for k, name in enumerate(preds.label_names)]


def bin_edges(confidence: np.ndarray, bins: int, binning: str) -> np.ndarray:
    """Strictly increasing bin edges on [0, 1]: ``bins`` of equal width, or (``adaptive``) equal mass at
    the quantiles of the clipped ``confidence`` (netcal's edges) with duplicate edges merged, so tied
    confidences give fewer, never empty zero-width, bins."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    if binning == "adaptive" and confidence.size:
        edges = np.quantile(np.clip(confidence, EPS, 1 - EPS), q=edges)
        edges[0], edges[-1] = 0.0, 1.0
        edges = np.unique(edges)  # ties: coinciding quantiles become one edge
    return edges


def bin_index(confidence: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Bin of each confidence: ``[e_i, e_i+1)``, the last bin closed (numpy's histogram rule)."""
    c = np.clip(confidence, EPS, 1 - EPS)
    return np.clip(np.searchsorted(edges, c, side="right") - 1, 0, len(edges) - 2)


# --------------------------------------------------------------------------- linear statistics (the definitions)


def _binned_rows(stats: LinearStats, t: CalibrationTarget, config: ScoringSpec, mask: np.ndarray | None):
    valid = t.valid if mask is None else t.valid & mask
    edges = bin_edges(t.confidence[valid], config.ece_bins, config.ece_binning)
    m = len(edges) - 1
    b = np.where(valid, bin_index(t.confidence, edges), -1)
    gap0 = stats.add_rows(b, m, t.outcome - np.clip(t.confidence, EPS, 1 - EPS))
    cnt0 = stats.add_rows(b, m)

    def finalize(sums: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        gap = np.abs(sums[gap0 : gap0 + m])
        cnt = sums[cnt0 : cnt0 + m]
        ece = ratio(gap.sum(0), cnt.sum(0))
        per_bin = np.where(cnt > 0, gap / np.where(cnt > 0, cnt, 1), -np.inf)
        mce = per_bin.max(0)
        mce[~np.isfinite(mce)] = np.nan
        return ece, mce

    return finalize


def _mean_rows(stats: LinearStats, values: np.ndarray, valid: np.ndarray):
    s = stats.add_sum(valid, np.where(valid, values, 0.0))
    c = stats.add_sum(valid)
    return lambda sums: ratio(sums[s], sums[c])


def calibration_rows(stats: LinearStats, preds: Predictions, config: ScoringSpec, mask: np.ndarray | None = None,
                     metrics: tuple[str, ...] = ("ece", "mce", "brier", "nll")):
    """Rows of the calibration metrics over ``mask``; returns ``finalize(sums) -> {name: [b]}``: per label
    (binary/multilabel; aggregates the strict mean over the labels defined at the point) or one value
    (multiclass)."""
    n = len(preds)
    mask_ = np.ones(n, dtype=bool) if mask is None else mask
    multiclass = preds.task_type == "multiclass"
    targets = calibration_targets(preds)
    parts: dict[str, list] = {}
    if {"ece", "mce"} & set(metrics):
        binned = [_binned_rows(stats, t, config, mask_) for t in targets]
        parts["ece"] = [lambda sums, f=f: f(sums)[0] for f in binned]
        parts["mce"] = [lambda sums, f=f: f(sums)[1] for f in binned]
    if {"brier", "nll"} & set(metrics):
        y = preds.y_true()
        p = preds.y_prob()
        log_p, log_q = preds.log_probs()
        if multiclass:
            keep = targets[0].valid & mask_
            onehot = np.nan_to_num(y)
            parts["brier"] = [_mean_rows(stats, ((p - onehot) ** 2).sum(1), keep)]
            parts["nll"] = [_mean_rows(stats, -(onehot * np.where(onehot > 0, log_p, 0.0)).sum(1), keep)]
        else:
            parts["brier"], parts["nll"] = [], []
            for k in range(len(preds.label_names)):
                keep = ~np.isnan(y[:, k]) & mask_
                yk = np.nan_to_num(y[:, k])
                nll = -np.where(yk == 1, log_p[:, k], log_q[:, k])
                parts["brier"].append(_mean_rows(stats, (p[:, k] - yk) ** 2, keep))
                parts["nll"].append(_mean_rows(stats, nll, keep))
    names = [t.name for t in targets]
    detail = preds.task_type == "multilabel"
    wanted = [m for m in ("ece", "mce", "brier", "nll") if m in metrics]
    defined = {m: [defined_at_point(stats, f) for f in parts[m]] for m in wanted}

    def finalize(sums: np.ndarray) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for metric in wanted:
            per = [f(sums) for f in parts[metric]]
            out[metric] = strict_mean(per, defined[metric])
            if detail:
                out.update({f"{metric}/{nm}": v for nm, v in zip(names, per)})
        return out

    return finalize


def _linear(metric: str):
    return lambda preds, config, stats: calibration_rows(stats, preds, config, metrics=(metric,))


register_metric("ece", higher_is_better=False, linear=True, interval="bias_corrected")(_linear("ece"))
register_metric("mce", higher_is_better=False, linear=True, interval="bias_corrected")(_linear("mce"))
register_metric("brier", higher_is_better=False, linear=True)(_linear("brier"))
register_metric("nll", higher_is_better=False, linear=True)(_linear("nll"))

CALIBRATION_METRICS = ("ece", "mce", "brier", "nll")


def binned_values(t: CalibrationTarget, config: ScoringSpec) -> tuple[float | None, float | None]:
    """(ECE, MCE) of one calibration target, from the same finalizer (for diagram titles)."""

    def build(stats: LinearStats):
        f = _binned_rows(stats, t, config, None)
        return lambda sums: dict(zip(("ece", "mce"), f(sums)))

    point = evaluate(len(t.valid), [build], None).point
    return point["ece"], point["mce"]


# --------------------------------------------------------------------------- temperature scaling


def _nll_slope(w: float, z: np.ndarray, y: np.ndarray, multiclass: bool) -> float:
    """Derivative in ``w`` of the mean NLL of the logits ``w z`` (convex in ``w``, so the slope increases)."""
    from scipy.special import expit, softmax

    if multiclass:
        q = softmax(w * z, axis=1)
        return float(np.mean((q * z).sum(1) - z[np.arange(len(y)), y]))
    m = (2 * y - 1) * z  # signed margin: NLL = mean(log(1 + exp(-w m)))
    return float(np.mean(-m * expit(-w * m)))


def fit_temperature(z: np.ndarray, y: np.ndarray, multiclass: bool) -> tuple[float | None, str]:
    """(T, status) of logits ``z`` (``[n]`` per label, or ``[n, K]``) for labels ``y`` (0/1, or class index)
    by maximum likelihood, with the guard of the module docstring."""
    from scipy.optimize import brentq

    n = len(y)
    if multiclass:
        right = int((z.argmax(1) == y).sum())
        counts = (right, n - right)
        one_class = np.unique(y).size < 2
    else:
        counts = (int((y == 1).sum()), int((y == 0).sum()))
        one_class = min(counts) == 0
    if one_class:
        return None, "one_class"
    if n < MIN_VAL_IMAGES or min(counts) < MIN_VAL_PER_CLASS:
        return None, "too_few"
    slope = lambda w: _nll_slope(w, z, y, multiclass)  # noqa: E731
    if slope(0.0) >= 0:  # the likelihood does not grow for any w > 0
        return None, "not_positive"
    w_lo, w_hi = 1.0 / T_MAX, 1.0 / T_MIN
    if slope(w_lo) > 0 or slope(w_hi) < 0:  # the optimum lies beyond the bounds of T
        return None, "out_of_range"
    w = brentq(slope, w_lo, w_hi, xtol=1e-12, rtol=1e-12, maxiter=200)
    return 1.0 / w, "fitted"


def fit_temperatures(val: Predictions | None) -> dict[str, float | None]:
    """Temperature per label (binary/multilabel) or one (multiclass, key ``all``), fitted on ``val``; None
    (identity) where nothing was fitted (see :func:`fit_temperature_details`)."""
    return fit_temperature_details(val)[0]


def fit_temperature_details(val: Predictions | None, label_names: list[str] | None = None,
                            task_type: str | None = None) -> tuple[dict[str, float | None], dict[str, str]]:
    """(temperatures, status) per label (binary/multilabel) or for ``all`` (multiclass), fitted on ``val``
    (status as in the module docstring; the temperature is None unless ``fitted``)."""
    if val is None or len(val) == 0:
        names = label_names if label_names is not None else (val.label_names if val is not None else [])
        kind = task_type or (val.task_type if val is not None else "binary")
        keys = ["all"] if kind == "multiclass" else list(names)
        return {k: None for k in keys}, {k: "no_validation" for k in keys}
    from medbench.scoring.classification import check_finite

    check_finite(val)
    y = val.y_true()
    z = val.logits_or_estimate()
    if val.task_type == "multiclass":
        keep = ~np.isnan(y).any(1)
        t, st = fit_temperature(z[keep], np.nan_to_num(y[keep]).argmax(1), True)
        return {"all": t}, {"all": st}
    temps: dict[str, float | None] = {}
    status: dict[str, str] = {}
    for k, name in enumerate(val.label_names):
        keep = ~np.isnan(y[:, k])
        temps[name], status[name] = fit_temperature(z[keep, k], y[keep, k], False)
    return temps, status


def apply_temperatures(preds: Predictions, temperatures: dict[str, float | None]) -> Predictions:
    """``preds`` with each fitted label's logits divided by its temperature (multiclass: every logit by the
    one temperature); labels without a temperature are unchanged."""
    multiclass = preds.task_type == "multiclass"
    scale = np.ones(len(preds.label_names))
    for k, name in enumerate(preds.label_names):
        t = temperatures.get("all" if multiclass else name)
        if t is not None:
            scale[k] = t
    if np.all(scale == 1.0):
        return preds
    z = preds.logits_or_estimate() / scale
    if preds.has_logits:
        return preds.with_logits(z)
    # probabilities only: the unscaled labels keep their stored values exactly
    from medbench.predictions import probabilities

    q = probabilities(preds.task_type, z)
    if not multiclass:
        q = np.where(scale == 1.0, preds.stored_probs(), q)
    meta = preds.table.drop([c for c in preds.table.columns if c.startswith("prob:")])
    return Predictions.build(meta, q, preds.label_names, preds.task_type)


# --------------------------------------------------------------------------- reliability diagrams


def reliability(t: CalibrationTarget, config: ScoringSpec) -> dict[str, np.ndarray]:
    """Per bin: edges, count, mean confidence, observed frequency (NaN for empty bins)."""
    c, o = t.confidence[t.valid], t.outcome[t.valid]
    edges = bin_edges(c, config.ece_bins, config.ece_binning)
    idx = bin_index(c, edges)
    m = len(edges) - 1
    count = np.bincount(idx, minlength=m).astype(np.float64)
    conf = ratio(np.bincount(idx, weights=np.clip(c, EPS, 1 - EPS), minlength=m), count)
    freq = ratio(np.bincount(idx, weights=o, minlength=m), count)
    return {"edges": edges, "count": count, "confidence": conf, "frequency": freq}


def reliability_png(before: Predictions, after: Predictions, config: ScoringSpec, title: str) -> bytes:
    """A reliability diagram (one panel per label, or the top label): observed frequency against mean
    confidence per bin, before and after temperature scaling, the share of images per bin (grey,
    before scaling), the diagonal, and the ECE before -> after."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    tb, ta = calibration_targets(before), calibration_targets(after)
    n = len(tb)
    cols = min(n, 3)
    rows = (n + cols - 1) // cols
    fig = Figure(figsize=(4.0 * cols, 3.8 * rows), dpi=80)
    FigureCanvasAgg(fig)
    for i, (b, a) in enumerate(zip(tb, ta)):
        ax = fig.add_subplot(rows, cols, i + 1)
        rb, ra = reliability(b, config), reliability(a, config)
        e = rb["edges"]
        ax.stairs(rb["count"] / max(rb["count"].sum(), 1.0), e, fill=True, color="0.8", label="share of images")
        for r, color, label in ((rb, "tab:blue", "before"), (ra, "tab:orange", "after T-scaling")):
            ok = np.isfinite(r["confidence"])
            ax.plot(r["confidence"][ok], r["frequency"][ok], "o-", color=color, ms=3, lw=1.2, label=label)
        ax.plot([0, 1], [0, 1], "k--", lw=0.8)
        eb, ea = binned_values(b, config)[0], binned_values(a, config)[0]
        ax.set_title(f"{b.name}: ECE {eb:.3f} → {ea:.3f}" if eb is not None and ea is not None else b.name,
                     fontsize=9)
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="observed frequency")
        if i == 0:
            ax.legend(fontsize=7, loc="upper left")
    fig.suptitle(title, fontsize=10)
    width, height = 4.0 * cols, 3.8 * rows
    fig.subplots_adjust(left=0.75 / width, right=1 - 0.15 / width, bottom=0.55 / height, top=1 - 0.75 / height,
                        wspace=0.32, hspace=0.45)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


# --------------------------------------------------------------------------- the axis


def calibration_axis(test: Predictions, val: Predictions | None, config: ScoringSpec):
    """(values, builders, calibrated test predictions): metrics before/after temperature scaling.

    ``values`` = ``{"binning", "bins", "temperature": {...}, "temperature_status": {...}, "fitted_on",
    "before": {...}, "after": {...}}``; the point values are the ``builders``' finalizers at unit weights,
    and the builders add the replicate rows of ``before``/``after`` to the test scope."""
    temps, status = fit_temperature_details(val, test.label_names, test.task_type)
    after = apply_temperatures(test, temps)
    values: dict = {"binning": config.ece_binning, "bins": config.ece_bins, "temperature": temps,
                    "temperature_status": status,
                    "fitted_on": "val" if "fitted" in status.values() else None,  # None: nothing was scaled
                    "guard": {"min_val_images": MIN_VAL_IMAGES, "min_val_per_class": MIN_VAL_PER_CLASS,
                              "t_min": T_MIN, "t_max": T_MAX},
                    "before": {}, "after": {}}

    def builder(which: str, preds: Predictions):
        def build(stats: LinearStats):
            f = calibration_rows(stats, preds, config)
            return lambda sums: {("calibration", which, k): v for k, v in f(sums).items()}

        return build

    builders = [builder("before", test), builder("after", after)]
    for path, v in evaluate(len(test), builders, None).point.items():
        values[path[1]][path[2]] = v
    return values, builders, after
