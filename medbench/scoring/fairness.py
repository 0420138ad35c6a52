"""Subgroup fairness: per attribute and per intersection of attributes, on the test split.

Groups. Each attribute of the task (``attributes:`` in the spec) splits the
test images into groups: the column's values, or for a binned attribute
(``bins: [0, 40, 65, 200]``) the bins ``[0, 40)``, ``[40, 65)``, ``[65, 200)``
— every declared bin is reported, also when empty. Missing values form the
group ``(missing)``, values outside the bins ``(out of bins)``.
Intersections cross up to ``scoring.intersections`` attributes (default 2:
every pair), named ``sex=F & age_group=[40, 65)``. A group with fewer than
``scoring.min_group_size`` images is reported with its size and status
``too_small`` (``empty`` with none), never dropped; it is not scored and does
not enter worst-group values or gaps.

Per scored group: ``n``, ``auc`` and ``accuracy`` (the task's definitions:
mean over labels for multilabel, macro one-vs-rest AUC and top-1 accuracy for
multiclass), and at the operating point TPR, FPR, FNR (underdiagnosis) and
selection rate, averaged over labels (per label under ``per_label``).

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

Per grouping: worst group and its value (AUC, accuracy), gaps (max - min over
scored groups; for the rates, per label then averaged), the equalized-odds
difference (fairlearn's definition — between groups, the larger of the TPR
and FPR gaps — per label over the scored groups holding both classes, then
averaged) and the demographic-parity difference of the decisions. The rates
come from one fairlearn ``MetricFrame`` (fairlearn's ``true_positive_rate``
and ``false_positive_rate``; grouping and label as control features; FNR =
1 - TPR and selection rate = (TPR P + FPR N) / (P + N) from the group's class
counts), the differences from its ``by_group`` table (tests check them
against ``equalized_odds_difference`` / ``demographic_parity_difference``),
AUC and accuracy from torchmetrics. A rate with an empty denominator in a
group is undefined (fairlearn would report 0). Gaps are absolute (max - min),
so their intervals sit above 0 by construction; compare the groups' own
intervals to judge a difference. Bootstrap replicates (single attributes;
intersections carry point values only, their groups being small) come from
the same definitions on linear statistics.

An attribute with a single observed value (e.g. one site) is reported but
not crossed with the others (its intersections would repeat their groups).
"""

from __future__ import annotations

import itertools
import warnings
from dataclasses import dataclass

import numpy as np

from medbench.predictions import Predictions
from medbench.scoring.bootstrap import LinearStats, mean_defined, ratio
from medbench.spec import AttributeSpec, ScoringSpec

MISSING = "(missing)"
OUT_OF_BINS = "(out of bins)"
RATES = ("tpr", "fpr", "fnr", "selection_rate")


@dataclass
class Grouping:
    name: str
    attributes: list[str]
    group_of: np.ndarray  # [N] group name per test image
    declared: list[str]  # every group reported, in order


def _fmt(x: float) -> str:
    return f"{x:g}"


def attribute_groups(values: list, attr: AttributeSpec) -> tuple[np.ndarray, list[str]]:
    """Group name per value and the declared groups of one attribute."""
    if attr.bins is not None:
        edges = attr.bins
        names = [f"[{_fmt(a)}, {_fmt(b)})" for a, b in zip(edges, edges[1:])]
        out = []
        for v in values:
            if v is None or (isinstance(v, float) and np.isnan(v)):
                out.append(MISSING)
                continue
            try:
                x = float(v)
            except (TypeError, ValueError):
                out.append(OUT_OF_BINS)
                continue
            i = int(np.searchsorted(edges, x, side="right")) - 1
            out.append(names[i] if 0 <= i < len(names) else OUT_OF_BINS)
        extra = [g for g in (OUT_OF_BINS, MISSING) if g in out]
        return np.asarray(out, dtype=object), names + extra
    out = [MISSING if v is None else str(v) for v in values]
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
        d = np.zeros_like(p)
        d[np.arange(p.shape[0]), p.argmax(1)] = 1.0
        return d, np.ones(p.shape[1], dtype=bool)
    d = np.zeros_like(p)
    has = np.zeros(p.shape[1], dtype=bool)
    for k, name in enumerate(test.label_names):
        pt = points.get(name)
        if pt is not None:
            d[:, k] = (p[:, k] >= pt["threshold"]).astype(np.float64)
            has[k] = True
    return d, has


# --------------------------------------------------------------------------- point values (fairlearn)


def _label_arrays(test: Predictions) -> tuple[np.ndarray, np.ndarray]:
    """Labels ``[N, L]`` (NaN missing; multiclass: one-hot, unlabelled rows NaN) and probabilities."""
    y, p = test.y_true(), test.y_prob()
    if test.task_type == "multiclass":
        y = np.where(np.isnan(y).any(1, keepdims=True), np.nan, y)
    return y, p


def _rate_among(y_true, y_pred, cls: int) -> float:
    """The share of decisions 1 among the images of true class ``cls``: TPR (cls 1), FPR (cls 0); 0.0
    when there is none, as fairlearn's ``true_positive_rate``/``false_positive_rate`` with
    ``pos_label=1`` (they compute it through sklearn's ``confusion_matrix``, whose input checks cost
    milliseconds per call: hundreds of (grouping, label, group) cells per run)."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    of_class = y_true == cls
    return float((y_pred[of_class] == 1).mean()) if of_class.any() else 0.0


def _tpr(y_true, y_pred) -> float:
    return _rate_among(y_true, y_pred, 1)


def _fpr(y_true, y_pred) -> float:
    return _rate_among(y_true, y_pred, 0)


def group_rates(y: np.ndarray, d: np.ndarray, parts: list[tuple[str, np.ndarray, list[str]]],
                label_names: list[str]) -> dict[str, dict[str, dict[str, dict]]]:
    """TPR, FPR, FNR and selection rate of the decisions ``d`` per grouping, label and group, through
    one fairlearn ``MetricFrame`` (grouping and label as control features, the group as sensitive
    feature; the rates as :func:`_tpr`/:func:`_fpr`, equal to fairlearn's own, checked in
    tests/test_scoring_fairness.py). ``parts``: (grouping name, group per image, groups to score). A
    rate whose denominator is empty in a group is None (fairlearn would report 0); FNR = 1 - TPR; the
    selection rate is (TPR P + FPR N) / (P + N)."""
    from fairlearn.metrics import MetricFrame

    ys, ds, gs, ls, ps = [], [], [], [], []
    names = np.asarray(label_names, dtype=object)
    for part, group_of, groups in parts:
        rows, cols = np.nonzero(~np.isnan(y) & np.isin(group_of, groups)[:, None])
        ys.append(y[rows, cols].astype(int))
        ds.append(d[rows, cols].astype(int))
        gs.append(group_of[rows].astype(str))
        ls.append(names[cols].astype(str))
        ps.append(np.full(rows.size, part, dtype=object).astype(str))
    if not ys or sum(a.size for a in ys) == 0:
        return {}
    yk, dk, gk, lk, pk = (np.concatenate(a) for a in (ys, ds, gs, ls, ps))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mf = MetricFrame(metrics={"tpr": _tpr, "fpr": _fpr},
                         y_true=yk, y_pred=dk, sensitive_features={"group": gk},
                         control_features={"grouping": pk, "label": lk})
    key = np.char.add(np.char.add(np.char.add(np.char.add(pk, "\x1f"), lk), "\x1f"), gk)
    uniq, inv = np.unique(key, return_inverse=True)
    n_pos = dict(zip(uniq, np.bincount(inv, weights=(yk == 1)).astype(int).tolist()))
    n_neg = dict(zip(uniq, np.bincount(inv, weights=(yk == 0)).astype(int).tolist()))
    out: dict[str, dict[str, dict[str, dict]]] = {}
    for (part, label, g), row in mf.by_group.iterrows():
        k = f"{part}\x1f{label}\x1f{g}"
        if k not in n_pos:
            continue
        npos, nneg = n_pos[k], n_neg[k]
        tpr = float(row["tpr"]) if npos else None
        fpr = float(row["fpr"]) if nneg else None
        selected = (tpr or 0.0) * npos + (fpr or 0.0) * nneg  # decisions = 1: true plus false positives
        out.setdefault(str(part), {}).setdefault(str(label), {})[str(g)] = {
            "n_pos": npos, "n_neg": nneg, "tpr": tpr, "fpr": fpr, "fnr": 1.0 - tpr if tpr is not None else None,
            "selection_rate": selected / (npos + nneg)}
    return out


def equalized_odds(rates: dict[str, dict]) -> float | None:
    """Equalized-odds difference of one label (fairlearn's ``between_groups``, ``worst_case``): the
    larger of the TPR and FPR gaps over the groups holding both classes."""
    both = [r for r in rates.values() if r["tpr"] is not None and r["fpr"] is not None]
    if len(both) < 2:
        return None
    return max(_gap([r["tpr"] for r in both]), _gap([r["fpr"] for r in both]))


def _gap(values: list[float | None]) -> float | None:
    v = [x for x in values if x is not None]
    return float(max(v) - min(v)) if len(v) >= 2 else None


def _mean(values: list[float | None]) -> float | None:
    v = [x for x in values if x is not None]
    return float(np.mean(v)) if v else None


def group_sizes(test: Predictions, grouping: Grouping, config: ScoringSpec) -> dict[str, dict]:
    """Per declared group: ``n``, ``status`` and, when scored, the task's AUC and accuracy."""
    from medbench.scoring.registry import compute_metrics

    groups: dict[str, dict] = {}
    scored: list[str] = []
    for g in grouping.declared:
        in_g = grouping.group_of == g
        n = int(in_g.sum())
        status = "empty" if n == 0 else ("too_small" if n < config.min_group_size else "ok")
        entry: dict = {"n": n, "status": status}
        if status == "ok":
            scored.append(g)
            sub = test.filter(in_g)
            m = compute_metrics(sub, ["auc", "accuracy"])
            entry["auc"] = m["auc"]
            entry["accuracy"] = m["accuracy"]
        groups[g] = entry
    return groups


def score_grouping(grouping: Grouping, groups: dict[str, dict], rates_by_label: dict[str, dict],
                   decided: list[str], task_type: str) -> dict:
    """Point values of one grouping from its group table and per-label rates."""
    scored = [g for g, e in groups.items() if e["status"] == "ok"]
    per_label: dict[str, dict] = {}
    for name in decided:
        rates = rates_by_label.get(name, {})
        per_label[name] = {
            "groups": rates,
            "gap": {m: _gap([r[m] for r in rates.values()]) for m in RATES},
            "equalized_odds_difference": equalized_odds(rates),
            "demographic_parity_difference": _gap([r["selection_rate"] for r in rates.values()]),
        }
    for g in scored:
        for m in RATES:
            groups[g][m] = _mean([per_label[lab]["groups"].get(g, {}).get(m) for lab in per_label])
    out: dict = {"attributes": grouping.attributes, "groups": groups, "n_scored_groups": len(scored),
                 "worst_group": {}, "worst": {}, "gap": {}}
    for m in ("auc", "accuracy"):
        vals = {g: groups[g][m] for g in scored if groups[g].get(m) is not None}
        out["worst_group"][m] = min(vals, key=vals.get) if vals else None
        out["worst"][m] = min(vals.values()) if vals else None
        out["gap"][m] = _gap(list(vals.values()))
    for m in RATES:
        out["gap"][m] = _mean([per_label[lab]["gap"][m] for lab in per_label])
    out["equalized_odds_difference"] = _mean([per_label[lab]["equalized_odds_difference"] for lab in per_label])
    out["demographic_parity_difference"] = _mean([per_label[lab]["demographic_parity_difference"]
                                                  for lab in per_label])
    if task_type != "binary":
        out["per_label"] = per_label
    return out


# --------------------------------------------------------------------------- replicates (linear statistics)


def grouping_rows(stats: LinearStats, test: Predictions, grouping: Grouping, scored: list[str], d: np.ndarray,
                  has_decision: np.ndarray):
    """Rows of one grouping's scored groups; finalize -> {path-suffix tuple: [b]}."""
    from medbench.scoring.classification import accuracy_rows, auc_rows

    y, p = _label_arrays(test)
    n_labels = len(test.label_names)
    per_group = {}
    for g in scored:
        mask = grouping.group_of == g
        aucs = [auc_rows(stats, y[:, k], p[:, k], mask) for k in range(n_labels)]
        acc = accuracy_rows(stats, test, mask)
        rates = []
        for k in range(n_labels):
            if not has_decision[k]:
                rates.append(None)
                continue
            v = ~np.isnan(y[:, k]) & mask
            yk = np.nan_to_num(y[:, k])
            rates.append((stats.add_sum(v & (yk == 1) & (d[:, k] == 1)), stats.add_sum(v & (yk == 1)),
                          stats.add_sum(v & (yk == 0) & (d[:, k] == 1)), stats.add_sum(v & (yk == 0)),
                          stats.add_sum(v & (d[:, k] == 1)), stats.add_sum(v)))
        per_group[g] = (aucs, acc, rates)

    def finalize(sums: np.ndarray) -> dict[tuple, np.ndarray]:
        out: dict[tuple, np.ndarray] = {}
        label_rates: dict[str, list[dict[str, np.ndarray]]] = {}
        group_auc, group_acc = [], []
        for g, (aucs, acc, rates) in per_group.items():
            a = mean_defined([f(sums) for f in aucs])
            c = acc(sums)["accuracy"]
            out[("groups", g, "auc")] = a
            out[("groups", g, "accuracy")] = c
            group_auc.append(a)
            group_acc.append(c)
            lr = []
            for r in rates:
                if r is None:
                    lr.append(None)
                    continue
                tp, pos, fp, neg, sel, n = (sums[i] for i in r)
                tpr = ratio(tp, pos)
                lr.append({"tpr": tpr, "fpr": ratio(fp, neg), "fnr": 1.0 - tpr, "selection_rate": ratio(sel, n)})
            label_rates[g] = lr
            for m in RATES:
                vals = [x[m] for x in lr if x is not None]
                if vals:
                    out[("groups", g, m)] = mean_defined(vals)
        for m, per in (("auc", group_auc), ("accuracy", group_acc)):
            if per:
                stack = np.vstack(per)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)
                    out[("worst", m)] = np.nanmin(stack, axis=0)
                    # as the point value: a gap needs two groups where the value is defined in that resample
                    ok = np.isfinite(stack).sum(0) >= 2
                    out[("gap", m)] = np.where(ok, np.nanmax(stack, axis=0) - np.nanmin(stack, axis=0), np.nan)
        gaps = {m: [] for m in RATES}
        eods, dps = [], []
        for k in range(n_labels):
            if not has_decision[k] or not scored:
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                per_m = {}
                for m in RATES:
                    stack = np.vstack([label_rates[g][k][m] for g in scored])
                    ok = np.isfinite(stack).sum(0) >= 2
                    per_m[m] = np.where(ok, np.nanmax(stack, 0) - np.nanmin(stack, 0), np.nan)
                    gaps[m].append(per_m[m])
                # equalized odds over groups holding both classes (both rates defined)
                t = np.vstack([label_rates[g][k]["tpr"] for g in scored])
                f = np.vstack([label_rates[g][k]["fpr"] for g in scored])
                both = np.isfinite(t) & np.isfinite(f)
                tt, ff = np.where(both, t, np.nan), np.where(both, f, np.nan)
                ok = both.sum(0) >= 2
                eod = np.maximum(np.nanmax(tt, 0) - np.nanmin(tt, 0), np.nanmax(ff, 0) - np.nanmin(ff, 0))
                eods.append(np.where(ok, eod, np.nan))
                dps.append(per_m["selection_rate"])
        for m in RATES:
            if gaps[m]:
                out[("gap", m)] = mean_defined(gaps[m])
        if eods:
            out[("equalized_odds_difference",)] = mean_defined(eods)
            out[("demographic_parity_difference",)] = mean_defined(dps)
        return out

    return finalize


# --------------------------------------------------------------------------- the axis


def fairness_axis(test: Predictions, val: Predictions | None, attributes: list[AttributeSpec], config: ScoringSpec):
    """(values, builders): point values of every grouping and replicate builders of single attributes."""
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
    tables = {g.name: group_sizes(test, g, config) for g in gs}
    scored = {name: [g for g, e in t.items() if e["status"] == "ok"] for name, t in tables.items()}
    decided = [name for k, name in enumerate(test.label_names) if has_decision[k]]
    y, _ = _label_arrays(test)
    rates = group_rates(y[:, has_decision], d[:, has_decision],
                        [(g.name, g.group_of, scored[g.name]) for g in gs if scored[g.name]], decided) \
        if decided else {}
    builders = []
    for g in gs:
        values["attributes"][g.name] = score_grouping(g, tables[g.name], rates.get(g.name, {}), decided,
                                                      test.task_type)
        if len(g.attributes) == 1 and scored[g.name]:
            builders.append(_builder(test, g, scored[g.name], d, has_decision))
    return values, builders


def _builder(test, grouping, scored, d, has_decision):
    def build(stats: LinearStats):
        f = grouping_rows(stats, test, grouping, scored, d, has_decision)
        return lambda sums: {("fairness", "attributes", grouping.name, *k): v for k, v in f(sums).items()}

    return build
