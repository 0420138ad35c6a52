"""The scoring axes of runs aggregated into leaderboard blocks (called by :mod:`medbench.board.aggregate`).

Reads only what scoring wrote (``metrics.json``, ``bootstrap.parquet``) and
run metadata (``result.json``, ``config.json``), never predictions.

Every number with uncertainty becomes a *summary*: ``mean``, ``std``
(ddof=1, over seeds), ``n``, ``values`` and ``seeds`` (per seed), and
``ci`` — the percentile interval of the **seed mean** over test resamples
(``low``, ``high``, ``se``, ``n_undefined``, ``level``): replicate ``b`` of
every seed scores the same resample, so averaging replicates over seeds and
taking percentiles gives the test-sampling uncertainty of the mean. ``std``
is the training (seed) noise; ``ci`` the test-set noise. Sizes and settings
equal in every seed (``n``, ``bins``, ``total_steps``, ... see
``COUNT_KEYS``) stay plain numbers; labels and names stay strings (or
``{"values", "seeds"}`` when they differ between seeds, e.g. a worst group).
When the runs were scored with different settings, ``scoring`` holds
``{"mixed": [...]}`` and no pooled intervals are given.

Blocks per entry: ``calibration``, ``fairness`` (per-label detail left in
``metrics.json``), ``shift``, ``convergence`` (with the mean validation
curve), ``data_efficiency`` and ``resolution`` (from variant runs), and with
a baseline backbone ``relative_to_baseline``; ``replicates``, the seed-mean test-resample replicates the
paired regression gate needs (:mod:`medbench.board.replicates`). Board level: ``shift_matrix``
(trained on x evaluated on, per backbone) and ``baseline``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from medbench.store import CONFIG, RunDir

SKIP_IN_BOARD = {"per_label", "curve", "reliability_diagram"}
#: sizes and settings, the same in every seed: kept as plain numbers (every measured number is a summary)
COUNT_KEYS = {"n", "n_pos", "n_neg", "bins", "min_group_size", "total_steps", "eval_every", "n_scored_groups",
              "min_val_images", "min_val_per_class", "t_min", "t_max"}


# --------------------------------------------------------------------------- run records


@dataclass
class RunRecord:
    run: RunDir
    result: dict
    metrics: dict
    _reps: dict | None = None
    _config: dict | None = None

    @classmethod
    def load(cls, run: RunDir) -> "RunRecord | None":
        result = run.result()
        if not result:
            return None
        return cls(run, result, run.scores())

    @property
    def seed(self) -> int:
        return int(self.result["seed"])

    @property
    def variant(self) -> dict | None:
        return self.result.get("variant")

    @property
    def scoring(self) -> dict | None:
        return self.metrics.get("scoring")

    def replicates(self) -> dict[tuple, np.ndarray]:
        if self._reps is None:
            from medbench.store.scores import read_replicates

            self._reps = read_replicates(self.run)
        return self._reps

    def config(self) -> dict:
        if self._config is None:
            self._config = self.run.read_json(CONFIG) if (self.run.path / CONFIG).is_file() else {}
        return self._config


def get_path(tree: Any, path: tuple) -> Any:
    node = tree
    for p in path:
        if not isinstance(node, dict) or p not in node:
            return None
        node = node[p]
    return node


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# --------------------------------------------------------------------------- seed aggregation


class SeedAggregate:
    """The runs of one entry (or one variant point): summaries with seed-mean intervals."""

    def __init__(self, records: list[RunRecord]):
        self.records = sorted(records, key=lambda r: r.seed)
        self.seeds = [r.seed for r in self.records]
        settings = {json.dumps(r.scoring, sort_keys=True) for r in self.records}
        first = self.records[0].scoring if self.records else None
        self.scoring = first if len(settings) == 1 else None
        self.level = (first or {}).get("ci_level", 0.95)
        self.aligned = self.scoring is not None and bool(self.scoring.get("resampling"))

    def replicates(self, path: tuple) -> np.ndarray | None:
        """Seed-mean replicates at ``path`` (None unless every run has them, resampled alike)."""
        if not self.aligned:
            return None
        reps = [r.replicates().get(path) for r in self.records]
        if any(x is None for x in reps) or len({len(x) for x in reps}) != 1:
            return None
        return np.mean(np.vstack(reps), axis=0)

    def interval(self, path: tuple, point: float | None = None) -> dict | None:
        """The interval of the seed mean at ``path`` (the value's interval rule; ``point`` is the seed mean,
        which the bias-corrected rule of ECE/MCE centres on)."""
        from medbench.scoring.bootstrap import interval
        from medbench.scoring.registry import interval_rule

        reps = self.replicates(path)
        if reps is None:
            return None
        ci = interval(reps, self.level, rule=interval_rule(path), point=point)
        return {**ci, "level": self.level} if ci else None

    def summary(self, path: tuple, values: list | None = None) -> dict:
        from medbench.board.summary import summarize

        if values is None:
            values = [get_path(r.metrics, path) for r in self.records]
        s = summarize([v if _is_number(v) else None for v in values])
        s["seeds"] = self.seeds
        # the seed mean over runs that all define the value (as the replicates, averaged over every seed)
        s["ci"] = self.interval(path, s["mean"] if s["n"] == len(self.records) else None)
        return s

    def tree(self, path: tuple, skip: set[str] = SKIP_IN_BOARD) -> Any:
        values = [get_path(r.metrics, path) for r in self.records]
        present = [v for v in values if v is not None]
        if not present:
            return None
        if all(isinstance(v, dict) for v in present):
            keys: list = []
            for v in present:
                keys.extend(k for k in v if k not in keys)
            return {k: self.tree((*path, k), skip) for k in keys if k not in skip}  # undefined stays None
        if all(_is_number(v) for v in present):
            if path[-1] in COUNT_KEYS and len(present) == len(values) and len(set(present)) == 1:
                return present[0]
            return self.summary(path, values)
        if len(present) == len(values) and all(v == present[0] for v in present):
            return present[0]
        return {"values": values, "seeds": self.seeds}


def mean_curve(agg: SeedAggregate) -> dict | None:
    curves = [get_path(r.metrics, ("convergence", "curve")) for r in agg.records]
    curves = [c for c in curves if c]
    if not curves or len({tuple(c["step"]) for c in curves}) != 1:
        return None
    vals = np.array([[np.nan if v is None else v for v in c["value"]] for c in curves], dtype=np.float64)
    with np.errstate(all="ignore"):
        std = np.nanstd(vals, axis=0, ddof=1) if vals.shape[0] > 1 else np.full(vals.shape[1], np.nan)
        mean = np.nanmean(vals, axis=0)
    clean = lambda a: [None if not math.isfinite(x) else float(x) for x in a]  # noqa: E731
    return {"step": curves[0]["step"], "mean": clean(mean), "std": clean(std)}


# --------------------------------------------------------------------------- entries


@dataclass
class EntryContext:
    task: str
    backbone: str
    init: str
    headline: str
    plain: SeedAggregate
    variants: dict[tuple[str, Any], SeedAggregate] = field(default_factory=dict)


def _seed_mean(s: dict, agg: SeedAggregate) -> float | None:
    """A summary's mean when every seed defines the value (the point the bias-corrected interval centres on)."""
    return s.get("mean") if s.get("n") == len(agg.records) else None


def attach_intervals(entry: dict, agg: SeedAggregate) -> None:
    """Seed-mean intervals on the entry's test and OOD metric summaries."""
    for metric, s in entry.get("metrics", {}).items():
        s["ci"] = agg.interval(("test", metric), _seed_mean(s, agg))
    for target, scores in entry.get("ood", {}).items():
        for metric, s in scores.items():
            s["ci"] = agg.interval(("ood", target, metric), _seed_mean(s, agg))
    if entry.get("headline", {}).get("metric") in entry.get("metrics", {}):
        entry["headline"]["ci"] = entry["metrics"][entry["headline"]["metric"]]["ci"]


def entry_warnings(records: list[RunRecord]) -> list[dict]:
    """The warnings of an entry's runs, one per (code, subject, variant): the seeds that raised it and its
    message (the seeds' messages joined when they differ)."""
    merged: dict[tuple, dict] = {}
    for r in sorted(records, key=lambda r: (json.dumps(r.variant, sort_keys=True) if r.variant else "", r.seed)):
        variant = None
        if r.variant:
            variant = f"{r.variant.get('kind')}={r.variant.get('value')}"
        for w in r.metrics.get("warnings") or []:
            key = (w.get("code"), w.get("subject"), variant)
            m = merged.setdefault(key, {"code": w.get("code"), "subject": w.get("subject"),
                                        **({"variant": variant} if variant else {}), "seeds": [], "messages": []})
            m["seeds"].append(r.seed)
            m["messages"].append(w.get("message", ""))
    out = []
    for m in merged.values():
        msgs = m.pop("messages")
        seeds = m["seeds"]
        m["message"] = msgs[0] if len(set(msgs)) == 1 else "; ".join(f"seed {s}: {t}" for s, t in zip(seeds, msgs))
        out.append(m)
    return out


def axes_blocks(agg: SeedAggregate) -> dict:
    settings = [r.scoring for r in agg.records]
    out: dict = {"scoring": agg.scoring if agg.scoring is not None or not any(settings) else {"mixed": settings}}
    for axis in ("calibration", "fairness", "shift", "convergence"):
        block = agg.tree((axis,))
        if block is not None:
            out[axis] = block
    if "calibration" in out:
        out["calibration"]["reliability_diagrams"] = [
            str(r.run.path / r.metrics["calibration"]["reliability_diagram"]) for r in agg.records
            if r.metrics.get("calibration", {}).get("reliability_diagram")]
    if "convergence" in out:
        out["convergence"]["curve"] = mean_curve(agg)
    for attr in ((out.get("fairness") or {}).get("attributes") or {}).values():
        if isinstance(attr, dict) and "groups" not in attr:  # unavailable (no such column in the predictions):
            attr["groups"] = {}                               # reported with its status and reason, no groups
    return out


def _top_metrics(agg: SeedAggregate) -> dict:
    keys: list[str] = []
    for r in agg.records:
        keys.extend(k for k in r.metrics.get("test", {}) if "/" not in k and k not in keys)
    return {k: agg.summary(("test", k)) for k in keys}


def _point(agg: SeedAggregate, x_name: str, x: Any, extra: dict | None = None) -> dict:
    return {x_name: x, **(extra or {}), "seeds": agg.seeds, "metrics": _top_metrics(agg)}


def efficiency_block(ctx: EntryContext) -> dict | None:
    from medbench.scoring.efficiency import normalized_area

    out: dict = {}
    for kind, x_name in (("fraction", "fraction"), ("shots", "shots")):
        points = {value: agg for (k, value), agg in ctx.variants.items() if k == kind}
        if not points:
            continue
        if kind == "fraction" and ctx.plain.records:
            points[1.0] = ctx.plain
        xs = sorted(points)
        rows = []
        for x in xs:
            agg = points[x]
            n_train = [(r.variant or {}).get("n_train", r.config().get("data", {}).get("n", {}).get("train"))
                       for r in agg.records]
            rows.append(_point(agg, x_name, x, {"n_train": agg.summary(("_n_train",), n_train)}))
        curve = {"metric": ctx.headline, "x": x_name, "points": rows}
        if kind == "shots" and ctx.plain.records:
            curve["full_data"] = _point(ctx.plain, "n_train", None)
        curve["area"] = _area_summary(ctx.headline, xs, [points[x] for x in xs], normalized_area)
        out[kind] = curve
    return out or None


def _area_summary(metric: str, xs: list, aggs: list[SeedAggregate], area_fn) -> dict | None:
    from medbench.board.summary import summarize
    from medbench.scoring.bootstrap import interval

    if len(xs) < 2:
        return None
    common = sorted(set.intersection(*[set(a.seeds) for a in aggs]))
    per_seed = []
    for s in common:
        ys = [get_path(next(r for r in a.records if r.seed == s).metrics, ("test", metric)) for a in aggs]
        per_seed.append(None if any(y is None for y in ys) else area_fn(xs, np.asarray(ys, dtype=np.float64)))
    out = summarize(per_seed)
    out["seeds"] = common
    reps = [a.replicates(("test", metric)) for a in aggs]
    out["ci"] = None
    if all(r is not None for r in reps) and len({len(r) for r in reps}) == 1:
        ci = interval(area_fn(xs, np.vstack(reps)), aggs[0].level)
        out["ci"] = {**ci, "level": aggs[0].level} if ci else None
    return out


def resolution_block(ctx: EntryContext) -> dict | None:
    from medbench.scoring.paired import paired_difference

    points = {value: agg for (k, value), agg in ctx.variants.items() if k == "resolution"}
    if not points:
        return None
    default_crop = None
    if ctx.plain.records:
        default_crop = ctx.plain.records[0].config().get("input", {}).get("crop")
        if default_crop is not None:
            points.setdefault(default_crop, ctx.plain)
    path = ("test", ctx.headline)
    rows = []
    for crop in sorted(points):
        agg = points[crop]
        resize = [(r.variant or {}).get("resize", r.config().get("input", {}).get("resize")) for r in agg.records]
        row = _point(agg, "crop", crop, {"resize": resize[0] if len(set(resize)) == 1 else resize,
                                         "default": crop == default_crop})
        if default_crop is not None and crop != default_crop:
            a = agg.summary(path)
            b = ctx.plain.summary(path)
            row["relative_to_default"] = paired_difference(
                a["mean"], agg.replicates(path), b["mean"], ctx.plain.replicates(path), level=agg.level,
                higher_is_better=_hib(ctx.headline))
        rows.append(row)
    return {"metric": ctx.headline, "default_crop": default_crop, "points": rows}


def _hib(metric: str) -> bool:
    from medbench.scoring import higher_is_better

    return higher_is_better(metric)


def relative_block(ctx: EntryContext, base: EntryContext) -> dict:
    """This entry against the baseline backbone's entry of the same task (paired where possible)."""
    from medbench.scoring.efficiency import normalized_area
    from medbench.scoring.paired import paired_difference

    path = ("test", ctx.headline)
    out: dict = {"backbone": base.backbone, "init": base.init, "metric": ctx.headline}

    def compare(a: SeedAggregate, b: SeedAggregate, p: tuple) -> dict:
        sa, sb = a.summary(p), b.summary(p)
        res = paired_difference(sa["mean"], a.replicates(p), sb["mean"], b.replicates(p), level=a.level,
                                higher_is_better=_hib(p[-1] if p[0] != "test" else p[1]))
        res["ratio"] = sa["mean"] / sb["mean"] if sa["mean"] is not None and sb["mean"] else None
        return res

    if ctx.plain.records and base.plain.records:
        out["headline"] = compare(ctx.plain, base.plain, path)
        conv = {}
        for key in ("steps_to_95", "steps_to_99"):
            a = ctx.plain.summary(("convergence", key))["mean"]
            b = base.plain.summary(("convergence", key))["mean"]
            conv[key] = {"a": a, "b": b, "ratio": a / b if a is not None and b else None}
        out["convergence"] = conv
    for kind in ("fraction", "shots"):
        mine = {v: agg for (k, v), agg in ctx.variants.items() if k == kind}
        theirs = {v: agg for (k, v), agg in base.variants.items() if k == kind}
        if kind == "fraction":
            if ctx.plain.records:
                mine[1.0] = ctx.plain
            if base.plain.records:
                theirs[1.0] = base.plain
        xs = sorted(set(mine) & set(theirs))
        if not xs:
            continue
        points = [{"x": x, **compare(mine[x], theirs[x], path)} for x in xs]
        block: dict = {"x": kind, "points": points}
        if len(xs) >= 2:
            a_pts = [mine[x].summary(path)["mean"] for x in xs]
            b_pts = [theirs[x].summary(path)["mean"] for x in xs]
            if None not in a_pts and None not in b_pts:
                area_a = normalized_area(xs, np.asarray(a_pts))
                area_b = normalized_area(xs, np.asarray(b_pts))
                ra = [mine[x].replicates(path) for x in xs]
                rb = [theirs[x].replicates(path) for x in xs]
                reps_ok = all(r is not None for r in ra + rb) and len({len(r) for r in ra + rb}) == 1
                block["area"] = paired_difference(
                    area_a, normalized_area(xs, np.vstack(ra)) if reps_ok else None,
                    area_b, normalized_area(xs, np.vstack(rb)) if reps_ok else None,
                    level=ctx.plain.level, higher_is_better=_hib(ctx.headline))
                block["area"]["ratio"] = area_a / area_b if area_b else None
        out["fraction_curve" if kind == "fraction" else "shots_curve"] = block
    mine = {v: agg for (k, v), agg in ctx.variants.items() if k == "resolution"}
    theirs = {v: agg for (k, v), agg in base.variants.items() if k == "resolution"}
    shared = sorted(set(mine) & set(theirs))
    if shared:
        out["resolution"] = [{"crop": c, **compare(mine[c], theirs[c], path)} for c in shared]
    return out


# --------------------------------------------------------------------------- suite level


def shift_matrix(entries: list[dict]) -> list[dict]:
    """Per backbone x init (x regime x protocol): trained on (rows) x evaluated on (columns), the headline metric."""
    out: dict[tuple, dict] = {}
    from medbench.board.schema import entry_key

    for e in entries:
        shift = e.get("shift")
        if not shift:
            continue
        _, _, _, regime, protocol = entry_key(e)
        m = out.setdefault((e["backbone"], e["init"], regime, protocol),
                           {"backbone": e["backbone"], "init": e["init"], **({"regime": regime} if regime else {}),
                            "protocol": protocol, "rows": [], "columns": [], "cells": []})
        metric = e["headline"]["metric"]
        m["rows"].append(e["task"])
        if e["task"] not in m["columns"]:
            m["columns"].append(e["task"])
        m["cells"].append({"trained_on": e["task"], "evaluated_on": e["task"], "target": None, "metric": metric,
                           "value": {k: v for k, v in e["headline"].items() if k != "metric"}})
        for name, block in shift.items():
            cell_metric = metric if metric in block else next((k for k, v in block.items() if isinstance(v, dict)
                                                               and "drop" in v), None)
            if cell_metric is None:
                continue
            evaluated = block.get("task") or name
            if evaluated not in m["columns"]:
                m["columns"].append(evaluated)
            b = block[cell_metric]
            m["cells"].append({"trained_on": e["task"], "evaluated_on": evaluated, "target": name,
                               "metric": cell_metric, "value": b.get("target"),
                               "in_distribution": b.get("in_distribution"), "drop": b.get("drop"),
                               "relative_drop": b.get("relative_drop")})
    return list(out.values())


def first_record(ctx: EntryContext) -> RunRecord:
    if ctx.plain.records:
        return ctx.plain.records[0]
    return next(iter(ctx.variants.values())).records[0]


def enrich(entries: list[dict], runs: list[RunDir], baseline: tuple[str, str | None] | None = None) -> dict:
    """Add every axis block to ``entries`` (in place); returns the board-level blocks. Entries are keyed by
    :func:`medbench.board.schema.entry_key`; a baseline backbone is compared with entries of its protocol."""
    from medbench.board.replicates import replicates_block
    from medbench.board.schema import entry_key
    from medbench.errors import UsageError

    records = [r for r in (RunRecord.load(run) for run in runs) if r is not None]
    contexts: dict[tuple, EntryContext] = {}
    groups: dict[tuple, list[RunRecord]] = {}
    variant_groups: dict[tuple, dict[tuple, list[RunRecord]]] = {}
    for r in records:
        key = entry_key(r.result)
        v = r.variant
        if v:
            variant_groups.setdefault(key, {}).setdefault((v["kind"], v["value"]), []).append(r)
        else:
            groups.setdefault(key, []).append(r)
    for key in sorted(set(groups) | set(variant_groups)):
        plain = SeedAggregate(groups.get(key, []))
        first = (groups.get(key) or next(iter(variant_groups[key].values())))[0]
        contexts[key] = EntryContext(*key[:3], headline=first.result["headline"]["metric"], plain=plain,
                                     variants={vk: SeedAggregate(rs) for vk, rs in
                                               sorted(variant_groups.get(key, {}).items())})
    base_key = None
    if baseline is not None:
        cands = sorted({(b, i) for (_, b, i, regime, _p) in contexts
                        if not regime and b == baseline[0] and baseline[1] in (None, i)})
        if not cands:
            raise UsageError(f"baseline backbone {baseline[0]!r} has no runs among these", field="--baseline")
        if len(cands) > 1:
            raise UsageError(f"baseline {baseline[0]!r} has runs with several inits ({', '.join(i for _, i in cands)}); "
                             f"name one as BACKBONE@INIT", field="--baseline")
        base_key = cands[0]
    by_key = {entry_key(e): e for e in entries}
    for key, ctx in contexts.items():
        entry = by_key.get(key)
        if entry is None:  # variant runs only: an entry without plain runs
            prov = first_record(ctx).result.get("provenance", {})
            entry = {"task": key[0], "backbone": key[1], "init": key[2], **({"regime": key[3]} if key[3] else {}),
                     "protocol": key[4], "headline": {"metric": ctx.headline}, "metrics": {}, "ood": {}, "seeds": [], "runs": [],
                     "provenance": {k: prov.get(k) for k in ("task_version", "task_hash", "data_fingerprint", "model",
                                                             "device", "engine", "medbench_version", "git_sha",
                                                             "libraries")}}
            entries.append(entry)
            by_key[key] = entry
        if ctx.plain.records:
            attach_intervals(entry, ctx.plain)
            entry.update(axes_blocks(ctx.plain))
            reps = replicates_block(entry, ctx.plain)  # what the paired regression gate needs
            if reps is not None:
                entry["replicates"] = reps
        eff = efficiency_block(ctx)
        if eff:
            entry["data_efficiency"] = eff
        res = resolution_block(ctx)
        if res:
            entry["resolution"] = res
        entry["variant_runs"] = sorted(str(r.run.path) for aggs in ctx.variants.values() for r in aggs.records)
        entry["warnings"] = entry_warnings(ctx.plain.records + [r for a in ctx.variants.values() for r in a.records])
        base = (key[0], *base_key, "", key[4]) if base_key is not None else None
        if base is not None and key != base and base in contexts:
            entry["relative_to_baseline"] = relative_block(ctx, contexts[base])
    entries.sort(key=entry_key)
    return {"baseline": {"backbone": base_key[0], "init": base_key[1]} if base_key else None,
            "shift_matrix": shift_matrix(entries)}
