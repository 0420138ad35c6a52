"""Accuracy and AUC, per label and aggregated: point values through torchmetrics, replicates vectorized.

* binary: AUC of the positive class; accuracy at probability 0.5 (``p > 0.5``).
* multilabel: AUC per label on the images where that label is present (not
  missing), ``auc`` = mean over labels whose AUC is defined (CJ21's mean AUC);
  accuracy per label at 0.5, ``accuracy`` = their mean.
* multiclass: top-1 accuracy; ``auc`` = macro one-vs-rest AUC.

A label whose test set holds one class only has AUC ``None`` (undefined).

The bootstrap form of the AUC is rank based (Mann-Whitney with ties counted
one half) on linear statistics: the smaller class's distinct scores define
groups ``g``; per group the weight of that class (``Q_g``), of the other class
strictly between the previous group and ``g`` (``B_g``) and tied with ``g``
(``T_g``). Then ``AUC = sum_g Q_g (cumsum(B + T)_g - T_g / 2) / (Q R)``, one
cumulative sum over at most ``min(n_pos, n_neg)`` groups per resample. Tests
check it against ``sklearn.metrics.roc_auc_score``.
"""

from __future__ import annotations

import numpy as np

from medbench.predictions import Predictions
from medbench.scoring.bootstrap import LinearStats, mean_defined, ratio
from medbench.scoring.registry import register_metric


def check_finite(preds: Predictions, where: str | None = None) -> None:
    """A clear error for NaN or infinite predicted probabilities (scores would be meaningless)."""
    p = preds.y_prob()
    bad = ~np.isfinite(p)
    if bad.any():
        from medbench.errors import DataError

        k = int(np.flatnonzero(bad.any(0))[0])
        raise DataError(f"{int(bad.sum())} predicted probabilities are NaN or infinite (first in label "
                        f"{preds.label_names[k]!r}); scores are undefined", where=where,
                        field=f"prob:{preds.label_names[k]}")


def binary_auc(y: np.ndarray, p: np.ndarray) -> float | None:
    """AUC of scores ``p`` for 0/1 labels ``y`` (NaN labels dropped); None when one class only."""
    import torch
    from torchmetrics.functional.classification import binary_auroc

    keep = ~np.isnan(y)
    y, p = y[keep], p[keep]
    if y.size == 0 or y.min() == y.max():
        return None
    return float(binary_auroc(torch.from_numpy(p), torch.from_numpy(y.astype(np.int64)), thresholds=None))


def _per_label(preds: Predictions) -> tuple[np.ndarray, np.ndarray]:
    check_finite(preds)
    return preds.y_true(), preds.y_prob()


def _mean_defined(values: list[float | None]) -> float | None:
    defined = [v for v in values if v is not None]
    return float(np.mean(defined)) if defined else None


# --------------------------------------------------------------------------- AUC


def auc_rows(stats: LinearStats, y: np.ndarray, p: np.ndarray, mask: np.ndarray | None = None):
    """Register the rows of a weighted rank AUC of ``p`` for labels ``y`` over ``mask``; returns
    ``finalize(sums) -> [b]`` (NaN where a resample holds one class)."""
    valid = ~np.isnan(y)
    if mask is not None:
        valid &= mask
    pos = valid & (y == 1)
    neg = valid & (y == 0)
    n_pos, n_neg = int(pos.sum()), int(neg.sum())
    if n_pos == 0 or n_neg == 0:
        return lambda sums: np.full(sums.shape[1], np.nan)
    # the smaller class defines the groups; with negatives as the query class, scores are negated
    if n_pos <= n_neg:
        query, ref, score = pos, neg, p
    else:
        query, ref, score = neg, pos, -p
    groups = np.unique(score[query])
    k = groups.size
    n = y.shape[0]
    q_row = np.full(n, -1, np.int64)
    q_row[query] = np.searchsorted(groups, score[query])
    g = np.searchsorted(groups, score, side="left")
    at = np.minimum(g, k - 1)
    tied = ref & (g < k) & (groups[at] == score)
    before = ref & (g < k) & ~tied
    b_row = np.where(before, g, -1)
    t_row = np.where(tied, g, -1)
    q0 = stats.add_rows(q_row, k)
    b0 = stats.add_rows(b_row, k)
    has_ties = bool(tied.any())
    t0 = stats.add_rows(t_row, k) if has_ties else -1
    r_total = stats.add_sum(ref)

    def finalize(sums: np.ndarray) -> np.ndarray:
        q = sums[q0 : q0 + k]
        below = sums[b0 : b0 + k]
        if has_ties:
            t = sums[t0 : t0 + k]
            cum = np.cumsum(below + t, axis=0)
            num = np.einsum("gb,gb->b", q, cum - 0.5 * t)
        else:
            num = np.einsum("gb,gb->b", q, np.cumsum(below, axis=0))
        return ratio(num, q.sum(0) * sums[r_total])

    return finalize


def _auc_linear(preds: Predictions, config, stats: LinearStats):
    y, p = _per_label(preds)
    finals = [auc_rows(stats, y[:, k], p[:, k]) for k in range(len(preds.label_names))]
    detail = preds.task_type != "binary"

    def finalize(sums: np.ndarray) -> dict[str, np.ndarray]:
        per = [f(sums) for f in finals]
        out = {"auc": mean_defined(per)}
        if detail:
            out.update({f"auc/{name}": v for name, v in zip(preds.label_names, per)})
        return out

    return finalize


@register_metric("auc", linear=_auc_linear)
def auc(preds: Predictions) -> dict[str, float | None]:
    y, p = _per_label(preds)
    per = {name: binary_auc(y[:, k], p[:, k]) for k, name in enumerate(preds.label_names)}
    out: dict[str, float | None] = {"auc": _mean_defined(list(per.values()))}
    if preds.task_type != "binary":
        out.update({f"auc/{name}": v for name, v in per.items()})
    return out


# --------------------------------------------------------------------------- accuracy


def decisions_at_half(p: np.ndarray) -> np.ndarray:
    """The accuracy metric's decision: positive when ``p > 0.5`` (torchmetrics' rule)."""
    return p > 0.5


def top1_correct(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(labelled rows, top-1 correct) of a multiclass table."""
    keep = ~np.isnan(y).any(1)
    correct = np.zeros(y.shape[0], dtype=bool)
    correct[keep] = p[keep].argmax(1) == y[keep].argmax(1)
    return keep, correct


def accuracy_rows(stats: LinearStats, preds: Predictions, mask: np.ndarray | None = None):
    """Rows of the task's accuracy over ``mask``; returns ``finalize(sums) -> {name: [b]}``."""
    y, p = _per_label(preds)
    n = y.shape[0]
    mask = np.ones(n, dtype=bool) if mask is None else mask
    if preds.task_type == "multiclass":
        keep, correct = top1_correct(y, p)
        keep &= mask
        c = stats.add_sum(keep & correct)
        t = stats.add_sum(keep)
        return lambda sums: {"accuracy": ratio(sums[c], sums[t])}
    rows = []
    for k in range(len(preds.label_names)):
        keep = ~np.isnan(y[:, k]) & mask
        correct = decisions_at_half(p[:, k]) == (y[:, k] == 1)
        rows.append((stats.add_sum(keep & correct), stats.add_sum(keep)))
    detail = preds.task_type == "multilabel"

    def finalize(sums: np.ndarray) -> dict[str, np.ndarray]:
        per = [ratio(sums[c], sums[t]) for c, t in rows]
        out = {"accuracy": mean_defined(per)}
        if detail:
            out.update({f"accuracy/{name}": v for name, v in zip(preds.label_names, per)})
        return out

    return finalize


@register_metric("accuracy", linear=lambda preds, config, stats: accuracy_rows(stats, preds))
def accuracy(preds: Predictions) -> dict[str, float | None]:
    import torch
    from torchmetrics.functional.classification import binary_accuracy

    y, p = _per_label(preds)
    if preds.task_type == "multiclass":
        keep = ~np.isnan(y).any(1)
        if not keep.any():
            return {"accuracy": None}
        return {"accuracy": float((p[keep].argmax(1) == y[keep].argmax(1)).mean())}
    per = {}
    for k, name in enumerate(preds.label_names):
        keep = ~np.isnan(y[:, k])
        per[name] = (float(binary_accuracy(torch.from_numpy(p[keep, k]), torch.from_numpy(y[keep, k].astype(np.int64)),
                                           threshold=0.5)) if keep.any() else None)
    out: dict[str, float | None] = {"accuracy": _mean_defined(list(per.values()))}
    if preds.task_type == "multilabel":
        out.update({f"accuracy/{name}": v for name, v in per.items()})
    return out
