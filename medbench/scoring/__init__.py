"""Scores computed from per-sample predictions: a registry of metric functions.

A metric is one function ``fn(preds: Predictions) -> dict[str, float | None]``
registered with :func:`register_metric`. It returns its headline value under
its own name (``auc``) and may add detail keys (``auc/Edema``). ``None`` means
undefined (e.g. AUC of a label with one class in the test set), never a
silent 0. A task's ``metrics:`` list names the functions to run.
"""

from __future__ import annotations

from typing import Callable

from medbench.errors import SpecError
from medbench.predictions import Predictions
from medbench.utils import did_you_mean

MetricFn = Callable[[Predictions], dict[str, "float | None"]]
_METRICS: dict[str, tuple[MetricFn, tuple[str, ...], bool]] = {}


def register_metric(name: str, *, task_types: tuple[str, ...] = ("binary", "multiclass", "multilabel"),
                    higher_is_better: bool = True) -> Callable[[MetricFn], MetricFn]:
    def deco(fn: MetricFn) -> MetricFn:
        _METRICS[name] = (fn, task_types, higher_is_better)
        return fn

    return deco


def _load() -> None:
    import medbench.scoring.classification  # noqa: F401


def metric_names() -> list[str]:
    _load()
    return sorted(_METRICS)


def higher_is_better(name: str) -> bool:
    _load()
    base = name.split("/")[0]
    return _METRICS[base][2] if base in _METRICS else True


def check_metrics(names: list[str], task_type: str, *, where: str | None = None) -> None:
    _load()
    for n in names:
        if n not in _METRICS:
            raise SpecError(f"unknown metric {n!r}{did_you_mean(n, list(_METRICS))}; expected one of: "
                            f"{', '.join(sorted(_METRICS))}", where=where, field="metrics")
        if task_type not in _METRICS[n][1]:
            raise SpecError(f"metric {n!r} does not apply to {task_type} tasks", where=where, field="metrics")


def compute_metrics(preds: Predictions, names: list[str]) -> dict[str, float | None]:
    """Every named metric on ``preds``, flattened into one mapping."""
    _load()
    out: dict[str, float | None] = {}
    for n in names:
        out.update(_METRICS[n][0](preds))
    return out
