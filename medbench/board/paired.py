"""``medbench paired``: two sets of scored run folders compared on the same test resamples (seeds averaged
per side), from their stored point values and replicates; the statistic is
:func:`medbench.scoring.paired.paired_difference`."""

from __future__ import annotations

from typing import Sequence

from medbench.errors import UsageError
from medbench.scoring.paired import paired_difference, seed_mean
from medbench.store import RunDir


def _value(tree: dict, path: tuple):
    node = tree
    for p in path:
        if not isinstance(node, dict) or p not in node:
            return None
        node = node[p]
    return node if isinstance(node, (int, float)) and not isinstance(node, bool) else None


def compare_runs(runs_a: Sequence[RunDir], runs_b: Sequence[RunDir], path: tuple = ("test", "auc"), *,
                 level: float | None = None) -> dict:
    """Paired comparison of two sets of scored runs of one task (seeds averaged on each side)."""
    from medbench.scoring import higher_is_better
    from medbench.store.scores import read_replicates

    sides = []
    for runs in (runs_a, runs_b):
        if not runs:
            raise UsageError("no scored runs on one side of the comparison", field="RUN_DIR")
        metrics = [r.scores() for r in runs]
        sides.append((metrics, [read_replicates(r).get(path) for r in runs]))
    resampling = {str(m["scoring"].get("resampling")) for ms, _ in sides for m in ms}
    if len(resampling) > 1:
        raise UsageError("the runs were not resampled alike (other test set or bootstrap settings); "
                         "rescore them with the same 'medbench score --bootstrap' options", field="RUN_DIR")
    level = level or sides[0][0][0]["scoring"]["ci_level"]
    (ma, ra), (mb, rb) = sides
    pa, reps_a = seed_mean([_value(m, path) for m in ma], ra)
    pb, reps_b = seed_mean([_value(m, path) for m in mb], rb)
    metric = path[-1] if path[0] != "test" else path[1]
    out = paired_difference(pa, reps_a, pb, reps_b, level=level, higher_is_better=higher_is_better(metric))
    out["path"] = list(path)
    out["seeds"] = {"a": len(ma), "b": len(mb)}
    return out
