"""Run folders with generated predictions (no training), for testing scoring, the leaderboard and paired tests.

Predictions come from a known model: a score z = strength * (2y - 1) + noise, turned into its Bayes
posterior (calibrated) and then sharpened by ``overconfidence`` (miscalibration); the signal is weaker for
female patients (a subgroup gap) and on the OOD target.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl

from medbench.data.base import label_column
from medbench.predictions import Predictions
from medbench.spec.catalog import Catalog
from medbench.store import CONFIG, HISTORY, RESULT, RunDir, RunStore


def make_table(n: int, labels: list[str], task_type: str, seed: int, *, images_per_patient: int = 2,
               prefix: str = "A") -> pl.DataFrame:
    rng = np.random.default_rng([seed, 11])
    patients = np.arange(n) // images_per_patient
    n_pat = patients.max() + 1
    sex = rng.choice(np.array(["M", "F"]), n_pat)[patients]
    age = rng.integers(18, 90, n_pat)[patients].astype(float)
    if task_type == "multiclass":
        cls = rng.integers(0, len(labels), n)
        y = np.eye(len(labels))[cls]
    else:
        y = (rng.random((n, len(labels))) < 0.35).astype(float)
    cols = {
        "sample_id": [f"{prefix}{i:05d}" for i in range(n)],
        "patient_id": [f"{prefix}p{p:05d}" for p in patients],
        "split": ["test"] * n,
        "sex": sex.tolist(),
        "age": age,
        "view": rng.choice(np.array(["PA", "AP"]), n).tolist(),
        "site": [f"site-{prefix}"] * n,
    }
    table = pl.DataFrame(cols)
    return table.with_columns(**{label_column(lab): pl.Series(y[:, k].astype(np.int8)) for k, lab in enumerate(labels)})


def make_probs(table: pl.DataFrame, labels: list[str], task_type: str, seed: int, *, strength: float = 1.5,
               female_strength: float = 0.6, overconfidence: float = 1.0, noise: float = 1.0) -> np.ndarray:
    rng = np.random.default_rng([seed, 13])
    y = table.select([label_column(lab) for lab in labels]).to_numpy().astype(float)
    s = np.where(np.asarray(table["sex"].to_list()) == "F", female_strength, strength)[:, None]
    z = s * (2 * y - 1) + noise * rng.standard_normal(y.shape)
    # the Bayes posterior of y given z (calibrated at overconfidence 1): logit = 2 s z / noise^2 + prior log-odds
    logits = 2 * s * z / noise**2 + (0.0 if task_type == "multiclass" else np.log(0.35 / 0.65))
    logits *= overconfidence
    if task_type == "multiclass":
        z = np.exp(logits - logits.max(1, keepdims=True))
        return z / z.sum(1, keepdims=True)
    return 1.0 / (1.0 + np.exp(-logits))


def task_spec(name: str = "smoke-cxr", **scoring) -> dict:
    spec = Catalog([]).task(name).spec.model_dump(mode="json")
    spec["scoring"].update(scoring)
    return spec


def write_run(out: Path, *, task: str = "smoke-cxr", backbone: str = "fake-a", init: str = "random", seed: int = 0,
              model_seed: int | None = None, n_test: int = 240, n_val: int = 120, n_ood: int = 160,
              strength: float = 1.5, female_strength: float = 0.6, overconfidence: float = 1.0,
              ood_strength: float = 0.7, variant: dict | None = None, spec: dict | None = None,
              history: dict | None = None) -> RunDir:
    """A complete (unscored) run folder under ``out``; score it with ``medbench.store.scores.rescore``."""
    spec = spec or task_spec(task)
    labels, task_type = spec["labels"], spec["type"]
    ms = seed if model_seed is None else model_seed
    suffix = ""
    if variant:
        suffix = {"fraction": f"frac{variant['value'] * 100:g}", "shots": f"shots{variant['value']}",
                  "resolution": f"res{variant['value']}"}[variant["kind"]]
    run = RunStore(out).run_dir(task, backbone, init, seed, f"{backbone}{seed}{suffix}0000000000", variant=suffix)
    run.path.mkdir(parents=True, exist_ok=True)
    test = make_table(n_test, labels, task_type, 1, prefix="T")  # the same test set for every run of the task
    val = make_table(n_val, labels, task_type, 2, prefix="V").with_columns(pl.lit("val").alias("split"))
    ood = make_table(n_ood, labels, task_type, 3, prefix="O")
    for name, table, st, k in (("test", test, strength, 0), ("val", val, strength, 1), ("ood-site-b", ood, ood_strength, 2)):
        probs = make_probs(table, labels, task_type, ms * 10 + k, strength=st, female_strength=female_strength * st / strength,
                           overconfidence=overconfidence)
        Predictions.build(table, probs, labels, task_type).save(run.prediction_file(name))
    history = history or {"step": list(range(80)), "loss": [1.0] * 80, "lr": [0.1] * 80,
                          "val_step": [8, 16, 24, 32, 40, 48, 56, 64, 72, 80],
                          "val_metric": [0.55, 0.62, 0.70, 0.74, 0.77, 0.79, 0.80, 0.805, 0.81, 0.81],
                          "seconds": 1.0, "data_wait_seconds": 0.0}
    config = {"key": run.path.name, "task": task, "task_spec": spec, "backbone": backbone, "init": init, "seed": seed,
              "input": {"resize": 40, "crop": (variant or {}).get("value", 32) if (variant or {}).get("kind") ==
                        "resolution" else 32, "channels": 1},
              "ood_targets": [{"name": "site-b", "task": f"{task}-siteb", "n": n_ood}],
              "variant": variant, "data": {"n": {"train": (variant or {}).get("n_train", 400), "val": n_val,
                                                 "test": n_test}}}
    (run.path / CONFIG).write_text(json.dumps(config))
    (run.path / HISTORY).write_text(json.dumps(history))
    result = {"status": "ok", "key": config["key"], "task": task, "backbone": backbone, "init": init, "seed": seed,
              "variant": variant, "headline": {"metric": spec["headline"], "value": None}, "metrics": {},
              "finished": "2026-01-01T00:00:00Z",
              "provenance": {"task_version": 1, "task_hash": "0" * 64, "data_fingerprint": "f", "model": {},
                             "device": {}, "engine": {}, "medbench_version": "0", "git_sha": None, "libraries": {}}}
    (run.path / RESULT).write_text(json.dumps(result))
    return run
