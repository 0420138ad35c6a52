"""Accuracy and AUC, per label and aggregated, through torchmetrics.

* binary: AUC of the positive class; accuracy at probability 0.5.
* multilabel: AUC per label on the images where that label is present (not
  missing), ``auc`` = mean over labels whose AUC is defined (CJ21's mean AUC);
  accuracy per label at 0.5, ``accuracy`` = their mean.
* multiclass: top-1 accuracy; ``auc`` = macro one-vs-rest AUC.

A label whose test set holds one class only has AUC ``None`` (undefined).
"""

from __future__ import annotations

import numpy as np
import torch
from torchmetrics.functional.classification import binary_accuracy, binary_auroc

from medbench.predictions import Predictions
from medbench.scoring import register_metric


def _check_finite(prob: np.ndarray) -> None:
    if not np.isfinite(prob).all():
        from medbench.errors import MedbenchError

        raise MedbenchError(f"{int((~np.isfinite(prob)).sum())} predictions are NaN or infinite; scores are undefined",
                            field="predictions")


def binary_auc(y: np.ndarray, p: np.ndarray) -> float | None:
    """AUC of scores ``p`` for 0/1 labels ``y`` (NaN labels dropped); None when one class only."""
    keep = ~np.isnan(y)
    y, p = y[keep], p[keep]
    if y.size == 0 or y.min() == y.max():
        return None
    return float(binary_auroc(torch.from_numpy(p), torch.from_numpy(y.astype(np.int64)), thresholds=None))


def _per_label(preds: Predictions) -> tuple[np.ndarray, np.ndarray]:
    y, p = preds.y_true(), preds.y_prob()
    _check_finite(p)
    return y, p


def _mean_defined(values: list[float | None]) -> float | None:
    defined = [v for v in values if v is not None]
    return float(np.mean(defined)) if defined else None


@register_metric("auc")
def auc(preds: Predictions) -> dict[str, float | None]:
    y, p = _per_label(preds)
    per = {name: binary_auc(y[:, k], p[:, k]) for k, name in enumerate(preds.label_names)}
    out: dict[str, float | None] = {"auc": _mean_defined(list(per.values()))}
    if preds.task_type != "binary":
        out.update({f"auc/{name}": v for name, v in per.items()})
    return out


@register_metric("accuracy")
def accuracy(preds: Predictions) -> dict[str, float | None]:
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
