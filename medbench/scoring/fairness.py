"""Subgroup fairness: per attribute and per intersection of attributes, on the test split.

Groups. Each attribute of the task (``attributes:`` in the spec) splits the
test images into groups: the column's values, or for a binned attribute
(``bins: [0, 40, 65, 200]``) the bins ``[0, 40)``, ``[40, 65)``, ``[65, 200)``
— every declared bin is reported, also when empty. Missing values (null, a
float NaN, an empty string, or the text ``nan`` that a NaN becomes when a table
is converted to text) form the group ``(missing)``, never a group named
``nan``; values outside the bins form ``(out of bins)``.
Intersections cross up to ``scoring.intersections`` attributes (default 2:
every pair), named ``sex=F & age_group=[40, 65)``. A group with fewer than
``scoring.min_group_size`` images is reported with its size and status
``too_small`` (``empty`` with none), never dropped; it is not scored and does
not enter worst-group values or gaps.

Per scored group: ``n``, ``auc``, ``accuracy`` and ``balanced_accuracy`` (the
task's definitions, :mod:`medbench.scoring.classification`: mean over labels
for multilabel, macro one-vs-rest AUC and top-1 accuracy for multiclass), and
at the operating point TPR, FPR, FNR (underdiagnosis) and selection rate,
averaged over labels (per label under ``per_label``).

Operating point. Binary and multilabel: a threshold per label chosen on the
**validation** predictions only (``youden``: max TPR - FPR; ``sensitivity``:
the highest threshold whose validation TPR reaches ``target_sensitivity``),
then applied to the test predictions (``p >= threshold``). Multiclass: the
argmax decision, one-vs-rest per class. Rates are computed on decisions,
never on continuous scores (fairlearn's demographic parity of raw scores is
silently 0). ``operating_point`` reports what happened: ``chosen_on`` is
``"val"`` when thresholds were chosen on validation predictions, and ``None``
otherwise, with a ``reason``: multiclass (argmax, no threshold), or no
validation predictions — a threshold is never chosen on the test split, so
then every threshold is ``None`` and the decision rates (TPR, FPR, FNR,
selection rate, equalized odds, demographic parity) are not reported; AUC and
accuracy still are. A label whose validation split holds one class has
threshold ``None`` (listed in ``reason``).

Per grouping: worst group and its value (AUC, accuracy, balanced accuracy),
gaps (max - min over scored groups; for the rates, per label then averaged),
the equalized-odds difference and the demographic-parity difference of the
decisions. **Equalized odds** follows fairlearn's
``equalized_odds_difference`` (``agg="worst_case"``): between groups, the
larger of the TPR gap and the FPR gap, per label over the scored groups holding
both classes, then averaged over labels. MEDFAIR (Zong et al. 2023) reports
``1 - mean(TPR gap, FPR gap)`` instead (higher is fairer, the two gaps
averaged): medbench keeps fairlearn's worst case, a difference (lower is
fairer), and reports both gaps beside it. A rate with an empty denominator in a
group is undefined (fairlearn would report 0).

**Groups lacking a class.** A group whose test images hold one class of a
label has no AUC for that label; its AUC is the mean over the labels it can
score, and a group with none is left out of the worst group and the AUC gap.
Likewise a group without positives has no TPR (so no equalized odds), one
without negatives no FPR.

**One definition, strict replicates.** Every value, point and replicate, of
every grouping (intersections included) is the finalizer of linear statistics
of :func:`grouping_rows` (the point at unit weights); fairlearn and scikit-learn
are the oracles in tests. A component defined at the point (a group's value, a
label's rate) that is undefined in a resample (the group drew one class) makes
the worst group, the gap and the differences of that replicate undefined
(counted in ``n_undefined``), never a value over the remaining groups; a
component undefined at the point is left out of both (see
:mod:`medbench.scoring.bootstrap`). Gaps are absolute (max - min), so their
intervals sit above 0 by construction; compare the groups' own intervals to
judge a difference. Intersections are reported with point values only (no
bootstrap: their groups are small). Point values are built over each group's own images (the same sums,
added in the same sample order, as through a mask over the whole test set).

An attribute with a single observed value (e.g. one site) is reported but
not crossed with the others (its intersections would repeat their groups).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

from medbench.predictions import Predictions
from medbench.scoring.bootstrap import LinearStats, evaluate, ratio, strict_extreme, strict_mean
from medbench.spec import AttributeSpec, ScoringSpec

MISSING = "(missing)"
OUT_OF_BINS = "(out of bins)"
RATES = ("tpr", "fpr", "fnr", "selection_rate")
SCORES = ("auc", "accuracy", "balanced_accuracy")


def is_missing(v) -> bool:
    """A missing attribute value: null, a float NaN, an empty string or the text ``nan`` (any case)."""
    if v is None:
        return True
    if isinstance(v, float) and math.isnan(v):
        return True
    return isinstance(v, str) and v.strip().lower() in ("", "nan")


@dataclass
class Grouping:
    name: str
    attributes: list[str]
    group_of: np.ndarray  # [N] group name per test image
    declared: list[str]  # every group reported, in order


def _fmt(x: float) -> str:
    return f"{x:g}"


def _number(v) -> float:
    """A binned attribute's value as a number: NaN when missing, infinite (outside every bin) when it is not a
    number."""
    if is_missing(v):
        return math.nan
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.inf


def attribute_groups(values: list, attr: AttributeSpec) -> tuple[np.ndarray, list[str]]:
    """Group name per value and the declared groups of one attribute."""
    if attr.bins is not None:
        edges = attr.bins
        names = [f"[{_fmt(a)}, {_fmt(b)})" for a, b in zip(edges, edges[1:])]
        x = np.array([_number(v) for v in values], dtype=np.float64).reshape(-1)  # NaN: missing, inf: not a number
        code = np.searchsorted(np.asarray(edges, dtype=np.float64), x, side="right") - 1
        code[(code < 0) | (code >= len(names))] = len(names)  # out of bins (and not a number)
        code[np.isnan(x)] = len(names) + 1
        out = np.asarray(names + [OUT_OF_BINS, MISSING], dtype=object)[code]
        extra = [g for i, g in enumerate((OUT_OF_BINS, MISSING)) if (code == len(names) + i).any()]
        return out, names + extra
    out = [MISSING if is_missing(v) else str(v) for v in values]
    observed = sorted(set(out) - {MISSING}) + ([MISSING] if MISSING in out else [])
    return np.asarray(out, dtype=object), observed


def groupings(preds: Predictions, attributes: list[AttributeSpec], max_order: int) -> tuple[list[Grouping], dict]:
    """Single attributes and their intersections up to ``max_order``; attributes whose column the
    predictions lack are returned separately as unavailable."""
    singles: list[tuple[AttributeSpec, np.ndarray, list[str]]] = []
    unavailable = {}
    for a in attributes:
        if a.source_column not in preds.table.columns:
            unavailable[a.name] = {"status": "unavailable",
                                   "reason": f"column {a.source_column!r} is not in the predictions"}
            continue
        g, declared = attribute_groups(preds.table[a.source_column].to_list(), a)
        singles.append((a, g, declared))
    out = [Grouping(a.name, [a.name], g, declared) for a, g, declared in singles]
    # an attribute with one observed value (e.g. one site) would only repeat the other attributes' groups
    crossable = [s for s in singles if len(set(s[1])) > 1]
    for order in range(2, max_order + 1):
        for combo in itertools.combinations(crossable, order):
            names = [a.name for a, _, _ in combo]
            group_of = np.asarray([" & ".join(f"{n}={v}" for n, v in zip(names, vals))
                                   for vals in zip(*[g for _, g, _ in combo])], dtype=object)
            declared = [" & ".join(f"{n}={v}" for n, v in zip(names, vals))
                        for vals in itertools.product(*[d for _, _, d in combo])]
            out.append(Grouping(" & ".join(names), names, group_of, declared))
    return out, unavailable


# --------------------------------------------------------------------------- operating point


def choose_threshold(y_val: np.ndarray, p_val: np.ndarray, method: str, target_sensitivity: float) -> dict | None:
    """The operating threshold of one label from validation labels and scores (decision: ``p >= t``).

    Returns ``{"threshold", "val_tpr", "val_fpr"}``, or None when validation holds one class."""
    from sklearn.metrics import roc_curve

    keep = ~np.isnan(y_val)
    y, p = y_val[keep], p_val[keep]
    if y.size == 0 or y.min() == y.max():
        return None
    fpr, tpr, thr = roc_curve(y.astype(int), p, drop_intermediate=False)
    fpr, tpr, thr = fpr[1:], tpr[1:], thr[1:]  # the first point (threshold +inf) predicts nothing positive
    if method == "youden":
        i = int(np.argmax(tpr - fpr))
    elif method == "sensitivity":
        i = int(np.flatnonzero(tpr >= target_sensitivity - 1e-12)[0])
    else:
        raise ValueError(f"unknown threshold method {method!r}")
    return {"threshold": float(thr[i]), "val_tpr": float(tpr[i]), "val_fpr": float(fpr[i])}


def operating_points(val: Predictions | None, config: ScoringSpec) -> dict[str, dict | None]:
    """Per label, the threshold chosen on ``val`` (binary/multilabel tasks)."""
    if val is None or len(val) == 0:
        return {name: None for name in val.label_names} if val is not None else {}
    y, p = val.y_true(), val.y_prob()
    return {name: choose_threshold(y[:, k], p[:, k], config.threshold, config.target_sensitivity)
            for k, name in enumerate(val.label_names)}


def decisions(test: Predictions, points: dict[str, dict | None]) -> tuple[np.ndarray, np.ndarray]:
    """(decisions ``[N, L]`` as 0/1, which labels have one) on the test predictions."""
    p = test.y_prob()
    if test.task_type == "multiclass":
        from medbench.scoring.classification import top1

        d = np.zeros_like(p)
        d[np.arange(p.shape[0]), top1(test)[2]] = 1.0
        return d, np.ones(p.shape[1], dtype=bool)
    d = np.zeros_like(p)
    has = np.zeros(p.shape[1], dtype=bool)
    for k, name in enumerate(test.label_names):
        pt = points.get(name)
        if pt is not None:
            d[:, k] = (p[:, k] >= pt["threshold"]).astype(np.float64)
            has[k] = True
    return d, has


# --------------------------------------------------------------------------- the definitions (linear statistics)


def group_sizes(grouping: Grouping, config: ScoringSpec) -> dict[str, dict]:
    """Per declared group: ``n`` and ``status`` (``ok``, ``too_small``, ``empty``)."""
    groups: dict[str, dict] = {}
    for g in grouping.declared:
        n = int((grouping.group_of == g).sum())
        groups[g] = {"n": n, "status": "empty" if n == 0 else ("too_small" if n < config.min_group_size else "ok")}
    return groups


def _rate_rows(stats: LinearStats, y: np.ndarray, d: np.ndarray, mask: np.ndarray):
    """One label in one group: finalizers of TPR, FPR, FNR and selection rate of the decisions ``d``."""
    v = ~np.isnan(y) & mask
    yk = np.nan_to_num(y)
    tp, pos = stats.add_sum(v & (yk == 1) & (d == 1)), stats.add_sum(v & (yk == 1))
    fp, neg = stats.add_sum(v & (yk == 0) & (d == 1)), stats.add_sum(v & (yk == 0))
    sel, n = stats.add_sum(v & (d == 1)), stats.add_sum(v)
    return {"tpr": lambda s: ratio(s[tp], s[pos]), "fpr": lambda s: ratio(s[fp], s[neg]),
            "fnr": lambda s: 1.0 - ratio(s[tp], s[pos]), "selection_rate": lambda s: ratio(s[sel], s[n])}


def grouping_rows(stats: LinearStats, test: Predictions, grouping: Grouping, scored: list[str], d: np.ndarray,
                  has_decision: np.ndarray):
    """Rows of one grouping's scored groups; ``finalize(sums) -> {path-suffix tuple: [b]}`` holding every value
    of the grouping (see the module docstring); components defined at the point are found here, once."""
    from medbench.scoring.classification import accuracy_finalizer, auc_finalizer, balanced_accuracy_finalizer

    y = test.y_true()
    names = test.label_names
    decided = [k for k in range(len(names)) if has_decision[k]]
    scores: dict[str, dict[str, object]] = {}
    rates: dict[int, dict[str, dict]] = {k: {} for k in decided}  # label -> group -> rate finalizers
    for g in scored:
        mask = grouping.group_of == g
        preds, yg, dg = test, y, d
        if stats.point_only:  # point sums only: over the group's own images, in sample order (the same sums)
            rows = np.flatnonzero(mask)
            preds, yg, dg, mask = test.take(rows), y[rows], d[rows], np.ones(rows.size, dtype=bool)
        scores[g] = {"auc": auc_finalizer(stats, preds, mask), "accuracy": accuracy_finalizer(stats, preds, mask),
                     "balanced_accuracy": balanced_accuracy_finalizer(stats, preds, mask)}
        for k in decided:
            if (~np.isnan(yg[:, k]) & mask).any():  # groups with labelled images of this label
                rates[k][g] = _rate_rows(stats, yg[:, k], dg[:, k], mask)
    point = stats.point_now()

    def ok(value) -> bool:
        return bool(np.isfinite(np.asarray(value, dtype=np.float64)).all())

    score_ok = {m: [ok(scores[g][m](point)[m]) for g in scored] for m in SCORES}
    rate_ok = {k: {g: {m: ok(f(point)) for m, f in per.items()} for g, per in rates[k].items()} for k in decided}
    # per label: the groups holding both classes at the point (equalized odds)
    both = {k: [g for g in rates[k] if rate_ok[k][g]["tpr"] and rate_ok[k][g]["fpr"]] for k in decided}

    def label_values(k: int, sums: np.ndarray, out: dict) -> None:
        name = names[k]
        per = {g: {m: f(sums) for m, f in fs.items()} for g, fs in rates[k].items()}
        for g, vals in per.items():
            for m, v in vals.items():
                out[("per_label", name, "groups", g, m)] = v
        for m in RATES:
            out[("per_label", name, "gap", m)] = strict_extreme([per[g][m] for g in per],
                                                               [rate_ok[k][g][m] for g in per], "gap", 2)
        eod = [strict_extreme([per[g][m] for g in both[k]], [True] * len(both[k]), "gap", 2) for m in ("tpr", "fpr")]
        out[("per_label", name, "equalized_odds_difference")] = np.maximum(eod[0], eod[1])
        out[("per_label", name, "demographic_parity_difference")] = out[("per_label", name, "gap", "selection_rate")]

    def finalize(sums: np.ndarray) -> dict[tuple, np.ndarray]:
        out: dict[tuple, np.ndarray] = {}
        per_group = {m: [] for m in SCORES}
        for g in scored:
            for m in SCORES:
                v = scores[g][m](sums)[m]
                out[("groups", g, m)] = v
                per_group[m].append(v)
        for m in SCORES:
            if scored:
                out[("worst", m)] = strict_extreme(per_group[m], score_ok[m], "min")
                out[("gap", m)] = strict_extreme(per_group[m], score_ok[m], "gap", 2)
        for k in decided:
            label_values(k, sums, out)
        for g in scored:  # a group's rate: the mean over the labels where it is defined at the point
            for m in RATES:
                ks = [k for k in decided if g in rates[k]]
                if ks:
                    out[("groups", g, m)] = strict_mean([out[("per_label", names[k], "groups", g, m)] for k in ks],
                                                        [rate_ok[k][g][m] for k in ks])
        if decided:
            for m in RATES:
                gaps = [out[("per_label", names[k], "gap", m)] for k in decided]
                out[("gap", m)] = strict_mean(gaps, gap_ok[m])
            for key in ("equalized_odds_difference", "demographic_parity_difference"):
                per = [out[("per_label", names[k], key)] for k in decided]
                out[(key,)] = strict_mean(per, diff_ok[key])
        return out

    # which per-label gaps and differences are defined at the point (they enter the means over labels)
    probe: dict = {}
    for k in decided:
        label_values(k, point, probe)
    gap_ok = {m: [ok(probe[("per_label", names[k], "gap", m)]) for k in decided] for m in RATES}
    diff_ok = {key: [ok(probe[("per_label", names[k], key)]) for k in decided]
               for key in ("equalized_odds_difference", "demographic_parity_difference")}
    return finalize


# --------------------------------------------------------------------------- point values from the same finalizer


def _value(v) -> float | None:
    return v if v is None else float(v)


def score_grouping(grouping: Grouping, groups: dict[str, dict], point: dict[tuple, float | None], y: np.ndarray,
                   label_names: list[str], decided: list[str], task_type: str) -> dict:
    """A grouping's block of ``metrics.json`` from its finalizer's point values (``point``, keys without the
    grouping prefix) and the group sizes."""
    scored = [g for g, e in groups.items() if e["status"] == "ok"]
    for g in scored:
        for m in SCORES:
            groups[g][m] = point.get(("groups", g, m))
        for m in RATES:
            groups[g][m] = point.get(("groups", g, m)) if decided else None
    out: dict = {"attributes": grouping.attributes, "groups": groups, "n_scored_groups": len(scored),
                 "worst_group": {}, "worst": {}, "gap": {}}
    for m in SCORES:
        vals = {g: groups[g][m] for g in scored if groups[g].get(m) is not None}
        out["worst_group"][m] = min(vals, key=vals.get) if vals else None
        out["worst"][m] = point.get(("worst", m)) if vals else None
        out["gap"][m] = point.get(("gap", m))
    for m in RATES:
        out["gap"][m] = point.get(("gap", m))
    out["equalized_odds_difference"] = point.get(("equalized_odds_difference",))
    out["demographic_parity_difference"] = point.get(("demographic_parity_difference",))
    if task_type != "binary":
        per_label: dict[str, dict] = {}
        for name in decided:
            k = label_names.index(name)
            rates: dict[str, dict] = {}
            for g in scored:
                if ("per_label", name, "groups", g, "tpr") not in point:
                    continue
                in_g = (grouping.group_of == g) & ~np.isnan(y[:, k])
                rates[g] = {"n_pos": int((y[in_g, k] == 1).sum()), "n_neg": int((y[in_g, k] == 0).sum()),
                            **{m: point[("per_label", name, "groups", g, m)] for m in RATES}}
            per_label[name] = {
                "groups": rates,
                "gap": {m: point.get(("per_label", name, "gap", m)) for m in RATES},
                "equalized_odds_difference": point.get(("per_label", name, "equalized_odds_difference")),
                "demographic_parity_difference": point.get(("per_label", name, "demographic_parity_difference")),
            }
        out["per_label"] = per_label
    return out


# --------------------------------------------------------------------------- the axis


def fairness_axis(test: Predictions, val: Predictions | None, attributes: list[AttributeSpec], config: ScoringSpec,
                  *, defer: bool = False):
    """(values, builders): point values of every grouping and replicate builders of single attributes. With
    ``defer`` the values come as a function computing them (``values()``), to be run while the replicates are
    (the point values of every grouping and intersection are independent of the bootstrap)."""
    if not attributes:
        return None, []
    multiclass = test.task_type == "multiclass"
    has_val = val is not None and len(val) > 0
    if multiclass:
        points: dict[str, dict | None] = {}
        chosen_on, reason = None, "multiclass: the argmax decision, no threshold"
    elif has_val:
        points = operating_points(val, config)
        chosen_on = "val"
        one_class = [name for name, pt in points.items() if pt is None]
        reason = (f"validation holds one class for {', '.join(one_class)}: no threshold, no decision rates"
                  if one_class else None)
    else:
        points = {name: None for name in test.label_names}
        chosen_on = None
        reason = ("no validation predictions: thresholds are chosen on validation only (never on test), so "
                  "none is chosen and the decision rates (tpr, fpr, fnr, selection_rate, equalized odds, "
                  "demographic parity) are not reported")
    d, has_decision = decisions(test, points)
    gs, unavailable = groupings(test, attributes, config.intersections)
    values: dict = {
        "operating_point": {
            "rule": "argmax" if multiclass else config.threshold,
            "target_sensitivity": config.target_sensitivity if config.threshold == "sensitivity" else None,
            "chosen_on": chosen_on,
            "thresholds": points,
            "reason": reason,
        },
        "min_group_size": config.min_group_size,
        "attributes": dict(unavailable),
    }
    tables = {g.name: group_sizes(g, config) for g in gs}
    scored = {name: [g for g, e in t.items() if e["status"] == "ok"] for name, t in tables.items()}
    builders = [_builder(test, g, scored[g.name], d, has_decision, replicates=True) for g in gs
                if len(g.attributes) == 1 and scored[g.name]]

    def point_values() -> dict:
        """``values`` completed with every grouping's point values (the finalizers at unit weights)."""
        decided = [name for k, name in enumerate(test.label_names) if has_decision[k]]
        every = [_builder(test, g, scored[g.name], d, has_decision) for g in gs if scored[g.name]]
        point = evaluate(len(test), every, None).point
        y = test.y_true()
        for g in gs:
            mine = {k[3:]: v for k, v in point.items() if k[2] == g.name}
            values["attributes"][g.name] = score_grouping(g, tables[g.name], mine, y, test.label_names, decided,
                                                          test.task_type)
        return values

    if not defer:
        return point_values(), builders
    return point_values, builders


def _builder(test, grouping, scored, d, has_decision, replicates: bool = False):
    """The grouping's builder; for the bootstrap (``replicates``) without the per-label detail, which only the
    point values carry."""
    def build(stats: LinearStats):
        f = grouping_rows(stats, test, grouping, scored, d, has_decision)
        return lambda sums: {("fairness", "attributes", grouping.name, *k): v for k, v in f(sums).items()
                             if not (replicates and k[0] == "per_label")}

    return build
