"""Distribution shift: a model scored on other datasets/sites (the task's ``ood:`` targets).

Per target and metric: the target value, the in-distribution value, and the
drop. The in-distribution value is recomputed on the target's labels only
(the label map may cover a subset; multiclass probabilities are renormalized
over it as the runner does for the target), so both sides score the same
question. ``drop`` is signed so that positive means worse on the target
(``in_distribution - target`` for higher-is-better metrics), and
``relative_drop = drop / in_distribution``. Intervals: the test and target
sets are resampled independently, so replicate ``b`` of the drop is the
difference of replicate ``b`` of each side.
"""

from __future__ import annotations

import numpy as np

from medbench.predictions import Predictions, prob_column
from medbench.scoring.registry import compute_metrics, get_metric, higher_is_better
from medbench.spec import ScoringSpec


def restrict_labels(preds: Predictions, labels: list[str]) -> Predictions:
    """``preds`` on a subset of its labels (multiclass: probabilities renormalized over the subset)."""
    if list(labels) == list(preds.label_names):
        return preds
    from medbench.data.base import label_column

    p = preds.table.select([prob_column(n) for n in labels]).to_numpy().astype(np.float64)
    if preds.task_type == "multiclass":
        p = p / p.sum(1, keepdims=True)
    keep = [c for c in preds.table.columns if not (c.startswith("prob:") or c.startswith("label:"))]
    table = preds.table.select(keep + [label_column(n) for n in labels]).with_columns(
        **{prob_column(n): p[:, k] for k, n in enumerate(labels)})
    return Predictions(table, list(labels), preds.task_type)


def shift_metrics(metrics: list[str]) -> list[str]:
    """Metrics compared across the shift: AUC and accuracy when the task has them."""
    return [m for m in metrics if m in ("auc", "accuracy")] or list(metrics)


def shift_axis(test: Predictions, targets: dict[str, tuple[Predictions, dict, dict]], metrics: list[str],
               config: ScoringSpec):
    """(values, test-scope builders). ``targets``: name -> (target predictions, target point scores,
    runner record). Values per target: ``{"task", "labels", "n", <metric>: {in_distribution, target,
    drop, relative_drop}}``."""
    values: dict = {}
    builders = []
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
        builders.append(_id_builder(name, id_preds, metrics, config))
    return values, builders


def _id_builder(name: str, id_preds: Predictions, metrics: list[str], config: ScoringSpec):
    def build(stats):
        finals = [get_metric(m).linear(id_preds, config, stats) for m in metrics if get_metric(m).linear]

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
