"""Accuracy, balanced accuracy and AUC, per label and aggregated, each defined once as linear statistics.

* binary: AUC of the positive class; accuracy at probability 0.5 (``p > 0.5``);
  balanced accuracy = the mean recall over the classes present (positive and
  negative), at the same decision.
* multilabel: AUC per label on the images where that label is present (not
  missing), ``auc`` = mean over labels (CJ21's mean AUC); accuracy and balanced
  accuracy per label at 0.5, aggregated as their mean over labels.
* multiclass: top-1 accuracy; ``auc`` = macro one-vs-rest AUC; balanced
  accuracy = mean per-class recall of the top-1 decision over the classes
  present (scikit-learn's ``balanced_accuracy_score``; the ISIC challenges'
  "balanced multiclass accuracy"). Rows that are not labelled (no scored class,
  see :mod:`medbench.predictions`) are left out of every one of them.

A label whose test set holds one class has AUC ``None`` (undefined) and is left
out of the mean, in the point value and in every bootstrap replicate; a
replicate in which a label defined at the point draws one class is undefined
(counted in ``n_undefined``), not a mean over the other labels (see
:mod:`medbench.scoring.bootstrap`).

The AUC is rank based (Mann-Whitney with ties counted one half) on linear
statistics: the smaller class's distinct scores define groups ``g``; per group
the weight of that class (``Q_g``), of the other class strictly between the
previous group and ``g`` (``B_g``) and tied with ``g`` (``T_g``). Then
``AUC = sum_g Q_g (cumsum(B + T)_g - T_g / 2) / (Q R)``, one cumulative sum over
at most ``min(n_pos, n_neg)`` groups per resample. Scores are the logits
(log-softmax for multiclass), so confident predictions never tie
(:meth:`medbench.predictions.Predictions.y_score`). Tests check every value
against ``sklearn.metrics.roc_auc_score`` / ``accuracy_score`` /
``balanced_accuracy_score``.
"""

from __future__ import annotations

import numpy as np

from medbench.predictions import Predictions
from medbench.scoring.bootstrap import LinearStats, defined_at_point, ratio, strict_mean
from medbench.scoring.registry import register_metric


def check_finite(preds: Predictions, where: str | None = None) -> None:
    """A clear error for NaN or infinite predictions (logits, or probabilities of an older file)."""
    kind, p = ("logits", preds.logits()) if preds.has_logits else ("probabilities", preds.stored_probs())
    bad = ~np.isfinite(p)
    if bad.any():
        from medbench.errors import DataError

        k = int(np.flatnonzero(bad.any(0))[0])
        prefix = "logit" if preds.has_logits else "prob"
        raise DataError(f"{int(bad.sum())} predicted {kind} are NaN or infinite (first in label "
                        f"{preds.label_names[k]!r}); scores are undefined", where=where,
                        field=f"{prefix}:{preds.label_names[k]}")


def _arrays(preds: Predictions) -> tuple[np.ndarray, np.ndarray]:
    check_finite(preds)
    return preds.y_true(), preds.y_score()


# --------------------------------------------------------------------------- AUC


def auc_rows(stats: LinearStats, y: np.ndarray, p: np.ndarray, mask: np.ndarray | None = None):
    """Register the rows of a weighted rank AUC of scores ``p`` for labels ``y`` over ``mask``; returns
    ``finalize(sums) -> [b]`` (NaN where a resample holds one class)."""
    valid = ~np.isnan(y)
    if mask is not None:
        valid &= mask
    pos = valid & (y == 1)
    neg = valid & (y == 0)
    n_pos, n_neg = int(pos.sum()), int(neg.sum())
    if n_pos == 0 or n_neg == 0:
        return lambda sums: np.full(sums.shape[1], np.nan)
    # the smaller class defines the groups; with negatives as the query class, scores are negated. Only the
    # scored samples (``valid``) are looked at: the rows hold those alone, in sample order
    idx = np.flatnonzero(valid)
    yv, sv = y[idx], p[idx]
    if n_pos <= n_neg:
        query, score = yv == 1, sv
    else:
        query, score = yv == 0, -sv
    ref = ~query
    groups = np.unique(score[query])
    k = groups.size
    g = np.searchsorted(groups, score, side="left")
    at = np.minimum(g, k - 1)
    tied = ref & (g < k) & (groups[at] == score)
    before = ref & (g < k) & ~tied
    q0 = stats.add_rows_at(idx[query], g[query], k)
    b0 = stats.add_rows_at(idx[before], g[before], k)
    has_ties = bool(tied.any())
    t0 = stats.add_rows_at(idx[tied], g[tied], k) if has_ties else -1
    r_total = stats.add_sum(neg if n_pos <= n_neg else pos)

    ones = np.ones(k)

    # Every sum here is a whole number of images (resample counts times 1), and so is every product and partial
    # sum below (at most n_query * n_ref, exact in float64 up to 2**53): the order of the additions cannot
    # change a bit, so the numerator is split into two products and the totals taken by a BLAS product.
    def finalize(sums: np.ndarray) -> np.ndarray:
        q = sums[q0 : q0 + k]
        below = sums[b0 : b0 + k]
        if has_ties:
            t = sums[t0 : t0 + k]
            cum = below + t
            np.add.accumulate(cum, axis=0, out=cum)
            num = np.einsum("gb,gb->b", q, cum) - 0.5 * np.einsum("gb,gb->b", q, t)
        else:
            num = np.einsum("gb,gb->b", q, np.cumsum(below, axis=0))
        return ratio(num, (ones @ q) * sums[r_total])

    return finalize


def auc_label_rows(stats: LinearStats, preds: Predictions, mask: np.ndarray | None = None):
    """Per label (or class, one-vs-rest) AUC rows over ``mask``; returns ``(finalizers, defined at point)``."""
    y, s = _arrays(preds)
    finals = [auc_rows(stats, y[:, k], s[:, k], mask) for k in range(len(preds.label_names))]
    return finals, [defined_at_point(stats, f) for f in finals]


def auc_finalizer(stats: LinearStats, preds: Predictions, mask: np.ndarray | None = None):
    """``finalize(sums) -> {"auc": [b], "auc/<label>": [b] ...}`` over ``mask``: the task's AUC (one label's,
    or the mean over the labels defined at the point, strictly)."""
    finals, defined = auc_label_rows(stats, preds, mask)
    detail = preds.task_type != "binary"

    def finalize(sums: np.ndarray) -> dict[str, np.ndarray]:
        per = [f(sums) for f in finals]
        out = {"auc": strict_mean(per, defined)}
        if detail:
            out.update({f"auc/{name}": v for name, v in zip(preds.label_names, per)})
        return out

    return finalize


@register_metric("auc", linear=True)
def auc(preds: Predictions, config, stats: LinearStats):
    return auc_finalizer(stats, preds)


def per_label_auc(preds: Predictions) -> dict[str, float | None]:
    """The AUC of every label (one-vs-rest per class for multiclass), from the ``auc`` metric's definition."""
    from medbench.scoring.bootstrap import evaluate

    def build(stats):
        finals, _ = auc_label_rows(stats, preds)
        return lambda sums: {name: f(sums) for name, f in zip(preds.label_names, finals)}

    return evaluate(len(preds), [build], None).point


# --------------------------------------------------------------------------- accuracy


def top1(preds: Predictions) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(labelled rows, true class, predicted class) of a multiclass table: the decision is the argmax of the
    scores (the logits), the label the one class that is 1 (see :mod:`medbench.predictions`)."""
    y, s = _arrays(preds)
    keep = ~np.isnan(y).any(1) if y.size else np.zeros(len(preds), dtype=bool)
    true = np.where(keep, np.nan_to_num(y).argmax(1), -1) if y.size else np.zeros(0, np.int64)
    pred = s.argmax(1) if s.size else np.zeros(len(preds), np.int64)
    return keep, true, pred


def positive_decisions(preds: Predictions) -> np.ndarray:
    """The accuracy metrics' decision per label (binary/multilabel): positive when ``p > 0.5``."""
    return preds.y_prob() > 0.5


def accuracy_finalizer(stats: LinearStats, preds: Predictions, mask: np.ndarray | None = None):
    """``finalize(sums) -> {"accuracy": [b], ...}`` over ``mask``: top-1 (multiclass) or the mean over labels
    of the accuracy at 0.5 (labels defined at the point, strictly)."""
    check_finite(preds)
    n = len(preds)
    mask = np.ones(n, dtype=bool) if mask is None else mask
    if preds.task_type == "multiclass":
        keep, true, pred = top1(preds)
        keep = keep & mask
        c = stats.add_sum(keep & (true == pred))
        t = stats.add_sum(keep)
        return lambda sums: {"accuracy": ratio(sums[c], sums[t])}
    y = preds.y_true()
    d = positive_decisions(preds)
    finals = []
    for k in range(len(preds.label_names)):
        keep = ~np.isnan(y[:, k]) & mask
        correct = d[:, k] == (y[:, k] == 1)
        c, t = stats.add_sum(keep & correct), stats.add_sum(keep)
        finals.append(lambda sums, c=c, t=t: ratio(sums[c], sums[t]))
    defined = [defined_at_point(stats, f) for f in finals]
    detail = preds.task_type == "multilabel"

    def finalize(sums: np.ndarray) -> dict[str, np.ndarray]:
        per = [f(sums) for f in finals]
        out = {"accuracy": strict_mean(per, defined)}
        if detail:
            out.update({f"accuracy/{name}": v for name, v in zip(preds.label_names, per)})
        return out

    return finalize


@register_metric("accuracy", linear=True)
def accuracy(preds: Predictions, config, stats: LinearStats):
    return accuracy_finalizer(stats, preds)


def _recalls(stats: LinearStats, members: list[np.ndarray], hits: list[np.ndarray]):
    """Recall per class (hits / members): the finalizers and whether each class is present at the point."""
    finals = []
    for m, h in zip(members, hits):
        c, t = stats.add_sum(m & h), stats.add_sum(m)
        finals.append(lambda sums, c=c, t=t: ratio(sums[c], sums[t]))
    return finals, [defined_at_point(stats, f) for f in finals]


def balanced_accuracy_finalizer(stats: LinearStats, preds: Predictions, mask: np.ndarray | None = None):
    """``finalize(sums) -> {"balanced_accuracy": [b], ...}``: the mean recall over the classes present at the
    point (multiclass: of the top-1 decision; binary/multilabel: per label, positive and negative at
    ``p > 0.5``, then the mean over labels)."""
    check_finite(preds)
    n = len(preds)
    mask = np.ones(n, dtype=bool) if mask is None else mask
    if preds.task_type == "multiclass":
        keep, true, pred = top1(preds)
        keep = keep & mask
        classes = range(len(preds.label_names))
        finals, defined = _recalls(stats, [keep & (true == c) for c in classes], [pred == c for c in classes])
        return lambda sums: {"balanced_accuracy": strict_mean([f(sums) for f in finals], defined)}
    y = preds.y_true()
    d = positive_decisions(preds)
    per_label = []
    for k in range(len(preds.label_names)):
        keep = ~np.isnan(y[:, k]) & mask
        finals, defined = _recalls(stats, [keep & (y[:, k] == 1), keep & (y[:, k] == 0)], [d[:, k], ~d[:, k]])
        per_label.append(lambda sums, finals=finals, defined=defined: strict_mean([f(sums) for f in finals], defined))
    label_defined = [defined_at_point(stats, f) for f in per_label]
    detail = preds.task_type == "multilabel"

    def finalize(sums: np.ndarray) -> dict[str, np.ndarray]:
        per = [f(sums) for f in per_label]
        out = {"balanced_accuracy": strict_mean(per, label_defined)}
        if detail:
            out.update({f"balanced_accuracy/{name}": v for name, v in zip(preds.label_names, per)})
        return out

    return finalize


@register_metric("balanced_accuracy", linear=True)
def balanced_accuracy(preds: Predictions, config, stats: LinearStats):
    return balanced_accuracy_finalizer(stats, preds)
