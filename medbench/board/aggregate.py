"""Aggregating completed runs into leaderboard JSON.

One entry per (task, backbone, init, regime, protocol; regime e.g. ``freeze-head``, absent for full
fine-tuning; protocol ``finetune``, ``linear`` or ``knn``, see :mod:`medbench.probe.protocols`):
every test metric as mean, sample standard deviation (ddof=1) and the per-seed values; the headline metric
named; OOD scores likewise; provenance of the entry. Numbers are stored
unrounded; rounding happens only when rendered.

Scores are read from each run's ``metrics.json`` (rewritten by ``medbench
score``), falling back to ``result.json``. The scoring axes (bootstrap
intervals, calibration, fairness, shift, convergence, data efficiency,
resolution, comparison with a baseline backbone, the suite's shift matrix)
are added by :func:`medbench.board.axes.enrich`; variant runs (training
subsets, resolutions) feed those blocks, not the entry's seeds.

A board never mixes training numerics: every run's ``config.json`` records the
training-numerics version it was trained with (:mod:`medbench.train.numerics`;
absent for runs made before it existed), and :func:`check_numerics` refuses a
set of runs holding two versions, naming a run of each (retrain the older ones
with ``medbench run``). Each entry's ``warnings`` gathers its runs' warnings
(:func:`medbench.board.axes.entry_warnings`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl

from medbench.board.schema import ENTRY_KEY, SCHEMA_NAME, SCHEMA_VERSION
from medbench.board.summary import summarize
from medbench.probe.protocols import protocol_name
from medbench.provenance import code_provenance, now_utc
from medbench.store import RunDir
from medbench.utils import atomic_write_json


def _scores(run: RunDir, result: dict) -> dict:
    """The run's scores: ``metrics.json`` (kept current by ``medbench score``, checked against the digest
    ``result.json`` recorded: a hand-edited file is refused), else ``result.json``'s copy."""
    return run.scores()


def _rows(runs: list[RunDir]) -> pl.DataFrame:
    records = []
    for run in runs:
        r = run.result()
        if not r or r.get("variant"):  # variant runs feed the axes blocks, not the entry's seeds
            continue
        scores_tree = _scores(run, r)
        scopes = {"test": scores_tree.get("test", {})}
        for name, scores in scores_tree.get("ood", {}).items():
            scopes[f"ood:{name}"] = scores
        for scope, scores in scopes.items():
            for metric, value in scores.items():
                records.append({
                    "task": r["task"], "backbone": r["backbone"], "init": r["init"],
                    "regime": r.get("regime", ""), "protocol": protocol_name(r.get("protocol")), "seed": r["seed"],
                    "scope": scope, "metric": metric, "value": value, "run": str(run.path),
                })
    schema = {"task": pl.Utf8, "backbone": pl.Utf8, "init": pl.Utf8, "regime": pl.Utf8, "protocol": pl.Utf8,
              "seed": pl.Int64,
              "scope": pl.Utf8, "metric": pl.Utf8, "value": pl.Float64, "run": pl.Utf8}
    return pl.DataFrame(records, schema=schema)


def _setting(run: RunDir) -> dict[str, Any]:
    """What the seeds pooled into one entry must share: everything in the run key but the seed (the request
    without seed, weights path and similarity option, which do not change the numbers; the weights by
    their sha256), the task hash, the data fingerprint, the training plan and the input geometry."""
    from medbench.store import CONFIG

    config = run.read_json(CONFIG)
    request = {k: v for k, v in (config.get("request") or {}).items() if k not in ("seed", "weights", "similarity")}
    return {"request": request, "task_hash": config.get("task_hash"),
            "data": (config.get("data") or {}).get("fingerprint"), "plan": config.get("plan"),
            "probe": config.get("probe"),
            "input": config.get("input"),
            "weights_sha256": (run.result().get("provenance", {}).get("model") or {}).get("weights_sha256")}


def _first_difference(a: Any, b: Any, path: str = "") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            found = _first_difference(a.get(k), b.get(k), f"{path}.{k}" if path else str(k))
            if found:
                return found
        return None
    return None if a == b else f"{path} ({a!r} vs {b!r})"


def training_numerics(run: RunDir) -> int | None:
    """The training-numerics version a run was trained with (None: before medbench recorded it)."""
    from medbench.store import CONFIG

    try:
        value = run.read_json(CONFIG).get("training_numerics")
    except (OSError, ValueError):
        return None
    return int(value) if value is not None else None


def check_numerics(runs: list[RunDir]) -> None:
    """Refuse runs trained by different training numerics (one line naming a run of each and why)."""
    from medbench.errors import UsageError
    from medbench.train.numerics import TRAINING_NUMERICS

    seen: dict = {}
    for run in runs:
        seen.setdefault(training_numerics(run), run)
    if len(seen) < 2:
        return
    (va, ra), (vb, rb) = sorted(seen.items(), key=lambda kv: -1 if kv[0] is None else kv[0])[:2]
    name = lambda v: "unrecorded (trained before medbench recorded it)" if v is None else str(v)  # noqa: E731
    raise UsageError(f"runs trained by different training numerics cannot share a leaderboard: {ra.path} has "
                     f"version {name(va)}, {rb.path} has {name(vb)} (a code change altered the trained numbers; "
                     f"this medbench trains with version {TRAINING_NUMERICS}); retrain the older runs with "
                     "'medbench run', or pass the folders of one version", field="RUN_DIR")


def check_poolable(name: str, runs: list[RunDir]) -> None:
    """Refuse to pool runs of one entry that are not seeds of one setting: a seed twice, or runs trained
    differently (another ``--max-steps``, engine, weights, task version or data). One line naming both
    run folders; narrow the RUN_DIRs to one setting."""
    from medbench.errors import UsageError

    by_seed: dict[int, RunDir] = {}
    first = runs[0]
    base = _setting(first)
    for run in runs:
        seed = run.result()["seed"]
        if seed in by_seed:
            raise UsageError(f"{name}: seed {seed} has two complete runs, {by_seed[seed].path} and {run.path} "
                             "(other settings or versions); pass the folders of one", field="RUN_DIR")
        by_seed[seed] = run
        diff = _first_difference(base, _setting(run))
        if diff:
            raise UsageError(f"{name}: runs {first.path} and {run.path} differ in {diff}, so they are not seeds "
                             "of one setting; pass the folders of one", field="RUN_DIR")


def build_leaderboard(runs: list[RunDir], baseline: tuple[str, str | None] | None = None) -> dict[str, Any]:
    """Entries of ``runs``; ``baseline`` = (backbone, init or None) adds ``relative_to_baseline`` blocks."""
    check_numerics(runs)
    rows = _rows(runs)
    results = {str(run.path): run.result() for run in runs}
    entries = []
    if rows.height:
        keys = rows.select(*ENTRY_KEY).unique(maintain_order=True).sort(*ENTRY_KEY)
        for task, backbone, init, regime, protocol in keys.iter_rows():
            sub = rows.filter((pl.col("task") == task) & (pl.col("backbone") == backbone) & (pl.col("init") == init)
                              & (pl.col("regime") == regime) & (pl.col("protocol") == protocol))
            seeds = sorted(sub["seed"].unique().to_list())
            run_paths = sorted(sub["run"].unique().to_list())
            check_poolable(" · ".join(x for x in (task, backbone, init, regime, protocol) if x),
                           [RunDir(Path(p)) for p in run_paths])
            first = results[run_paths[0]]
            metrics: dict[str, Any] = {}
            ood: dict[str, Any] = {}
            for (scope, metric), grp in sub.sort("seed").group_by(["scope", "metric"], maintain_order=True):
                summary = summarize(grp["value"].to_list())
                summary["seeds"] = grp["seed"].to_list()
                if scope == "test":
                    metrics[metric] = summary
                else:
                    ood.setdefault(scope.removeprefix("ood:"), {})[metric] = summary
            headline_metric = first["headline"]["metric"]
            prov = first["provenance"]
            entries.append({
                "task": task,
                "backbone": backbone,
                "init": init,
                **({"regime": regime} if regime else {}),  # e.g. freeze-head: never pooled with full fine-tuning
                "protocol": protocol,  # finetune | linear | knn: never pooled with each other
                "headline": {"metric": headline_metric, **metrics.get(headline_metric, summarize([]))},
                "metrics": metrics,
                "ood": ood,
                "seeds": seeds,
                "runs": run_paths,
                "provenance": {
                    "task_version": prov["task_version"],
                    "task_hash": prov["task_hash"],
                    "data_fingerprint": prov["data_fingerprint"],
                    "model": prov["model"],
                    "device": prov["device"],
                    "engine": prov.get("engine"),
                    "medbench_version": prov["medbench_version"],
                    "training_numerics": training_numerics(RunDir(Path(run_paths[0]))),
                    "git_sha": prov["git_sha"],
                    "libraries": prov["libraries"],
                    "finished": max(results[p]["finished"] for p in run_paths),
                },
            })
    from medbench.board.axes import enrich

    extra = enrich(entries, runs, baseline)
    for entry in entries:  # every entry (also one made from variant runs alone) has the same fields
        entry["headline"] = {**summarize([]), "seeds": [], "ci": None, **entry["headline"]}
        entry.setdefault("warnings", [])
        prov = entry["provenance"]
        prov.setdefault("backbone", entry["backbone"])
        prov.setdefault("weights_sha256", (prov.get("model") or {}).get("weights_sha256"))
        prov.setdefault("seeds", entry["seeds"])
        prov.setdefault("date", prov.get("finished"))
    from medbench.board.significance import mark_significance

    significance = mark_significance(entries, runs)
    return {
        "schema": SCHEMA_NAME,
        "schema_version": SCHEMA_VERSION,
        "created": now_utc(),
        "provenance": code_provenance(),
        "entries": entries,
        **extra,
        **({"significance": significance} if significance else {}),
    }


def write_leaderboard(runs: list[RunDir], path: Path, baseline: tuple[str, str | None] | None = None
                      ) -> dict[str, Any]:
    from medbench.board.schema import validate_board

    board = build_leaderboard(runs, baseline)
    validate_board(board, where=f"{path} (as built)")  # what is written always follows the schema
    atomic_write_json(path, board)
    return board
