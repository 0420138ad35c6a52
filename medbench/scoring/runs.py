"""Scoring a run folder from its saved predictions (also ``medbench score RUN_DIR``)."""

from __future__ import annotations

from medbench.predictions import Predictions
from medbench.results import CONFIG, METRICS, RunDir
from medbench.scoring import compute_metrics


def score_run(run: RunDir) -> dict:
    """Scores of every prediction file of ``run``: ``{"test": {...}, "val": {...}, "ood": {name: {...}}}``."""
    config = run.read_json(CONFIG)
    metrics = config["task_spec"]["metrics"]
    out: dict = {"test": {}, "val": {}, "ood": {}}
    for split in ("test", "val"):
        path = run.prediction_file(split)
        if path.is_file():
            out[split] = compute_metrics(Predictions.load(path), metrics)
    for target in config.get("ood_targets", []):
        path = run.prediction_file(f"ood-{target['name']}")
        if path.is_file():
            ood_metrics = [m for m in metrics if m in ("auc", "accuracy")] or metrics
            scores = compute_metrics(Predictions.load(path), ood_metrics)
            out["ood"][target["name"]] = scores
    return out


def rescore(run: RunDir) -> dict:
    scores = score_run(run)
    run.write_json(METRICS, scores)
    return scores
