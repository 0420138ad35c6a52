"""Scores computed from per-sample predictions: a registry of metrics, each defined once.

A metric is registered with :func:`register_metric` in one of two forms (see
:mod:`medbench.scoring.registry`): as linear statistics (``linear=True``: a
builder ``(preds, config, stats) -> finalizer`` whose finalizer at unit weights
is the point value and on resample weights the bootstrap replicates), or as a
function ``fn(preds[, config]) -> {name: value}`` evaluated on the scored set
and on each resample's rows. Either way point and replicates come from one
definition; libraries (scikit-learn, netcal, fairlearn) are oracles in tests,
never a second production path. A metric returns its headline value under its
own name (``auc``) and may add detail keys (``auc/Edema``). ``None`` means
undefined (e.g. AUC of a label with one class in the test set), never a silent
0. A task's ``metrics:`` list names the metrics to compute. The definitions are
documented in docs/metrics.md.

The axes (calibration, fairness, shift, convergence, data efficiency) are one
module each in this package; :mod:`medbench.scoring.checks` records warnings;
:mod:`medbench.store.scores` scores a run folder.
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
from medbench.scoring.version import SCORING_VERSION

__all__ = ["SCORING_VERSION", "MetricDef", "check_metrics", "compute_metrics", "get_metric", "higher_is_better",
           "metric_names", "register_metric"]
