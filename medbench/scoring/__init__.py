"""Scores computed from per-sample predictions: a registry of metric functions.

A metric is one function ``fn(preds: Predictions) -> dict[str, float | None]``
(optionally ``fn(preds, config)`` to read the task's :class:`ScoringSpec`)
registered with :func:`register_metric`. It returns its headline value under
its own name (``auc``) and may add detail keys (``auc/Edema``). ``None`` means
undefined (e.g. AUC of a label with one class in the test set), never a
silent 0. A task's ``metrics:`` list names the functions to run.

A metric may also declare ``linear=builder``: its scores as finalizers of
linear statistics (see :mod:`medbench.scoring.bootstrap`), which gives its
bootstrap replicates in one vectorized pass. A metric without one is
bootstrapped by a per-resample loop.

The axes (calibration, fairness, shift, convergence, data efficiency) are one
module each in this package; :mod:`medbench.store.scores` scores a run folder.
"""

from medbench.scoring import calibration, classification  # noqa: E402,F401  (they register the metrics)
from medbench.scoring.registry import (
    MetricDef,
    check_metrics,
    compute_metrics,
    get_metric,
    higher_is_better,
    metric_names,
    register_metric,
)

__all__ = ["MetricDef", "check_metrics", "compute_metrics", "get_metric", "higher_is_better", "metric_names",
           "register_metric"]
