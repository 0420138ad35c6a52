"""Which entries of a task are not significantly different from the best (CJ21 marks them in italics).

Test: the paired bootstrap of :mod:`medbench.scoring.paired` on the headline
metric. Within a group (same task, regime and protocol; every backbone and init), the
best entry is the one with the best seed-mean headline (higher or lower is
better per the metric's registry). Each other entry is compared with it on
the *same test resamples*: replicate ``b`` of both entries scores the same
resample (both averaged over their seeds), so the difference of replicates is
the bootstrap distribution of the paired difference. Two-sided p-value
``2 min(P(d* <= 0), P(d* >= 0))``; the entry is *tied with the best* when
``p >= alpha`` with ``alpha = 1 - ci_level`` of the runs' scoring (0.05 by
default), i.e. when the paired interval contains 0. When the two entries were
not resampled alike (other test set, other bootstrap settings) or have no
replicates, ``tied_with_best`` is null and ``reason`` says why.

Reads only ``metrics.json``/``bootstrap.parquet`` through
:class:`medbench.board.axes.SeedAggregate`, never predictions.
"""

from __future__ import annotations

import json
from typing import Any

from medbench.store import RunDir

TEST_NAME = "paired bootstrap of the headline metric on the same test resamples (seed means), two-sided"
GROUP_BY = ["task", "regime", "protocol"]


def method(alpha: float) -> dict[str, Any]:
    return {"test": TEST_NAME, "alpha": alpha, "group_by": GROUP_BY,
            "marks": "tied_with_best: p >= alpha against the best entry of the group (rendered in italics)"}


def mark_significance(entries: list[dict], runs: list[RunDir]) -> dict | None:
    """Add a ``significance`` block to every entry of a group with two or more entries; returns the method."""
    from medbench.board.axes import RunRecord, SeedAggregate
    from medbench.board.schema import entry_key
    from medbench.scoring import higher_is_better
    from medbench.scoring.paired import paired_difference

    groups: dict[tuple, list[dict]] = {}
    for e in entries:
        if e.get("headline", {}).get("mean") is not None and not e.get("published"):
            key = entry_key(e)
            groups.setdefault((key[0], key[3], key[4]), []).append(e)
    records: dict[tuple, list] = {}
    for run in runs:
        rec = RunRecord.load(run)
        if rec is None or rec.variant:
            continue
        r = rec.result
        records.setdefault(entry_key(r), []).append(rec)
    alpha_used = None
    for (task, regime, protocol), group in groups.items():
        if len(group) < 2:
            continue
        metric = group[0]["headline"]["metric"]
        if any(e["headline"]["metric"] != metric for e in group):
            continue  # entries of one task share its headline; a mix is not comparable
        hib = higher_is_better(metric)
        best = max(group, key=lambda e: e["headline"]["mean"] if hib else -e["headline"]["mean"])
        aggs = {id(e): SeedAggregate(records.get(entry_key(e), [])) for e in group}
        b_agg = aggs[id(best)]
        alpha = round(1 - b_agg.level, 10)
        alpha_used = alpha if alpha_used is None else alpha_used
        path = ("test", metric)
        for e in group:
            block: dict[str, Any] = {"metric": metric, "best": e is best, "tied_with_best": True if e is best else None,
                                     "best_entry": {"backbone": best["backbone"], "init": best["init"]},
                                     "vs_best": None, "alpha": alpha, "test": TEST_NAME, "reason": None}
            if e is not best:
                agg = aggs[id(e)]
                same = (agg.scoring is not None and b_agg.scoring is not None and
                        json.dumps(agg.scoring.get("resampling"), sort_keys=True) ==
                        json.dumps(b_agg.scoring.get("resampling"), sort_keys=True))
                reps_e, reps_b = (agg.replicates(path), b_agg.replicates(path)) if same else (None, None)
                res = paired_difference(e["headline"]["mean"], reps_e, best["headline"]["mean"], reps_b,
                                        level=b_agg.level, higher_is_better=hib)
                block["vs_best"] = res
                if res["p_value"] is None:
                    block["reason"] = ("not resampled alike (other test set or bootstrap settings)" if not same
                                       else "no bootstrap replicates (rescore with 'medbench score --bootstrap N')")
                else:
                    block["tied_with_best"] = bool(res["p_value"] >= alpha)
            e["significance"] = block
    return method(alpha_used) if alpha_used is not None else None
