"""The run store: one folder per run, written so that a partial run never looks complete.

Layout under the output folder::

    runs/<task>/<backbone>/<init>-seed<k>[-<variant>]-<key>/     (variant e.g. freeze-head)
        config.json          what defines the run (resolved task spec, backbone, plan, ...)
        predictions/val.parquet, test.parquet, ood-<target>.parquet  (+ .json sidecars)
        history.json         training loss, lr and validation curve
        metrics.json         scores computed from the predictions
        similarity.json/.png per-layer similarity initial vs fine-tuned (only with --similarity)
        result.json          written last: the run is complete iff it exists with status "ok"
    leaderboard.json

``<key>`` is a hash of everything that determines the run's numbers (task
hash, data fingerprint, backbone, init, weights, seed, schedule cap, engine
settings, medbench version), so changing any of them makes a new run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medbench.utils import atomic_write_json

RESULT = "result.json"
CONFIG = "config.json"
METRICS = "metrics.json"
HISTORY = "history.json"
PREDICTIONS = "predictions"


def safe_name(name: str) -> str:
    return name.replace("/", "--").replace(":", "-")


@dataclass(frozen=True)
class RunDir:
    path: Path

    @property
    def predictions(self) -> Path:
        return self.path / PREDICTIONS

    def prediction_file(self, name: str) -> Path:
        return self.predictions / f"{safe_name(name)}.parquet"

    def write_json(self, name: str, obj: Any) -> None:
        atomic_write_json(self.path / name, obj)

    def read_json(self, name: str) -> Any:
        return json.loads((self.path / name).read_text())

    def result(self) -> dict | None:
        p = self.path / RESULT
        if not p.is_file():
            return None
        try:
            return json.loads(p.read_text())
        except (OSError, ValueError):
            return None

    @property
    def complete(self) -> bool:
        r = self.result()
        return bool(r and r.get("status") == "ok")


class RunStore:
    def __init__(self, out_dir: Path):
        self.out = Path(out_dir)

    def run_dir(self, task: str, backbone: str, init: str, seed: int, key: str, variant: str = "") -> RunDir:
        leaf = f"{safe_name(init)}-seed{seed}{('-' + safe_name(variant)) if variant else ''}-{key[:10]}"
        return RunDir(self.out / "runs" / safe_name(task) / safe_name(backbone) / leaf)

    def leaderboard_path(self) -> Path:
        return self.out / "leaderboard.json"

    def completed(self) -> list[RunDir]:
        return [RunDir(p.parent) for p in sorted((self.out / "runs").glob(f"*/*/*/{RESULT}")) if RunDir(p.parent).complete]


def find_run_dirs(paths: list[Path]) -> list[RunDir]:
    """Complete runs under each path (a run folder or any folder above run folders)."""
    out: list[RunDir] = []
    for p in paths:
        p = Path(p)
        if (p / RESULT).is_file():
            candidates = [RunDir(p)]
        else:
            candidates = [RunDir(r.parent) for r in sorted(p.rglob(RESULT))]
        out.extend(c for c in candidates if c.complete)
    seen: set[Path] = set()
    unique = []
    for r in out:
        if r.path.resolve() not in seen:
            seen.add(r.path.resolve())
            unique.append(r)
    return unique
