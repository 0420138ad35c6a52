"""``medbench compare BASELINE NEW``: a regression gate between two leaderboards.

Entries are matched on (task, backbone, init, regime, protocol; an entry
without a protocol is fine-tuning); only numbers are compared (provenance,
dates, paths and git revisions differ between runs by design). For each matched entry and each compared metric (the headline by
default, plus ``--metric NAME`` for any test metric, ``ood:TARGET:NAME`` for
an OOD score) with ``b`` the baseline summary and ``n`` the new one:

* ``worse = b.mean - n.mean`` (``n.mean - b.mean`` for lower-is-better metrics);
* ``tolerance = max(abs_tol, k_seed * sqrt(b.std**2 / b.n + n.std**2 / n.n), k_ci * sqrt(hb**2 + hn**2))``
  where ``std`` is the seed standard deviation (ddof=1; 0 for one seed),
  ``n`` the number of seeds (so the middle term is the standard error of the
  difference of two seed means), and ``h = (ci.high - ci.low) / 2`` the
  half-width of the seed mean's test-resampling interval (0 when absent);
* **regression** when ``worse > tolerance``, or when the metric was defined in
  the baseline and is undefined (or absent) in the new board.

Defaults: ``abs_tol = 0.005``, ``k_seed = 2``, ``k_ci = 1``. Entries missing
from NEW are reported and fail the gate unless ``--allow-missing``; added
entries are reported and never fail. Exit status: 0 pass, 1 regression, 2
usage error (unreadable file, not a leaderboard, wrong schema version).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from medbench.board.schema import entry_key


@dataclass(frozen=True)
class Tolerance:
    abs_tol: float = 0.005
    k_seed: float = 2.0
    k_ci: float = 1.0

    def of(self, base: dict, new: dict) -> dict:
        def seed_var(s: dict) -> float:
            std, n = s.get("std"), s.get("n") or 1
            return (std or 0.0) ** 2 / max(n, 1)

        def half(s: dict) -> float:
            ci = s.get("ci") or {}
            lo, hi = ci.get("low"), ci.get("high")
            return (hi - lo) / 2 if lo is not None and hi is not None else 0.0

        seed_term = self.k_seed * math.sqrt(seed_var(base) + seed_var(new))
        ci_term = self.k_ci * math.sqrt(half(base) ** 2 + half(new) ** 2)
        return {"tolerance": max(self.abs_tol, seed_term, ci_term), "abs_tol": self.abs_tol, "seed_term": seed_term,
                "ci_term": ci_term}


def key_dict(key: tuple) -> dict:
    return {"task": key[0], "backbone": key[1], "init": key[2], "regime": key[3] or None, "protocol": key[4]}


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


def compare_boards(base: dict, new: dict, metrics: list[str] | None = None, tolerance: Tolerance = Tolerance(),
                   allow_missing: bool = False) -> dict[str, Any]:
    """Rows per matched entry and metric, added/missing entries, and the verdict."""
    from medbench.scoring import higher_is_better

    metrics = metrics or ["headline"]
    b_entries = {entry_key(e): e for e in base["entries"] if not e.get("published")}
    n_entries = {entry_key(e): e for e in new["entries"] if not e.get("published")}
    for name in metrics:
        if name != "headline" and b_entries and not any(metric_summary(e, name) for e in b_entries.values()):
            from medbench.errors import UsageError

            known = sorted({m for e in b_entries.values() for m in (e.get("metrics") or {})})
            raise UsageError(f"no entry of BASELINE has metric {name!r}; expected 'headline', a test metric "
                             f"({', '.join(known[:8])}{', ...' if len(known) > 8 else ''}) or ood:TARGET:METRIC",
                             field="--metric")
    rows = []
    for key in sorted(set(b_entries) & set(n_entries)):
        be, ne = b_entries[key], n_entries[key]
        for name in metrics:
            bs = metric_summary(be, name)
            if bs is None or bs.get("mean") is None:
                continue  # nothing to hold the new board to
            ns = metric_summary(ne, name) or {}
            metric = _metric_name(be, name)
            row = {**key_dict(key), "metric": metric, "selector": name, "baseline": bs["mean"], "new": ns.get("mean"),
                   "baseline_std": bs.get("std"), "new_std": ns.get("std"), "worse_by": None}
            if name == "headline" and ne.get("headline", {}).get("metric") != metric:
                row.update(status="regression", reason=f"headline metric changed to {ne['headline'].get('metric')!r}")
            elif ns.get("mean") is None:
                row.update(status="regression", reason="undefined in NEW")
            else:
                sign = 1.0 if higher_is_better(metric) else -1.0
                worse = sign * (bs["mean"] - ns["mean"])
                tol = tolerance.of(bs, ns)
                row.update(tol, worse_by=worse)
                row["status"] = "regression" if worse > tol["tolerance"] else (
                    "better" if -worse > tol["tolerance"] else "ok")
                row["reason"] = None
            rows.append(row)
    missing = [key_dict(k) for k in sorted(set(b_entries) - set(n_entries))]
    added = [key_dict(k) for k in sorted(set(n_entries) - set(b_entries))]
    regressions = sum(r["status"] == "regression" for r in rows)
    failed = regressions > 0 or (bool(missing) and not allow_missing)
    return {"status": "regression" if failed else "pass", "regressions": regressions, "compared": len(rows),
            "missing": missing, "added": added, "allow_missing": allow_missing,
            "rule": {"worse_by": "baseline - new (sign flipped for lower-is-better metrics)",
                     "tolerance": "max(abs_tol, k_seed * sqrt(std_b^2/n_b + std_n^2/n_n), k_ci * sqrt(h_b^2 + h_n^2))",
                     "abs_tol": tolerance.abs_tol, "k_seed": tolerance.k_seed, "k_ci": tolerance.k_ci},
            "rows": rows}
