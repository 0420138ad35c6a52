"""The metric registry: one definition per metric (see :mod:`medbench.scoring`).

Filled by the modules that define metrics (:mod:`medbench.scoring.classification`,
:mod:`medbench.scoring.calibration`, plug-ins calling :func:`register_metric`);
the package imports those modules, so importing :mod:`medbench.scoring` fills it.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

from medbench.errors import SpecError
from medbench.predictions import Predictions
from medbench.spec import ScoringSpec
from medbench.utils import did_you_mean

MetricFn = Callable[..., dict[str, "float | None"]]
#: ``builder(preds, config, stats) -> finalizer``; see :mod:`medbench.scoring.bootstrap`
LinearBuilder = Callable[..., Callable]


@dataclass(frozen=True)
class MetricDef:
    name: str
    fn: MetricFn
    task_types: tuple[str, ...]
    higher_is_better: bool
    linear: LinearBuilder | None
    takes_config: bool

    def __call__(self, preds: Predictions, config: ScoringSpec | None = None) -> dict[str, float | None]:
        return self.fn(preds, config or ScoringSpec()) if self.takes_config else self.fn(preds)


_METRICS: dict[str, MetricDef] = {}


def register_metric(name: str, *, task_types: tuple[str, ...] = ("binary", "multiclass", "multilabel"),
                    higher_is_better: bool = True, linear: LinearBuilder | None = None
                    ) -> Callable[[MetricFn], MetricFn]:
    def deco(fn: MetricFn) -> MetricFn:
        takes_config = len(inspect.signature(fn).parameters) >= 2
        _METRICS[name] = MetricDef(name, fn, task_types, higher_is_better, linear, takes_config)
        return fn

    return deco


def metric_names() -> list[str]:
    return sorted(_METRICS)


def get_metric(name: str) -> MetricDef:
    return _METRICS[name]


def higher_is_better(name: str) -> bool:
    base = name.split("/")[0]
    return _METRICS[base].higher_is_better if base in _METRICS else True


def check_metrics(names: list[str], task_type: str, *, where: str | None = None) -> None:
    for n in names:
        if n not in _METRICS:
            raise SpecError(f"unknown metric {n!r}{did_you_mean(n, list(_METRICS))}; expected one of: "
                            f"{', '.join(sorted(_METRICS))}", where=where, field="metrics")
        if task_type not in _METRICS[n].task_types:
            raise SpecError(f"metric {n!r} does not apply to {task_type} tasks", where=where, field="metrics")


def compute_metrics(preds: Predictions, names: list[str], config: ScoringSpec | None = None) -> dict[str, float | None]:
    """Every named metric on ``preds``, flattened into one mapping."""
    out: dict[str, float | None] = {}
    for n in names:
        out.update(_METRICS[n](preds, config))
    return out
