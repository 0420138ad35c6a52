"""The metric registry: one definition per metric (see :mod:`medbench.scoring`).

Filled by the modules that define metrics (:mod:`medbench.scoring.classification`,
:mod:`medbench.scoring.calibration`, plug-ins calling :func:`register_metric`);
the package imports those modules, so importing :mod:`medbench.scoring` fills it.

A metric is registered in one of two forms, and each form is the metric's only
definition:

* ``linear=True``: the decorated function is a *builder*
  ``builder(preds, config, stats) -> finalizer`` registering weighted sums in a
  :class:`~medbench.scoring.bootstrap.LinearStats`; the point value is the
  finalizer at unit weights and replicate ``b`` is the same finalizer on
  resample ``b``'s weights;
* otherwise the decorated function ``fn(preds[, config]) -> {name: value}``
  gives the point value on the scored set and each replicate on a resample's
  rows (a per-resample loop: slower, the same function).

:func:`compute_metrics` and :func:`metric_builders` are the one path every
scope takes (test, validation, OOD targets, subgroups, the in-distribution side
of a shift); libraries (scikit-learn, netcal, fairlearn) are oracles in tests.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

import numpy as np

from medbench.errors import SpecError
from medbench.predictions import Predictions
from medbench.scoring.bootstrap import INTERVAL_RULES, Resampling, evaluate, per_resample_loop
from medbench.spec import ScoringSpec
from medbench.utils import did_you_mean

MetricFn = Callable[..., "dict[str, float | None]"]
#: ``builder(preds, config, stats) -> finalizer``; see :mod:`medbench.scoring.bootstrap`
LinearBuilder = Callable[..., Callable]


@dataclass(frozen=True)
class MetricDef:
    name: str
    fn: Callable  # the builder (linear) or the point function (per-resample loop)
    task_types: tuple[str, ...]
    higher_is_better: bool
    linear: bool
    takes_config: bool
    #: how its bootstrap interval is formed (:func:`medbench.scoring.bootstrap.interval`)
    interval: str = "percentile"

    def builder(self, preds: Predictions, config: ScoringSpec | None = None, prefix: tuple = ()):
        """``stats -> finalizer`` of a linear metric, its keys prefixed with ``prefix`` when given."""
        if not self.linear:
            raise TypeError(f"metric {self.name!r} has no linear form")
        cfg = config or ScoringSpec()

        def build(stats):
            f = self.fn(preds, cfg, stats)
            if not prefix:
                return f
            return lambda sums: {(*prefix, k): v for k, v in f(sums).items()}

        return build

    def point_fn(self, config: ScoringSpec | None = None) -> Callable[[Predictions], dict]:
        """``preds -> {name: value}``: the metric's values on a set of predictions."""
        return lambda preds: self(preds, config)

    def __call__(self, preds: Predictions, config: ScoringSpec | None = None) -> dict[str, float | None]:
        if self.linear:
            return evaluate(len(preds), [self.builder(preds, config)], None).point
        return self.fn(preds, config or ScoringSpec()) if self.takes_config else self.fn(preds)


_METRICS: dict[str, MetricDef] = {}


def register_metric(name: str, *, task_types: tuple[str, ...] = ("binary", "multiclass", "multilabel"),
                    higher_is_better: bool = True, linear: bool = False, interval: str = "percentile"
                    ) -> Callable[[Callable], Callable]:
    """Register a metric: with ``linear=True`` the decorated function is its builder
    ``(preds, config, stats) -> finalizer``, else ``fn(preds[, config]) -> {name: value}`` (see the module
    docstring). ``interval``: ``percentile`` or ``bias_corrected`` (for upward-biased estimators)."""
    if interval not in INTERVAL_RULES:
        raise ValueError(f"interval must be one of {INTERVAL_RULES}, got {interval!r}")

    def deco(fn: Callable) -> Callable:
        takes_config = len(inspect.signature(fn).parameters) >= 2
        _METRICS[name] = MetricDef(name, fn, task_types, higher_is_better, bool(linear), takes_config, interval)
        return fn

    return deco


def metric_names() -> list[str]:
    return sorted(_METRICS)


def get_metric(name: str) -> MetricDef:
    return _METRICS[name]


def higher_is_better(name: str) -> bool:
    base = name.split("/")[0]
    return _METRICS[base].higher_is_better if base in _METRICS else True


def interval_rule(path: tuple | str) -> str:
    """The interval rule of the value at ``path`` (its last part names the metric, e.g. ``ece/Edema``)."""
    last = path if isinstance(path, str) else str(path[-1])
    base = last.split("/")[0]
    return _METRICS[base].interval if base in _METRICS else "percentile"


def check_metrics(names: list[str], task_type: str, *, where: str | None = None) -> None:
    for n in names:
        if n not in _METRICS:
            raise SpecError(f"unknown metric {n!r}{did_you_mean(n, list(_METRICS))}; expected one of: "
                            f"{', '.join(sorted(_METRICS))}", where=where, field="metrics")
        if task_type not in _METRICS[n].task_types:
            raise SpecError(f"metric {n!r} does not apply to {task_type} tasks", where=where, field="metrics")


def metric_builders(preds: Predictions, names: list[str], config: ScoringSpec | None = None, prefix: tuple = ()
                    ) -> tuple[list, list[MetricDef]]:
    """(builders of the linear metrics, the metrics bootstrapped by a loop) among ``names``."""
    builders, loops = [], []
    for n in names:
        d = _METRICS[n]
        if d.linear:
            builders.append(d.builder(preds, config, prefix))
        else:
            loops.append(d)
    return builders, loops


def loop_values(preds: Predictions, loops: list[MetricDef], config: ScoringSpec | None, resampling: Resampling | None,
                prefix: tuple = ()) -> tuple[dict, dict]:
    """(point values, replicates) of metrics without a linear form: the function on the scored set and on
    each resample's rows."""
    point: dict = {}
    reps: dict = {}
    for d in loops:
        point.update({(*prefix, k) if prefix else k: v for k, v in d(preds, config).items()})
        if resampling is not None and resampling.n_resamples:
            for k, v in per_resample_loop(preds, d.point_fn(config), resampling).items():
                reps[(*prefix, k) if prefix else k] = np.asarray(v, dtype=np.float64)
    return point, reps


def compute_metrics(preds: Predictions, names: list[str], config: ScoringSpec | None = None) -> dict[str, float | None]:
    """Every named metric on ``preds``, flattened into one mapping (the point values of the one definition)."""
    out: dict[str, float | None] = {}
    for n in names:
        out.update(_METRICS[n](preds, config))
    return out
