"""Calibration: ECE, MCE, Brier, NLL; temperature scaling fitted on validation; reliability diagrams.

What is calibrated:

* binary and multilabel tasks: each label's probability against that label
  (images where the label is missing are left out); aggregates are the mean
  over labels, details ``ece/<label>``;
* multiclass tasks: the top-label confidence (max probability) against
  top-1 correctness for ECE and MCE; Brier is the multiclass Brier score
  (sum over classes, range 0..2) and NLL the cross-entropy of the true class.

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
  numerically 0" instead. The point value and the bootstrap form use the same
  merged edges (:func:`bin_edges`), so they agree.

Point values: uniform ECE and MCE from netcal, adaptive ones from the merged
bins above (netcal cannot take explicit edges), Brier and NLL from
scikit-learn. Bootstrap replicates come from the same definitions on linear
statistics, with the bin edges of the scored set held fixed.

Temperature scaling (Guo et al. 2017) is fitted on the validation split with
netcal (maximum likelihood; per label for binary/multilabel, one temperature
for multiclass) and applied to the test split; every metric is reported
before and after. netcal fits the weight ``w = 1 / T`` of the logit without a
constraint; a temperature must be positive, so the fit is kept only when
``w > 0``. ``temperature_status`` says per label (or ``all``) what happened:
``fitted``; ``one_class`` (validation holds one class: nothing to fit);
``not_positive`` (netcal's ``w <= 0``: validation predictions rank the wrong
way, and ``T = 1 / w`` would flip the test probabilities). In the last two
cases the temperature is ``None`` and the label is left unscaled (identity,
``T = 1``). The bootstrap resamples the test split with the fitted
temperature held fixed.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np

from medbench.predictions import Predictions
from medbench.scoring.bootstrap import LinearStats, mean_defined, ratio
from medbench.scoring.registry import register_metric
from medbench.spec import ScoringSpec

EPS = float(np.finfo(np.float64).eps)


@dataclass
class CalibrationTarget:
    """One calibrated quantity: confidences, 0/1 outcomes, and which rows are scored."""

    name: str
    confidence: np.ndarray
    outcome: np.ndarray
    valid: np.ndarray


def calibration_targets(preds: Predictions) -> list[CalibrationTarget]:
    """Per label (binary/multilabel) or the top label (multiclass)."""
    from medbench.scoring.classification import check_finite, top1_correct

    check_finite(preds)
    y, p = preds.y_true(), preds.y_prob()
    if preds.task_type == "multiclass":
        keep, correct = top1_correct(y, p)
        return [CalibrationTarget("top-label", p.max(1), correct.astype(np.float64), keep)]
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


# --------------------------------------------------------------------------- point values (libraries)


def binned_value(metric: str, t: CalibrationTarget, config: ScoringSpec) -> float | None:
    """ECE or MCE of one target: netcal's for equal-width bins; for adaptive bins, from the merged
    quantile bins of :func:`bin_edges` (equal to netcal's whenever its edges are distinct, defined
    also with ties, where netcal fails)."""
    if not t.valid.any():
        return None
    if config.ece_binning == "uniform":
        from netcal.metrics import ECE, MCE

        cls = ECE if metric == "ece" else MCE
        m = cls(bins=config.ece_bins, equal_intervals=True)
        return float(m.measure(t.confidence[t.valid].astype(np.float64), t.outcome[t.valid].astype(np.int64)))
    r = reliability(t, config)
    filled = r["count"] > 0
    gap = np.abs(r["frequency"][filled] - r["confidence"][filled])
    if metric == "ece":
        return float(np.sum(r["count"][filled] * gap) / r["count"].sum())
    return float(gap.max())


def _brier_nll_point(preds: Predictions, metric: str) -> dict[str, float | None]:
    from sklearn.metrics import brier_score_loss, log_loss

    y, p = preds.y_true(), preds.y_prob()
    if preds.task_type == "multiclass":
        keep = ~np.isnan(y).any(1)
        if not keep.any():
            return {metric: None}
        labels = list(range(len(preds.label_names)))
        cls = y[keep].argmax(1)
        with warnings.catch_warnings():  # float32 softmax sums to 1 within 1e-7, sklearn warns at 1.5e-8
            warnings.filterwarnings("ignore", message="The y_prob values do not sum to one")
            if metric == "brier":
                return {metric: float(brier_score_loss(cls, p[keep], labels=labels))}
            return {metric: float(log_loss(cls, p[keep], labels=labels))}
    per: dict[str, float | None] = {}
    for k, name in enumerate(preds.label_names):
        keep = ~np.isnan(y[:, k])
        if not keep.any():
            per[name] = None
        elif metric == "brier":
            per[name] = float(brier_score_loss(y[keep, k].astype(int), p[keep, k], pos_label=1))
        else:
            per[name] = float(log_loss(y[keep, k].astype(int), p[keep, k], labels=[0, 1]))
    return _aggregate(preds, metric, per)


def _aggregate(preds: Predictions, metric: str, per: dict[str, float | None]) -> dict[str, float | None]:
    defined = [v for v in per.values() if v is not None]
    out: dict[str, float | None] = {metric: float(np.mean(defined)) if defined else None}
    if preds.task_type == "multilabel":
        out.update({f"{metric}/{name}": v for name, v in per.items()})
    return out


def _binned_point(preds: Predictions, config: ScoringSpec, metric: str) -> dict[str, float | None]:
    targets = calibration_targets(preds)
    per = {t.name: binned_value(metric, t, config) for t in targets}
    if preds.task_type == "multiclass":
        return {metric: per["top-label"]}
    return _aggregate(preds, metric, per)


# --------------------------------------------------------------------------- linear statistics


def _binned_rows(stats: LinearStats, t: CalibrationTarget, config: ScoringSpec, mask: np.ndarray | None):
    valid = t.valid if mask is None else t.valid & mask
    edges = bin_edges(t.confidence[t.valid], config.ece_bins, config.ece_binning)
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


def _sum_rows(stats: LinearStats, values: np.ndarray, valid: np.ndarray):
    s = stats.add_sum(valid, np.where(valid, values, 0.0))
    c = stats.add_sum(valid)
    return lambda sums: ratio(sums[s], sums[c])


def calibration_rows(stats: LinearStats, preds: Predictions, config: ScoringSpec, mask: np.ndarray | None = None,
                     metrics: tuple[str, ...] = ("ece", "mce", "brier", "nll")):
    """Rows of the calibration metrics over ``mask``; returns ``finalize(sums) -> {name: [b]}``."""
    from medbench.scoring.classification import check_finite

    check_finite(preds)
    y, p = preds.y_true(), preds.y_prob()
    n = y.shape[0]
    mask_ = np.ones(n, dtype=bool) if mask is None else mask
    multiclass = preds.task_type == "multiclass"
    targets = calibration_targets(preds)
    binned = [_binned_rows(stats, t, config, mask_) for t in targets] if {"ece", "mce"} & set(metrics) else []
    sums_fns: dict[str, list] = {}
    if multiclass:
        keep = ~np.isnan(y).any(1) & mask_
        onehot = np.nan_to_num(y)
        pc = np.clip(p, EPS, 1 - EPS)
        sums_fns["brier"] = [_sum_rows(stats, ((p - onehot) ** 2).sum(1), keep)]
        sums_fns["nll"] = [_sum_rows(stats, -(onehot * np.log(pc)).sum(1), keep)]
    else:
        for k in range(len(preds.label_names)):
            keep = ~np.isnan(y[:, k]) & mask_
            yk = np.nan_to_num(y[:, k])
            pk = p[:, k]
            nll = -(yk * np.log(np.clip(pk, EPS, 1 - EPS)) + (1 - yk) * np.log(np.clip(1 - pk, EPS, 1 - EPS)))
            sums_fns.setdefault("brier", []).append(_sum_rows(stats, (pk - yk) ** 2, keep))
            sums_fns.setdefault("nll", []).append(_sum_rows(stats, nll, keep))
    names = [t.name for t in targets] if not multiclass else ["top-label"]
    detail = preds.task_type == "multilabel"

    def finalize(sums: np.ndarray) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        if binned:
            eces, mces = zip(*[f(sums) for f in binned])
            for metric, per in (("ece", eces), ("mce", mces)):
                if metric in metrics:
                    out[metric] = mean_defined(per)
                    if detail:
                        out.update({f"{metric}/{nm}": v for nm, v in zip(names, per)})
        for metric in ("brier", "nll"):
            if metric in metrics:
                per = [f(sums) for f in sums_fns[metric]]
                out[metric] = mean_defined(per)
                if detail:
                    out.update({f"{metric}/{nm}": v for nm, v in zip(preds.label_names, per)})
        return out

    return finalize


def _linear(metric: str):
    return lambda preds, config, stats: calibration_rows(stats, preds, config, metrics=(metric,))


@register_metric("ece", higher_is_better=False, linear=_linear("ece"))
def ece(preds: Predictions, config: ScoringSpec) -> dict[str, float | None]:
    return _binned_point(preds, config, "ece")


@register_metric("mce", higher_is_better=False, linear=_linear("mce"))
def mce(preds: Predictions, config: ScoringSpec) -> dict[str, float | None]:
    return _binned_point(preds, config, "mce")


@register_metric("brier", higher_is_better=False, linear=_linear("brier"))
def brier(preds: Predictions) -> dict[str, float | None]:
    return _brier_nll_point(preds, "brier")


@register_metric("nll", higher_is_better=False, linear=_linear("nll"))
def nll(preds: Predictions) -> dict[str, float | None]:
    return _brier_nll_point(preds, "nll")


CALIBRATION_METRICS = ("ece", "mce", "brier", "nll")


# --------------------------------------------------------------------------- temperature scaling


def fit_temperatures(val: Predictions) -> dict[str, float | None]:
    """Temperature per label (binary/multilabel) or one (multiclass, key ``all``), fitted on ``val``
    by maximum likelihood with netcal; None (identity) where nothing valid was fitted (see
    :func:`fit_temperature_details`)."""
    return fit_temperature_details(val)[0]


def _netcal_temperature(p: np.ndarray, y: np.ndarray) -> tuple[float | None, str]:
    """(T, status) from netcal's fit of ``w = 1 / T``; ``w <= 0`` (or not finite) is rejected."""
    from netcal.scaling import TemperatureScaling

    ts = TemperatureScaling(method="mle")
    ts.fit(p.astype(np.float64), y.astype(np.int64), tensorboard=False)
    w = float(np.asarray(ts.temperature).reshape(-1)[0])
    if not np.isfinite(w) or w <= 0:
        return None, "not_positive"
    return 1.0 / w, "fitted"


def fit_temperature_details(val: Predictions) -> tuple[dict[str, float | None], dict[str, str]]:
    """(temperatures, status) per label (binary/multilabel) or for ``all`` (multiclass), fitted on
    ``val``. Status ``fitted``, ``one_class`` (validation holds one class) or ``not_positive``
    (netcal's weight ``1 / T`` is <= 0: the predictions rank the wrong way on validation); the
    temperature is None (identity) unless ``fitted``."""
    from medbench.scoring.classification import check_finite

    check_finite(val)
    y, p = val.y_true(), val.y_prob()
    temps: dict[str, float | None] = {}
    status: dict[str, str] = {}
    if val.task_type == "multiclass":
        keep = ~np.isnan(y).any(1)
        cls = y[keep].argmax(1)
        if keep.sum() < 2 or np.unique(cls).size < 2:
            return {"all": None}, {"all": "one_class"}
        t, st = _netcal_temperature(p[keep], cls)
        return {"all": t}, {"all": st}
    for k, name in enumerate(val.label_names):
        keep = ~np.isnan(y[:, k])
        yk = y[keep, k]
        if yk.size < 2 or yk.min() == yk.max():
            temps[name], status[name] = None, "one_class"
            continue
        temps[name], status[name] = _netcal_temperature(p[keep, k], yk)
    return temps, status


def apply_temperatures(preds: Predictions, temperatures: dict[str, float | None]) -> Predictions:
    """``preds`` with probabilities rescaled: sigmoid(logit(p) / T) per label, or softmax(log p / T)."""
    p = np.clip(preds.y_prob(), EPS, 1 - EPS)
    if preds.task_type == "multiclass":
        t = temperatures.get("all")
        if t is None:
            return preds
        z = np.log(p) / t
        z -= z.max(1, keepdims=True)
        q = np.exp(z)
        q /= q.sum(1, keepdims=True)
    else:
        q = preds.y_prob().copy()
        for k, name in enumerate(preds.label_names):
            t = temperatures.get(name)
            if t is not None:
                logit = np.log(p[:, k]) - np.log1p(-p[:, k])
                q[:, k] = 1.0 / (1.0 + np.exp(-logit / t))
    from medbench.predictions import prob_column

    table = preds.table.with_columns(**{prob_column(n): q[:, k] for k, n in enumerate(preds.label_names)})
    return Predictions(table, preds.label_names, preds.task_type)


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
        eb, ea = binned_value("ece", b, config), binned_value("ece", a, config)
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
    "before": {...}, "after": {...}}``;
    ``builders`` add the replicate rows of ``before``/``after`` to the test scope."""
    temps, status = fit_temperature_details(val) if val is not None and len(val) else ({}, {})
    after = apply_temperatures(test, temps)
    values: dict = {"binning": config.ece_binning, "bins": config.ece_bins, "temperature": temps,
                    "temperature_status": status,
                    "fitted_on": "val" if "fitted" in status.values() else None,  # None: nothing was scaled
                    "before": {}, "after": {}}
    for which, preds in (("before", test), ("after", after)):
        for metric in CALIBRATION_METRICS:
            values[which].update(get_point(metric)(preds, config))

    def builder(which: str, preds: Predictions):
        def build(stats: LinearStats):
            f = calibration_rows(stats, preds, config)
            return lambda sums: {("calibration", which, k): v for k, v in f(sums).items()}

        return build

    return values, [builder("before", test), builder("after", after)], after


def get_point(metric: str):
    from medbench.scoring.registry import get_metric

    return get_metric(metric)
