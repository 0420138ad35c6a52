"""Distribution shift: a model scored on other datasets/sites (the task's ``ood:`` targets).

Per target and metric: the target value, the in-distribution value, and the
drop. The in-distribution value is recomputed on the target's labels only
(the label map may cover a subset; multiclass: the softmax over the subset's
logits, i.e. the probabilities renormalized over it, as the runner saves the
target's predictions), so both sides score the same question; in-distribution
rows whose class is outside the subset are then not labelled and left out
(never scored as class 0, see :mod:`medbench.predictions`). Both sides are
computed by the metrics' one definition (:func:`medbench.scoring.compute_metrics`
and the same finalizers for the replicates).

``drop`` is signed so that positive means worse on the target
(``in_distribution - target`` for higher-is-better metrics), and
``relative_drop = drop / in_distribution``: the share of the in-distribution
*value* that is lost. It is **not adjusted for chance**: an AUC falling from
0.60 to 0.55 is a relative drop of 8 %, though it loses half of the skill
above chance (0.5); compare relative drops between tasks with that in mind
(docs/metrics.md). Intervals: the test and target sets are resampled
independently, so replicate ``b`` of the drop is the difference of replicate
``b`` of each side.
"""

from __future__ import annotations

import numpy as np

from medbench.predictions import Predictions
from medbench.scoring.registry import compute_metrics, higher_is_better, metric_builders
from medbench.spec import ScoringSpec


def restrict_labels(preds: Predictions, labels: list[str]) -> Predictions:
    """``preds`` on a subset of its labels (multiclass: the softmax over the subset; rows of other classes
    are then not labelled)."""
    return preds.select_labels(labels)


def shift_metrics(metrics: list[str]) -> list[str]:
    """Metrics compared across the shift: AUC and accuracy when the task has them."""
    return [m for m in metrics if m in ("auc", "accuracy")] or list(metrics)


def shift_axis(test: Predictions, targets: dict[str, tuple[Predictions, dict, dict]], metrics: list[str],
               config: ScoringSpec):
    """(values, test-scope builders, loops). ``targets``: name -> (target predictions, target point scores,
    runner record). Values per target: ``{"task", "labels", "n", <metric>: {in_distribution, target,
    drop, relative_drop}}``. ``loops``: ``(path prefix, in-distribution predictions, metrics)`` of the
    metrics without a linear form, whose replicates are a per-resample loop on the test resamples."""
    values: dict = {}
    builders = []
    loops = []
    for name, (tpreds, tscores, record) in targets.items():
        labels = list(tpreds.label_names)
        id_preds = restrict_labels(test, labels)
        id_scores = compute_metrics(id_preds, metrics, config)
        entry: dict = {"task": record.get("task"), "labels": labels, "n": len(tpreds)}
        for m in metrics:
            i, t = id_scores.get(m), tscores.get(m)
            drop = None if i is None or t is None else ((i - t) if higher_is_better(m) else (t - i))
            entry[m] = {"in_distribution": i, "target": t, "drop": drop,
                        "relative_drop": drop / i if drop is not None and i else None}
        values[name] = entry
        linear, looped = metric_builders(id_preds, metrics, config)
        builders.append(_id_builder(name, linear, metrics))
        if looped:
            loops.append((("shift", name), id_preds, looped))
    return values, builders, loops


def _id_builder(name: str, linear: list, metrics: list[str]):
    """The in-distribution side's replicates: the metrics' own builders, keys moved under ``shift.<name>``."""
    def build(stats):
        finals = [b(stats) for b in linear]

        def finalize(sums):
            out = {}
            for f in finals:
                for k, v in f(sums).items():
                    if k in metrics:
                        out[("shift", name, k, "in_distribution")] = v
            return out

        return finalize

    return build


def drop_replicates(replicates: dict[tuple, np.ndarray], values: dict) -> dict[tuple, np.ndarray]:
    """Replicates of target, drop and relative drop from the in-distribution and target replicates."""
    out = {}
    for name, entry in values.items():
        for m, v in entry.items():
            if not isinstance(v, dict):
                continue
            i = replicates.get(("shift", name, m, "in_distribution"))
            t = replicates.get(("ood", name, m))
            if i is None or t is None or i.shape != t.shape:
                continue
            out[("shift", name, m, "target")] = t
            drop = (i - t) if higher_is_better(m) else (t - i)
            out[("shift", name, m, "drop")] = drop
            with np.errstate(divide="ignore", invalid="ignore"):
                out[("shift", name, m, "relative_drop")] = np.where(i != 0, drop / i, np.nan)
    return out
