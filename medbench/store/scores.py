"""Scoring a run folder from its saved predictions and history (also ``medbench score RUN_DIR``).

Writes, next to the predictions:

* ``metrics.json``: ``test`` / ``val`` / ``ood`` scores (the task's metrics),
  the axes ``calibration``, ``fairness``, ``shift``, ``convergence``, and
  ``ci`` — a tree parallel to the values holding each bootstrap interval
  (``ci.test.auc``, ``ci.fairness.attributes.sex.gap.auc``, ...) — plus the
  effective ``scoring`` settings (with ``scoring_version``, see
  :mod:`medbench.scoring.version`) and how each scope was resampled,
  ``labels`` (rows scored and left out per split) and ``warnings``
  (:mod:`medbench.scoring.checks`);
* ``bootstrap.parquet``: the replicates themselves, one column per value
  (named by the JSON list of its path in ``metrics.json``), one row per
  resample. Resamples depend only on the scored set and the bootstrap seed,
  so the leaderboard averages replicates over seeds and compares backbones
  pairwise from these files, without predictions;
* ``calibration/reliability-test.png``.

Every point value is its metric's one definition (:mod:`medbench.scoring.registry`):
the test scope's values come from the same evaluation that computes their
replicates. :func:`rescore_outdated` re-scores runs whose ``metrics.json`` was
written by another scoring version (``medbench run`` reusing a run,
``medbench leaderboard``, ``medbench paired``).

Nothing is written until every score is computed: predictions that are
missing (the test and validation predictions, each OOD target the run
recorded, and every file ``result.json`` recorded) or damaged, or that
differ from what the run recorded, are one
:class:`~medbench.errors.IntegrityError` line naming the file, and the
run's ``metrics.json`` stays as it was. A complete run's ``result.json`` then
takes the new scores and the digests of its files
(:meth:`~medbench.store.rundir.RunDir.record_rescore`), so the leaderboard
can tell a re-score (``medbench score`` or :func:`rescore_outdated`, both
through :func:`rescore`) from an edit.
"""

from __future__ import annotations

import io
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from medbench.predictions import Predictions
from medbench.scoring import compute_metrics, higher_is_better
from medbench.scoring.bootstrap import Resampling, evaluate, interval
from medbench.scoring.registry import interval_rule, loop_values, metric_builders
from medbench.scoring.version import SCORING_VERSION
from medbench.spec import AttributeSpec, ScoringSpec
from medbench.store import CONFIG, HISTORY, METRICS, RunDir
from medbench.utils import atomic_write_bytes, parse_json

BOOTSTRAP = "bootstrap.parquet"
RELIABILITY = "calibration/reliability-test.png"


def scoring_config(task_spec: dict, overrides: dict | None = None) -> ScoringSpec:
    """The task's scoring settings with command-line overrides on top (validated)."""
    from pydantic import ValidationError

    from medbench.errors import UsageError

    try:
        return ScoringSpec.model_validate({**task_spec.get("scoring", {}), **(overrides or {})})
    except ValidationError as err:
        e = err.errors()[0]
        raise UsageError(e["msg"], field="scoring." + ".".join(map(str, e["loc"]))) from None


def load_predictions(run: RunDir, name: str, *, required: bool = False) -> Predictions | None:
    """The run's predictions ``name`` (``test``, ``val``, ``ood-<target>``), checked against what
    ``result.json`` recorded; None when absent and neither ``required`` nor recorded."""
    from medbench.errors import IntegrityError
    from medbench.scoring.classification import check_finite

    path = run.prediction_file(name)
    rel = path.relative_to(run.path).as_posix()
    recorded = run.recorded_digests() or {}
    if not path.is_file():
        if required or rel in recorded:
            raise IntegrityError("predictions are missing; the run wrote them when it trained, and every score is "
                                 "computed from them: restore the folder, or delete the run folder and rerun the "
                                 "same command to train it again (nothing was rewritten)", where=path)
        return None
    sidecar = path.with_suffix(".json").relative_to(run.path).as_posix()
    preds = Predictions.parse(run.read_bytes(rel), run.read_bytes(sidecar), where=path)
    check_finite(preds, where=str(path))
    return preds


def _set(tree: dict, path: tuple, value) -> None:
    node = tree
    for p in path[:-1]:
        node = node.setdefault(p, {})
    node[path[-1]] = value


def _get(tree: dict, path: tuple):
    node = tree
    for p in path:
        if not isinstance(node, dict) or p not in node:
            return None
        node = node[p]
    return node


def _task_spec(run: RunDir, config: object) -> dict:
    """The task spec a run's ``config.json`` recorded, validated (a damaged one names the field)."""
    from pydantic import ValidationError

    from medbench.errors import IntegrityError
    from medbench.spec import TaskSpec

    spec = config.get("task_spec") if isinstance(config, dict) else None
    if not isinstance(spec, dict):
        raise IntegrityError("no task_spec mapping; expected the config.json medbench wrote", where=run.path / CONFIG,
                             field="task_spec")
    try:
        TaskSpec.model_validate(spec)
    except ValidationError as err:
        first = err.errors()[0]
        raise IntegrityError(f"{first['msg']}; expected the config.json medbench wrote", where=run.path / CONFIG,
                             field="task_spec." + ".".join(map(str, first["loc"]))) from None
    return spec


def _expects_val(config: dict) -> bool:
    n = ((config.get("data") or {}).get("n") or {}).get("val")
    return isinstance(n, int) and n > 0


def _ordered(values: dict, metrics: list[str]) -> dict:
    """A scope's values in the order of the task's metrics (each metric's keys together)."""
    out = {}
    for m in metrics:
        out.update({k: v for k, v in values.items() if k == m or k.startswith(m + "/")})
    out.update({k: v for k, v in values.items() if k not in out})
    return out


def score_scope(preds: Predictions, metrics: list[str], cfg: ScoringSpec, resampling: Resampling | None,
                prefix: tuple, extra_builders: list | None = None) -> tuple[dict, dict[tuple, np.ndarray]]:
    """(point values by path, replicates by path) of a scope: the metrics' builders (and ``extra_builders``
    of the axes) in one evaluation, plus the per-resample loops of metrics without a linear form."""
    builders, loops = metric_builders(preds, metrics, cfg, prefix)
    ev = evaluate(len(preds), builders + list(extra_builders or []), resampling)
    point, reps = dict(ev.point), dict(ev.replicates)
    lp, lr = loop_values(preds, loops, cfg, resampling, prefix)
    point.update(lp)
    reps.update(lr)
    return point, reps


def score_run(run: RunDir, overrides: dict | None = None, *, images: dict[str, bytes] | None = None
              ) -> tuple[dict, dict[tuple, np.ndarray]]:
    """(metrics.json content, replicates by value path) of ``run``; nothing is written. ``images`` (when
    given) receives the figures to write: relative path -> PNG bytes. The OOD scopes, the reliability diagram
    and the fairness point values are computed in a side thread beside the test scope (independent parts: the
    same numbers in any scheduling)."""
    import medbench
    from medbench.scoring.calibration import calibration_axis
    from medbench.scoring.checks import score_warnings
    from medbench.scoring.convergence import convergence
    from medbench.scoring.fairness import fairness_axis
    from medbench.scoring.shift import drop_replicates, shift_axis, shift_metrics

    config = run.read_json(CONFIG)
    spec = _task_spec(run, config)
    cfg = scoring_config(spec, overrides)
    metrics = list(spec["metrics"])
    headline = spec.get("headline", metrics[0])
    attributes = [AttributeSpec.model_validate(a) for a in spec.get("attributes", [])]
    test = load_predictions(run, "test", required=True)
    val = load_predictions(run, "val", required=_expects_val(config))
    out: dict = {"scoring": {**cfg.model_dump(mode="json"), "scoring_version": SCORING_VERSION,
                             "medbench_version": medbench.__version__, "resampling": {}},
                 "test": {}, "val": {}, "ood": {}, "labels": {}}
    replicates: dict[tuple, np.ndarray] = {}
    loaded: dict[str, Predictions] = {}
    if val is not None:
        out["val"] = compute_metrics(val, metrics, cfg)
        out["labels"]["val"] = val.label_counts()
        loaded["val"] = val

    ood_targets: dict[str, tuple] = {}
    ood_metrics = shift_metrics(metrics)
    # Independent parts run in one side thread while the main thread prepares and scores the test scope: each
    # OOD target's scope, the reliability diagram, the fairness point values. Every part computes alone what it computes in turn (no
    # shared state), so the numbers cannot depend on the scheduling; numpy and scipy release the GIL in their
    # loops, which lets the two cores work at once.
    side = ThreadPoolExecutor(1)
    try:
        pending = []
        for record in config.get("ood_targets", []):
            name = record["name"]
            preds = load_predictions(run, f"ood-{name}", required=not record.get("skipped"))
            if preds is None:
                continue
            res = Resampling.of(preds, n_resamples=cfg.bootstrap, seed=cfg.bootstrap_seed, scope=f"ood:{name}") \
                if cfg.bootstrap else None
            pending.append((name, preds, record, res,
                            side.submit(score_scope, preds, ood_metrics, cfg, res, ("ood", name))))
            out["labels"].setdefault("ood", {})[name] = preds.label_counts()
            loaded[f"ood-{name}"] = preds

        def ood_scores() -> None:
            for name, preds, record, res, scored in pending:
                point, reps = scored.result()
                out["ood"][name] = _ordered({k[2]: v for k, v in point.items()}, ood_metrics)
                replicates.update(reps)
                if res is not None:
                    out["scoring"]["resampling"][f"ood:{name}"] = res.describe()
                ood_targets[name] = (preds, out["ood"][name], record)

        if test is None:
            ood_scores()
        else:
            loaded["test"] = test
            out["labels"]["test"] = test.label_counts()
            cal_values, builders, calibrated = calibration_axis(test, val, cfg)
            out["calibration"] = cal_values
            png = side.submit(_reliability, test, calibrated, cfg, config)
            fair_values, fair_builders = fairness_axis(test, val, attributes, cfg, defer=True)
            if fair_values is not None:
                out["fairness"] = None  # its place among the axes; the point values are computed beside
                fair_values = side.submit(fair_values)
                builders += fair_builders
            ood_scores()
            shift_loops: list = []
            if ood_targets:
                shift_values, shift_builders, shift_loops = shift_axis(test, ood_targets, ood_metrics, cfg)
                out["shift"] = shift_values
                builders += shift_builders
            res = Resampling.of(test, n_resamples=cfg.bootstrap, seed=cfg.bootstrap_seed, scope="test") \
                if cfg.bootstrap else None
            point, reps = score_scope(test, metrics, cfg, res, ("test",), builders)
            out["test"] = _ordered({k[1]: v for k, v in point.items() if k[0] == "test"}, metrics)
            replicates.update(reps)
            for prefix, id_preds, loops in shift_loops:  # in-distribution side of metrics without a linear form
                _, lr = loop_values(id_preds, loops, cfg, res)
                replicates.update({(*prefix, k, "in_distribution"): v for k, v in lr.items()})
            if res is not None:
                out["scoring"]["resampling"]["test"] = res.describe()
            if "shift" in out:
                replicates.update(drop_replicates(replicates, out["shift"]))
            if fair_values is not None:
                out["fairness"] = fair_values.result()
            png = png.result()
            if png:
                out["calibration"]["reliability_diagram"] = RELIABILITY
                if images is not None:
                    images[RELIABILITY] = png
    finally:
        side.shutdown(wait=True, cancel_futures=True)

    has_history = (run.path / HISTORY).is_file()
    if has_history:
        out["convergence"] = convergence(run.read_json(HISTORY), headline, higher_is_better(headline))

    # keep replicates of values that exist; intervals in a tree parallel to the values
    kept = {}
    ci: dict = {}
    for path, reps in replicates.items():
        value = _get(out, path)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            kept[path] = reps
            c = interval(reps, cfg.ci_level, rule=interval_rule(path), point=float(value))
            if c is not None:
                _set(ci, path, c)
    out["ci"] = ci
    out = _plain(out)
    out["warnings"] = score_warnings(out, loaded, headline=headline, ood_records=config.get("ood_targets", []),
                                     has_history=has_history)
    return out, kept


def _plain(obj):
    """JSON-ready: numpy scalars to Python numbers, non-finite floats to None (undefined)."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


def _reliability(test: Predictions, calibrated: Predictions, cfg: ScoringSpec, config: dict) -> bytes | None:
    from medbench.scoring.calibration import reliability_png

    if len(test) == 0:
        return None
    title = f"{config.get('task')} · {config.get('backbone')} · {config.get('init')} · seed {config.get('seed')} (test)"
    return reliability_png(test, calibrated, cfg, title)


def column_name(path: tuple) -> str:
    return json.dumps(list(path))


def write_replicates(path: Path, replicates: dict[tuple, np.ndarray]) -> None:
    import polars as pl

    cols = {column_name(k): pl.Series(np.asarray(v, dtype=np.float64)) for k, v in sorted(replicates.items(),
                                                                                          key=lambda kv: str(kv[0]))}
    lengths = {len(v) for v in cols.values()}
    if len(lengths) > 1:  # scopes of different sizes cannot happen (one bootstrap count), guard anyway
        raise ValueError(f"replicate columns of different lengths: {sorted(lengths)}")
    buf = io.BytesIO()
    pl.DataFrame(cols).write_parquet(buf)
    atomic_write_bytes(path, buf.getvalue())


def read_replicates(run: RunDir) -> dict[tuple, np.ndarray]:
    """Replicates of a scored run by value path (empty when the run has none); checked against what
    ``result.json`` recorded, a damaged file is one line naming it."""
    import polars as pl

    from medbench.errors import IntegrityError

    path = run.path / BOOTSTRAP
    if not path.is_file() and BOOTSTRAP not in (run.recorded_digests() or {}):
        return {}
    data = run.read_bytes(BOOTSTRAP)
    try:
        df = pl.read_parquet(io.BytesIO(data))
        out = {tuple(json.loads(c)): df[c].cast(pl.Float64).to_numpy() for c in df.columns}
    except Exception as err:  # damaged parquet, or a column name that is not a JSON path
        detail = " ".join(str(err).split()[:20])
        raise IntegrityError(f"not readable bootstrap replicates ({type(err).__name__}: {detail}); rerun "
                             f"'medbench score {run.path}' to recompute them", where=path) from None
    return out


def rescore(run: RunDir, overrides: dict | None = None) -> dict:
    """Score ``run`` from its predictions and write ``bootstrap.parquet``, the figures and ``metrics.json``,
    then (for a complete run) record the new scores and digests in ``result.json``. Nothing is written
    when anything it reads is missing, damaged or changed since the run recorded it."""
    from medbench.provenance import now_utc

    images: dict[str, bytes] = {}
    scores, replicates = score_run(run, overrides, images=images)
    write_replicates(run.path / BOOTSTRAP, replicates)
    for rel, data in images.items():
        atomic_write_bytes(run.path / rel, data)
    run.write_json(METRICS, scores)
    if run.complete:
        run.record_rescore(scores, now_utc())
    return scores


def scoring_version_of(run: RunDir) -> int | None:
    """The scoring version of a run's ``metrics.json``: 0 when it predates versioning, None without the file
    (or when it cannot be read: re-scoring it then reads it through :meth:`RunDir.read_json`, which names
    an edited or damaged file)."""
    from medbench.errors import IntegrityError

    path = run.path / METRICS
    if not path.is_file():
        return None
    try:
        metrics = parse_json(path.read_bytes(), where=path)
        scoring = (metrics.get("scoring") if isinstance(metrics, dict) else None) or {}
        version = scoring.get("scoring_version", 0) if isinstance(scoring, dict) else None
        return version if isinstance(version, int) and not isinstance(version, bool) else None
    except (OSError, IntegrityError):
        return None


def recorded_settings(run: RunDir) -> dict:
    """The scoring settings a run was last scored with (``medbench score`` options are kept on re-scoring);
    none for a run never scored. A ``metrics.json`` edited or damaged since ``result.json`` recorded it is
    an :class:`~medbench.errors.IntegrityError` naming it (a re-score never launders an edit)."""
    if not (run.path / METRICS).is_file() and METRICS not in (run.recorded_digests() or {}):
        return {}
    metrics = run.read_json(METRICS)
    scoring = (metrics.get("scoring") if isinstance(metrics, dict) else None) or {}
    if not isinstance(scoring, dict):
        return {}
    return {k: v for k, v in scoring.items() if k in ScoringSpec.model_fields}


def rescore_outdated(runs: list[RunDir], message=None) -> list[RunDir]:
    """Re-score, from their saved predictions, the runs whose ``metrics.json`` was written by another scoring
    version (or is missing), keeping the settings they were scored with; ``message(text)`` reports each one.
    Returns the runs re-scored."""
    from medbench.errors import DataError

    done = []
    for run in runs:
        version = scoring_version_of(run)
        if version == SCORING_VERSION:
            continue
        if not run.prediction_file("test").is_file():
            raise DataError(f"scored by scoring version {version}, this medbench scores with version "
                            f"{SCORING_VERSION}, and its predictions are missing, so it cannot be re-scored",
                            where=str(run.path), field="predictions/test.parquet")
        rescore(run, recorded_settings(run))
        done.append(run)
        if message is not None:
            was = "never scored" if version is None else f"scoring version {version}"
            message(f"{run.path}: re-scored from its saved predictions ({was} -> {SCORING_VERSION})")
    return done
