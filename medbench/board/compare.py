"""``medbench compare BASELINE NEW``: the regression gate between two leaderboards (or two run stores).

**Matching.** Entries are matched on (task, backbone, init, regime, protocol; an entry without a
protocol is fine-tuning); only numbers are compared (provenance,
dates, paths and git revisions differ between runs by design). Compared per matched entry: the headline
(default) and each ``--metric`` (a test metric, ``ood:TARGET:NAME`` for an OOD score). A run store (a folder
of runs, ``medbench run --out``) is aggregated as ``medbench leaderboard`` does (runs scored by another
scoring version are re-scored from their predictions first), so its replicates are computed from the
per-sample predictions on the same test resamples as a board's.

**The paired rule.** With ``b`` the baseline and ``n`` the new summary of a metric, ``sign = +1`` when
higher is better (``-1`` otherwise):

* ``worse_by = sign * (b.mean - n.mean)``, the drop of the seed mean;
* the **paired interval** of ``worse_by``: the percentile interval (the boards' ``ci_level``, 95 %) of
  ``sign * (b*_k - n*_k)`` over test resamples ``k``, where ``b*``/``n*`` are the seed-mean replicates stored
  in each entry (:mod:`medbench.board.replicates`). Both boards scored the *same* test patients on the same
  resamples (equal resampling fingerprints), so test-set noise common to both cancels; a resample undefined
  on either side is left out (``n_undefined``);
* ``tolerance = max(abs_tol, k_seed * seed_se, k_ci * h)`` where ``h`` is the paired interval's half-width
  and ``seed_se`` the standard error of the per-seed differences ``sign * (b_s - n_s)`` over the seeds both
  boards ran (``sd / sqrt(n)``; 0 for one seed): the training noise between the two boards' runs of one
  seed, zero when training is deterministic and the code did not change it;
* **regression** when ``worse_by > tolerance``; ``better`` when ``-worse_by > tolerance``. The row names
  the term that set the tolerance (``abs_tol``, ``seed`` or ``ci``).

A consistent drop (the same on every seed and every resample) has ``seed_se = h = 0``, so it fails exactly
when it exceeds ``abs_tol``: ``abs_tol`` is the gate's resolution, and its default is calibrated on
changes that must not count as regressions (below).

**The unpaired rule** (today's, for rows without what pairing needs: boards made before the paired gate,
published rows, runs scored without a bootstrap, test sets resampled differently, other test data allowed
with ``--allow-changed-data``): ``tolerance = max(abs_tol, k_seed * sqrt(std_b^2/n_b + std_n^2/n_n),
k_ci * sqrt(h_b^2 + h_n^2))`` with ``std`` the seed standard deviation, ``n`` the number of seeds and ``h``
the half-width of each seed mean's test-resampling interval. When the resamples are shared but the seeds
differ (or a seed is undefined on one side), the interval is paired and the seed term is this rule's. Each
row says which rule judged it and why.

**Defaults and what they were set from** (``docs/regression-gate.md`` has the measurements). ``abs_tol``
(``--tolerance``) = :data:`ABS_TOL`, ``k_seed`` = 2, ``k_ci`` = 1. The smoke headlines were measured under
changes that are not regressions, each against ``--threads 1`` on the reference machine: ``--threads 2``,
``ATEN_CPU_CAPABILITY=default`` (torch's scalar kernels), a simulated AVX2 machine
(``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2``), ``--micro-batch 16``
(the same global batch in two accumulation steps) and ``MKL_NUM_THREADS=2 OMP_NUM_THREADS=2`` (no effect:
``--threads`` governs them); the largest drop of a seed mean is below ``abs_tol`` by the margin the
document gives, and a consistent drop of 0.02 fails on every smoke task.

**What is not a number fails**: a NaN or infinite mean, per-seed value or interval bound in either board;
a value (mean or a seed's) defined in the baseline and undefined in the new board; an entry present twice
in either board; a headline metric that changed. Entries missing from NEW fail unless ``--allow-missing``;
added entries are reported and never fail.

**Other test data is a usage error** (exit 2): a matched entry whose task hash or dataset fingerprint
differs between the boards was scored on another test set (or another task definition), which is not a
regression; ``--allow-changed-data`` compares such entries by the unpaired rule instead.

Exit status: 0 pass, 1 regression (or a failure above), 2 usage error (unreadable file, not a leaderboard,
wrong schema version, other test data).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from medbench.board.schema import entry_key
from medbench.errors import UsageError

if TYPE_CHECKING:  # numpy is imported where it is used: the command line reads the defaults below at start-up
    import numpy as np

#: the gate's resolution: the least consistent drop of a seed mean that counts as a regression. Set from the
#: benign spread of the smoke headlines (the module docstring, docs/regression-gate.md)
ABS_TOL = 0.015
K_SEED = 2.0
K_CI = 1.0


@dataclass(frozen=True)
class Tolerance:
    abs_tol: float = ABS_TOL
    k_seed: float = K_SEED
    k_ci: float = K_CI


# --------------------------------------------------------------------------- the two sides


@dataclass
class Side:
    """One side of the comparison: a leaderboard (read from a file or aggregated from a run store)."""

    name: str  # BASELINE or NEW
    path: Path
    kind: str  # "leaderboard" or "run store"
    board: dict

    def describe(self) -> dict:
        prov = self.board.get("provenance") or {}
        return {"path": str(self.path), "kind": self.kind, "created": self.board.get("created"),
                "git_sha": prov.get("git_sha"), "published": bool(self.board.get("published"))}


def load_side(path: Path, name: str, message: Callable[[str], None] | None = None) -> Side:
    """A leaderboard JSON file, or a run store folder aggregated in memory (as ``medbench leaderboard``)."""
    from medbench.board.schema import load_board

    path = Path(path)
    if not path.is_dir():
        return Side(name, path, "leaderboard", load_board(path, field=name))
    from medbench.board.aggregate import build_leaderboard
    from medbench.store import find_run_dirs
    from medbench.store.scores import rescore_outdated

    runs = find_run_dirs([path])
    if not runs:
        raise UsageError("no completed run folders found; expected a leaderboard JSON file or a run store "
                         "(the --out folder of 'medbench run')", where=path, field=name)
    rescore_outdated(runs, message)
    return Side(name, path, "run store", build_leaderboard(runs))


# --------------------------------------------------------------------------- entries and metrics


def key_dict(key: tuple) -> dict:
    return {"task": key[0], "backbone": key[1], "init": key[2], "regime": key[3] or None, "protocol": key[4]}


def key_text(key: tuple) -> str:
    return " · ".join(x for x in key if x)


def metric_summary(entry: dict, name: str) -> dict | None:
    """``headline``, a test metric name, or ``ood:TARGET:NAME``."""
    if name == "headline":
        return entry.get("headline")
    if name.startswith("ood:"):
        _, target, metric = name.split(":", 2)
        return ((entry.get("ood") or {}).get(target) or {}).get(metric)
    return (entry.get("metrics") or {}).get(name)


def _metric_name(entry: dict, name: str) -> str:
    if name == "headline":
        return entry["headline"]["metric"]
    return name.split(":")[-1]


def _index(side: Side) -> tuple[dict[tuple, tuple[int, dict]], list[dict]]:
    """Entries by key (with their index) and the keys present more than once."""
    seen: dict[tuple, list[int]] = {}
    for i, e in enumerate(side.board["entries"]):
        seen.setdefault(entry_key(e), []).append(i)
    entries = {k: (idx[0], side.board["entries"][idx[0]]) for k, idx in seen.items() if len(idx) == 1}
    duplicates = [{"board": side.name, **key_dict(k), "entries": idx} for k, idx in seen.items() if len(idx) > 1]
    return entries, duplicates


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _not_finite(s: dict, side: str) -> str | None:
    """Where a summary holds NaN or an infinity (None when every number in it is finite)."""
    items = [("mean", s.get("mean"))]
    items += [(f"seed {seed}", v) for seed, v in zip(s.get("seeds") or [None] * len(s.get("values") or []),
                                                     s.get("values") or [])]
    ci = s.get("ci") or {}
    items += [(f"interval {k}", ci.get(k)) for k in ("low", "high")]
    for what, v in items:
        if _is_number(v) and not math.isfinite(v):
            return f"{side} {what} is {v!r} (not a number)"
    return None


def _per_seed(s: dict) -> dict[int, float | None]:
    values, seeds = s.get("values") or [], s.get("seeds") or []
    return dict(zip(seeds, values)) if len(values) == len(seeds) else {}


def _newly_undefined(bs: dict, ns: dict) -> str | None:
    b, n = _per_seed(bs), _per_seed(ns)
    lost = [seed for seed, v in b.items() if v is not None and seed in n and n[seed] is None]
    return f"undefined in NEW for seed {', '.join(map(str, lost))} (defined in BASELINE)" if lost else None


def _half(s: dict) -> float:
    ci = s.get("ci") or {}
    lo, hi = ci.get("low"), ci.get("high")
    return (hi - lo) / 2 if lo is not None and hi is not None else 0.0


def _seed_var(s: dict) -> float:
    std, n = s.get("std"), s.get("n") or 1
    return (std or 0.0) ** 2 / max(n, 1)


# --------------------------------------------------------------------------- one row


def _pairing(be: dict, ne: dict, selector: str, changed: bool, where: tuple[tuple[str, str], tuple[str, str]]
             ) -> tuple[np.ndarray | None, np.ndarray | None, float, str | None]:
    """(baseline replicates, new replicates, level, why not paired) of one compared value."""
    from medbench.board.replicates import entry_replicates, selector_scope

    level = float(((be.get("replicates") or {}).get("level")) or 0.95)
    if be.get("published") or ne.get("published"):
        return None, None, level, "published row (no replicates)"
    if changed:
        return None, None, level, "other test data (--allow-changed-data)"
    b_reps = entry_replicates(be, selector, where=where[0][0], prefix=where[0][1])
    n_reps = entry_replicates(ne, selector, where=where[1][0], prefix=where[1][1])
    for reps, side in ((b_reps, "BASELINE"), (n_reps, "NEW")):
        if reps is None:
            return None, None, level, (f"{side} has no replicates of it (a board made before the paired gate, "
                                       "a per-label metric, or runs scored without a bootstrap)")
    scope = selector_scope(selector)
    rb = ((be.get("replicates") or {}).get("resampling") or {}).get(scope)
    rn = ((ne.get("replicates") or {}).get("resampling") or {}).get(scope)
    if not rb or rb != rn or len(b_reps) != len(n_reps):
        return None, None, level, (f"{scope} resampled differently (fingerprint {(rb or {}).get('fingerprint')} "
                                   f"vs {(rn or {}).get('fingerprint')}, {(rb or {}).get('n_resamples')} vs "
                                   f"{(rn or {}).get('n_resamples')} resamples); rescore both with the same "
                                   "'medbench score --bootstrap' options to pair them")
    return b_reps, n_reps, level, None


def judge(bs: dict, ns: dict, metric: str, tolerance: Tolerance, b_reps: np.ndarray | None = None,
          n_reps: np.ndarray | None = None, level: float = 0.95) -> dict:
    """worse_by, its paired interval (when both replicates are given), the tolerance and its terms, the status."""
    import numpy as np

    from medbench.scoring import higher_is_better
    from medbench.scoring.paired import paired_difference

    sign = 1.0 if higher_is_better(metric) else -1.0
    worse = sign * (bs["mean"] - ns["mean"])
    out: dict[str, Any] = {"worse_by": worse, "interval": None, "n_undefined": None}
    ci_half = math.sqrt(_half(bs) ** 2 + _half(ns) ** 2)
    paired = b_reps is not None and n_reps is not None
    if paired:
        res = paired_difference(bs["mean"], b_reps, ns["mean"], n_reps, level=level, higher_is_better=sign > 0)
        if res["ci"] is None:  # no resample defined on both sides
            paired = False
        else:
            lo, hi = sorted((sign * res["ci"]["low"], sign * res["ci"]["high"]))
            out["interval"] = {"low": lo, "high": hi, "level": level}
            out["n_undefined"] = res["n_undefined"]
            ci_half = (hi - lo) / 2
    b_seeds, n_seeds = _per_seed(bs), _per_seed(ns)
    seeds_paired = (paired and list(bs.get("seeds") or []) == list(ns.get("seeds") or []) and bool(b_seeds)
                    and all(v is not None for v in [*b_seeds.values(), *n_seeds.values()]))
    if seeds_paired:
        d = np.array([sign * (b_seeds[s] - n_seeds[s]) for s in b_seeds], dtype=np.float64)
        seed_se = float(d.std(ddof=1) / math.sqrt(d.size)) if d.size > 1 else 0.0
        out["seed_differences"] = [float(x) for x in d]
    else:
        seed_se = math.sqrt(_seed_var(bs) + _seed_var(ns))
    terms = {"abs_tol": tolerance.abs_tol, "seed": tolerance.k_seed * seed_se, "ci": tolerance.k_ci * ci_half}
    set_by = max(terms, key=lambda k: terms[k])
    tol = terms[set_by]
    status = "regression" if worse > tol else ("better" if -worse > tol else "ok")
    out.update(mode="paired" if paired else "unpaired", seeds_paired=seeds_paired, tolerance=tol, terms=terms,
               set_by=set_by, status=status)
    return out


# --------------------------------------------------------------------------- the gate


def _changed_data(be: dict, ne: dict) -> str | None:
    if be.get("published") or ne.get("published"):
        return None
    pb, pn = be.get("provenance") or {}, ne.get("provenance") or {}
    for field, what in (("task_hash", "task hash"), ("data_fingerprint", "dataset fingerprint")):
        if pb.get(field) is not None and pn.get(field) is not None and pb[field] != pn[field]:
            return f"{what} {pn[field][:12]} differs from BASELINE's {pb[field][:12]}"
    return None


def compare_sides(base: Side, new: Side, metrics: list[str] | None = None, tolerance: Tolerance = Tolerance(),
                  allow_missing: bool = False, allow_changed_data: bool = False) -> dict[str, Any]:
    """Rows per matched entry and metric, duplicates, missing/added entries, and the verdict."""
    metrics = metrics or ["headline"]
    b_entries, b_dups = _index(base)
    n_entries, n_dups = _index(new)
    dup_keys = {entry_key({**d, "regime": d["regime"] or ""}) for d in b_dups + n_dups}
    for name in metrics:
        if name != "headline" and b_entries and not any(metric_summary(e, name) for _, e in b_entries.values()):
            known = sorted({m for _, e in b_entries.values() for m in (e.get("metrics") or {})})
            raise UsageError(f"no entry of BASELINE has metric {name!r}; expected 'headline', a test metric "
                             f"({', '.join(known[:8])}{', ...' if len(known) > 8 else ''}) or ood:TARGET:METRIC",
                             field="--metric")
    matched = sorted((set(b_entries) & set(n_entries)) - dup_keys)
    changed: dict[tuple, str] = {}
    for key in matched:
        why = _changed_data(b_entries[key][1], n_entries[key][1])
        if why:
            changed[key] = why
    if changed and not allow_changed_data:
        key, why = next(iter(changed.items()))
        more = f" (and {len(changed) - 1} more)" if len(changed) > 1 else ""
        raise UsageError(f"entry {key_text(key)}: {why}{more}: it was scored on other test data or another task "
                         "definition, which is not a regression; rebuild the baseline with the same tasks and data, "
                         "or pass --allow-changed-data to compare such entries by the unpaired rule", where=new.path,
                         field="NEW")
    rows = []
    for key in matched:
        (bi, be), (ni, ne) = b_entries[key], n_entries[key]
        where = ((str(base.path), f"entries[{bi}]."), (str(new.path), f"entries[{ni}]."))
        for name in metrics:
            bs = metric_summary(be, name)
            if bs is None or (bs.get("mean") is None and not any(_is_number(v) for v in bs.get("values") or [])):
                continue  # nothing to hold the new board to
            ns = metric_summary(ne, name) or {}
            metric = _metric_name(be, name)
            selector = metric if name == "headline" else name
            row: dict[str, Any] = {**key_dict(key), "metric": metric, "selector": name, "baseline": bs.get("mean"),
                                   "new": ns.get("mean"), "baseline_seeds": bs.get("seeds"),
                                   "new_seeds": ns.get("seeds"),
                                   "worse_by": None, "interval": None, "mode": None, "tolerance": None, "terms": None,
                                   "set_by": None, "note": None, "reason": None}
            bad = _not_finite(bs, "BASELINE") or _not_finite(ns, "NEW")
            if bad:
                row.update(status="invalid", reason=bad)
            elif name == "headline" and ne.get("headline", {}).get("metric") != metric:
                row.update(status="invalid", reason=f"headline metric changed to {ne['headline'].get('metric')!r}")
            elif bs.get("mean") is None:
                row.update(status="invalid", reason="BASELINE mean is undefined while seeds define it")
            elif ns.get("mean") is None:
                row.update(status="invalid", reason="undefined in NEW")
            elif _newly_undefined(bs, ns):
                row.update(status="invalid", reason=_newly_undefined(bs, ns))
            else:
                b_reps, n_reps, level, why = _pairing(be, ne, selector, key in changed, where)
                row.update(judge(bs, ns, metric, tolerance, b_reps, n_reps, level))
                notes = [why] if why else []
                if key in changed:
                    notes.append(changed[key])
                if row["mode"] == "paired" and not row["seeds_paired"]:
                    notes.append(f"seeds {bs.get('seeds')} vs {ns.get('seeds')}: paired on test resamples only, the "
                                 "seed term from both boards' seed standard deviations")
                row["note"] = "; ".join(notes) or None
            row["passed"] = row["status"] in ("ok", "better")
            rows.append(row)
    missing = [key_dict(k) for k in sorted(set(b_entries) - set(n_entries) - dup_keys)]
    added = [key_dict(k) for k in sorted(set(n_entries) - set(b_entries) - dup_keys)]
    failed_rows = sum(not r["passed"] for r in rows)
    failed = failed_rows > 0 or bool(b_dups or n_dups) or (bool(missing) and not allow_missing)
    return {"status": "regression" if failed else "pass",
            "regressions": sum(r["status"] == "regression" for r in rows),
            "invalid": sum(r["status"] == "invalid" for r in rows),
            "compared": len(rows), "paired": sum(r.get("mode") == "paired" for r in rows),
            "duplicates": b_dups + n_dups, "missing": missing, "added": added,
            "allow_missing": allow_missing, "allow_changed_data": allow_changed_data,
            "changed_data": [{**key_dict(k), "reason": v} for k, v in sorted(changed.items())],
            "baseline": base.describe(), "new": new.describe(), "rule": rule(tolerance), "rows": rows}


def rule(tolerance: Tolerance) -> dict:
    return {"worse_by": "sign * (baseline - new) of the seed means (sign -1 for lower-is-better metrics)",
            "paired": "tolerance = max(abs_tol, k_seed * se of the per-seed differences, k_ci * half-width of the "
                      "paired interval of worse_by over the shared test resamples)",
            "unpaired": ("tolerance = max(abs_tol, k_seed * sqrt(std_b^2/n_b + std_n^2/n_n), "
                         "k_ci * sqrt(h_b^2 + h_n^2))"),
            "regression": "worse_by > tolerance",
            "abs_tol": tolerance.abs_tol, "k_seed": tolerance.k_seed, "k_ci": tolerance.k_ci,
            "calibration": "docs/regression-gate.md"}


def compare_boards(base: dict, new: dict, metrics: list[str] | None = None, tolerance: Tolerance = Tolerance(),
                   allow_missing: bool = False, allow_changed_data: bool = False) -> dict[str, Any]:
    """:func:`compare_sides` on two leaderboard dicts."""
    return compare_sides(Side("BASELINE", Path("BASELINE"), "leaderboard", base),
                         Side("NEW", Path("NEW"), "leaderboard", new), metrics, tolerance, allow_missing,
                         allow_changed_data)

