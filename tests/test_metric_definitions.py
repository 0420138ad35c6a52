"""One definition per metric (issue 14, "the principle behind the fixes"): for every registered metric and every
axis value, on randomized binary, multiclass and multilabel predictions (missing labels, ties, one-class labels,
multiclass rows without a scored class, subgroups with missing values, patients with several images), the point
value equals the bootstrap form at unit weights and equals an independent oracle (scikit-learn, netcal,
fairlearn, torch or a hand formula).

The registry is iterated: a metric registered without an oracle here fails ``test_every_metric_has_an_oracle``.
"""

from __future__ import annotations

import warnings
from functools import partial

import numpy as np
import polars as pl
import pytest
import torch
import torch.nn.functional as F
from fairlearn.metrics import (
    MetricFrame,
    demographic_parity_difference,
    equalized_odds_difference,
    false_positive_rate,
    selection_rate,
    true_positive_rate,
)
from netcal.metrics import ECE, MCE
from sklearn.metrics import accuracy_score, balanced_accuracy_score, brier_score_loss, log_loss, roc_auc_score

from medbench.data.base import label_column
from medbench.predictions import Predictions
from medbench.scoring import compute_metrics, get_metric, metric_names
from medbench.scoring.bootstrap import Resampling, evaluate
from medbench.scoring.calibration import calibration_axis
from medbench.scoring.fairness import MISSING, fairness_axis
from medbench.scoring.registry import loop_values
from medbench.scoring.shift import shift_axis
from medbench.spec import AttributeSpec, ScoringSpec

ATTRS = [AttributeSpec(name="sex"), AttributeSpec(name="age_group", column="age", bins=[0, 40, 65, 200])]
TOL = 1e-9


# --------------------------------------------------------------------------- randomized predictions


def random_case(task_type: str, seed: int, *, logits: bool = True) -> Predictions:
    """Predictions with the awkward cases: missing labels, tied scores, a one-class label (some seeds),
    multiclass rows without a scored class or with a missing label, missing attribute values (null, NaN),
    several images per patient, very confident logits."""
    rng = np.random.default_rng([seed, {"binary": 1, "multilabel": 2, "multiclass": 3}[task_type]])
    n = int(rng.integers(60, 180))
    k = {"binary": 1, "multilabel": 4, "multiclass": int(rng.integers(2, 5))}[task_type]
    if task_type == "multiclass":
        cls = rng.integers(0, k, n)
        y = np.eye(k)[cls]
        y[rng.random(n) < 0.12] = 0.0  # a class outside the scored set
        y[rng.random(n) < 0.05] = np.nan  # missing label
        z = rng.normal(0, 1.5, (n, k)) + 1.5 * np.nan_to_num(y)
    else:
        y = (rng.random((n, k)) < rng.uniform(0.15, 0.6, k)).astype(float)
        if seed % 3 == 0:
            y[:, -1] = 0.0  # a label with one class in the scored set
        z = rng.normal(0, 1.5, (n, k)) + 1.5 * (2 * y - 1)
        y[rng.random((n, k)) < 0.1] = np.nan
    if seed % 2:
        z = np.round(z)  # heavy ties
    z[rng.random(z.shape) < 0.05] *= 15  # confident (saturating in float32 probabilities)
    patients = np.sort(rng.integers(0, int(n * 0.7), n))
    sex = rng.choice(np.array(["F", "M"], dtype=object), n)
    sex[rng.random(n) < 0.08] = None
    age = rng.uniform(18, 90, n)
    age[rng.random(n) < 0.06] = np.nan
    labels = [f"c{j}" for j in range(k)]
    table = pl.DataFrame({"sample_id": [f"s{seed}-{i}" for i in range(n)], "patient_id": [f"p{x}" for x in patients],
                          "sex": pl.Series(sex.tolist(), dtype=pl.Utf8), "age": age})
    table = table.with_columns(**{label_column(lab): pl.Series([None if np.isnan(v) else int(v) for v in y[:, j]],
                                                               dtype=pl.Int8) for j, lab in enumerate(labels)})
    if logits:
        return Predictions.from_logits(table, z.astype(np.float32), labels, task_type)
    probs = (torch.softmax(torch.from_numpy(z), 1) if task_type == "multiclass" else torch.sigmoid(torch.from_numpy(z)))
    return Predictions.build(table, probs.numpy().astype(np.float32).astype(np.float64), labels, task_type)


# --------------------------------------------------------------------------- independent oracles


def _arrays(preds: Predictions):
    """Labels, float64 probabilities and the labelled multiclass rows, computed here from the stored columns."""
    labels = preds.table.select([label_column(n) for n in preds.label_names]).cast(pl.Float64).to_numpy()
    logit_cols = [f"logit:{n}" for n in preds.label_names]
    if all(c in preds.table.columns for c in logit_cols):
        z = torch.from_numpy(preds.table.select(logit_cols).to_numpy().astype(np.float64))
        p = (torch.softmax(z, 1) if preds.task_type == "multiclass" else torch.sigmoid(z)).numpy()
    else:
        z, p = None, preds.table.select([f"prob:{n}" for n in preds.label_names]).to_numpy().astype(np.float64)
    labelled = None
    if preds.task_type == "multiclass":
        labelled = np.array([not np.isnan(r).any() and (r == 1).sum() == 1 and ((r == 0) | (r == 1)).all()
                             for r in labels])
    return labels, p, z, labelled


def _mean(values):
    v = [x for x in values if x is not None]
    return float(np.mean(v)) if v else None


def _auc(y, s):
    return roc_auc_score(y, s) if len(np.unique(y)) == 2 else None


def oracle_auc(preds: Predictions, cfg: ScoringSpec) -> dict:
    y, p, z, lab = _arrays(preds)
    score = p if z is None else (torch.log_softmax(z, 1).numpy() if preds.task_type == "multiclass" else z.numpy())
    per = {}
    for k, name in enumerate(preds.label_names):
        keep = lab if lab is not None else ~np.isnan(y[:, k])
        per[name] = _auc(y[keep, k], score[keep, k])
    out = {"auc": _mean(per.values())}
    if preds.task_type != "binary":
        out.update({f"auc/{n}": v for n, v in per.items()})
    return out


def _decisions(p):
    return (p > 0.5).astype(int)


def oracle_accuracy(preds: Predictions, cfg: ScoringSpec) -> dict:
    y, p, z, lab = _arrays(preds)
    if preds.task_type == "multiclass":
        return {"accuracy": accuracy_score(y[lab].argmax(1), p[lab].argmax(1)) if lab.any() else None}
    per = {}
    for k, name in enumerate(preds.label_names):
        keep = ~np.isnan(y[:, k])
        per[name] = accuracy_score(y[keep, k], _decisions(p[keep, k])) if keep.any() else None
    out = {"accuracy": _mean(per.values())}
    if preds.task_type == "multilabel":
        out.update({f"accuracy/{n}": v for n, v in per.items()})
    return out


def oracle_balanced_accuracy(preds: Predictions, cfg: ScoringSpec) -> dict:
    y, p, z, lab = _arrays(preds)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns when a class is absent: it averages over those present
        if preds.task_type == "multiclass":
            return {"balanced_accuracy": balanced_accuracy_score(y[lab].argmax(1), p[lab].argmax(1))
                    if lab.any() else None}
        per = {}
        for k, name in enumerate(preds.label_names):
            keep = ~np.isnan(y[:, k])
            per[name] = balanced_accuracy_score(y[keep, k], _decisions(p[keep, k])) if keep.any() else None
    out = {"balanced_accuracy": _mean(per.values())}
    if preds.task_type == "multilabel":
        out.update({f"balanced_accuracy/{n}": v for n, v in per.items()})
    return out


def _binned_by_hand(conf, outcome, edges):
    """ECE and MCE by a loop over the bins (rule [e_i, e_i+1), last bin closed), for bins netcal cannot make."""
    eps = np.finfo(np.float64).eps
    c = np.clip(conf, eps, 1 - eps)
    ece, mce = 0.0, 0.0
    for i in range(len(edges) - 1):
        last = i == len(edges) - 2
        inside = (c >= edges[i]) & ((c <= edges[i + 1]) if last else (c < edges[i + 1]))
        if inside.any():
            gap = abs(outcome[inside].mean() - c[inside].mean())
            ece += inside.mean() * gap
            mce = max(mce, gap)
    return ece, mce


def _binned(conf, outcome, cfg: ScoringSpec):
    if conf.size == 0:
        return None, None
    if cfg.ece_binning == "uniform":
        return (float(ECE(bins=cfg.ece_bins).measure(conf, outcome)), float(MCE(bins=cfg.ece_bins).measure(conf, outcome)))
    eps = np.finfo(np.float64).eps
    edges = np.quantile(np.clip(conf, eps, 1 - eps), np.linspace(0, 1, cfg.ece_bins + 1))
    edges[0], edges[-1] = 0.0, 1.0
    return _binned_by_hand(conf, outcome, np.unique(edges))


def _calibration_oracle(preds: Predictions, cfg: ScoringSpec, which: str) -> dict:
    y, p, z, lab = _arrays(preds)
    out: dict = {}
    if preds.task_type == "multiclass":
        if which in ("ece", "mce"):
            if not lab.any():
                return {which: None}
            # netcal's own multiclass path is the top-label confidence against top-1 correctness
            conf, correct = p[lab].max(1), (p[lab].argmax(1) == y[lab].argmax(1)).astype(int)
            out[which] = _binned(conf, correct, cfg)[0 if which == "ece" else 1]
        elif which == "brier":  # the sum over classes (scikit-learn halves it for two columns)
            out["brier"] = float(((p[lab] - y[lab]) ** 2).sum(1).mean()) if lab.any() else None
        else:
            out["nll"] = ((float(F.cross_entropy(z[lab], torch.from_numpy(y[lab].argmax(1)))) if z is not None
                           else float(log_loss(y[lab].argmax(1), p[lab], labels=list(range(p.shape[1])))))
                          if lab.any() else None)
        return out
    per = {}
    for k, name in enumerate(preds.label_names):
        keep = ~np.isnan(y[:, k])
        yk, pk = y[keep, k].astype(int), p[keep, k]
        if not keep.any():
            per[name] = None
        elif which in ("ece", "mce"):
            per[name] = _binned(pk, yk, cfg)[0 if which == "ece" else 1]
        elif which == "brier":
            per[name] = float(brier_score_loss(yk, pk, pos_label=1)) if len(np.unique(yk)) > 1 else \
                float(np.mean((pk - yk) ** 2))
        elif z is not None:
            per[name] = float(F.binary_cross_entropy_with_logits(z[keep, k], torch.from_numpy(yk.astype(np.float64))))
        else:
            per[name] = float(log_loss(yk, pk, labels=[0, 1]))
    out[which] = _mean(per.values())
    if preds.task_type == "multilabel":
        out.update({f"{which}/{n}": v for n, v in per.items()})
    return out


ORACLES = {
    "auc": oracle_auc,
    "accuracy": oracle_accuracy,
    "balanced_accuracy": oracle_balanced_accuracy,
    "ece": partial(_calibration_oracle, which="ece"),
    "mce": partial(_calibration_oracle, which="mce"),
    "brier": partial(_calibration_oracle, which="brier"),
    "nll": partial(_calibration_oracle, which="nll"),
}


class UnitResampling(Resampling):
    """One 'resample' that draws every unit once: the bootstrap form at unit weights."""

    def counts(self, chunk=None, *, reuse=False):
        yield np.ones((self.n_units, 1))


def unit_resampling(preds: Predictions) -> Resampling:
    r = Resampling.of(preds, n_resamples=1, seed=0, scope="test")
    return UnitResampling(**{f: getattr(r, f) for f in r.__dataclass_fields__})


def _close(a, b, what) -> None:
    if a is None or b is None:
        assert a is None and b is None, (what, a, b)
    else:
        assert a == pytest.approx(b, abs=TOL, rel=1e-9), (what, a, b)


# --------------------------------------------------------------------------- the metrics


def test_every_metric_has_an_oracle() -> None:
    missing = sorted(set(metric_names()) - set(ORACLES))
    assert not missing, f"registered metrics without an independent oracle in {__file__}: {missing}"


CASES = [(t, s, logits) for t in ("binary", "multilabel", "multiclass") for s in range(6) for logits in (True, False)]


@pytest.mark.parametrize("task_type,seed,logits", CASES)
def test_every_metric_point_equals_unit_weights_and_oracle(task_type: str, seed: int, logits: bool) -> None:
    preds = random_case(task_type, seed, logits=logits)
    cfg = ScoringSpec(ece_bins=int(np.random.default_rng(seed).integers(5, 16)),
                      ece_binning="adaptive" if seed % 2 else "uniform")
    unit = unit_resampling(preds)
    for name in metric_names():
        d = get_metric(name)
        if task_type not in d.task_types:
            continue
        point = compute_metrics(preds, [name], cfg)
        if d.linear:
            reps = evaluate(len(preds), [d.builder(preds, cfg)], unit).replicates
        else:
            reps = loop_values(preds, [d], cfg, unit)[1]
        ref = ORACLES[name](preds, cfg)
        assert set(point) == set(ref), (name, sorted(point), sorted(ref))
        for key, v in point.items():
            rep = reps[key][0]
            _close(v, None if not np.isfinite(rep) else float(rep), (name, key, "unit weights"))
            _close(v, ref[key], (name, key, "oracle"))


# --------------------------------------------------------------------------- the axes


def _scaled(preds: Predictions, temps: dict) -> Predictions:
    """The test predictions with the fitted temperatures applied, computed here (logits / T)."""
    y, p, z, lab = _arrays(preds)
    zz = (z.numpy() if z is not None else (np.log(np.clip(p, 2.2e-16, 1 - 2.2e-16)) if preds.task_type == "multiclass"
                                            else np.log(np.clip(p, 2.2e-16, 1)) - np.log1p(-np.clip(p, 0, 1 - 2.2e-16))))
    zz = zz.copy()
    for k, name in enumerate(preds.label_names):
        t = temps.get("all" if preds.task_type == "multiclass" else name)
        if t is not None:
            zz[:, k] = zz[:, k] / t
    meta = preds.table.drop([c for c in preds.table.columns if c.startswith(("prob:", "logit:"))])
    return Predictions.from_logits(meta, zz, preds.label_names, preds.task_type)


def _flat(tree: dict, prefix: tuple = ()) -> dict[tuple, float | None]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, (*prefix, k)))
        elif isinstance(v, (int, float)) or v is None:
            out[(*prefix, k)] = v
    return out


@pytest.mark.parametrize("task_type,seed", [(t, s) for t in ("binary", "multilabel", "multiclass") for s in range(4)])
def test_calibration_axis_values(task_type: str, seed: int) -> None:
    test, val = random_case(task_type, seed), random_case(task_type, seed + 50)
    cfg = ScoringSpec(ece_binning="adaptive" if seed % 2 else "uniform")
    values, builders, after = calibration_axis(test, val, cfg)
    unit = evaluate(len(test), builders, unit_resampling(test)).replicates
    scaled = _scaled(test, values["temperature"])
    for which, preds in (("before", test), ("after", scaled)):
        for metric in ("ece", "mce", "brier", "nll"):
            ref = ORACLES[metric](preds, cfg)
            for key, v in values[which].items():
                if key == metric or key.startswith(metric + "/"):
                    _close(v, ref[key], (which, key, "oracle"))
                    rep = unit[("calibration", which, key)][0]
                    _close(v, float(rep) if np.isfinite(rep) else None, (which, key, "unit weights"))


def _groups_of(preds: Predictions, attr: AttributeSpec) -> np.ndarray:
    values = preds.table[attr.source_column].to_list()
    out = []
    for v in values:
        if v is None or (isinstance(v, float) and np.isnan(v)):
            out.append(MISSING)
        elif attr.bins:
            e = attr.bins
            i = int(np.searchsorted(e, float(v), side="right")) - 1
            out.append(f"[{e[i]:g}, {e[i + 1]:g})" if 0 <= i < len(e) - 1 else "(out of bins)")
        else:
            out.append(str(v))
    return np.asarray(out, dtype=object)


def _rate(fn, y, d):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(fn(y, d, pos_label=1))


@pytest.mark.parametrize("task_type,seed", [(t, s) for t in ("binary", "multilabel", "multiclass") for s in range(2)])
def test_fairness_axis_values(task_type: str, seed: int) -> None:
    """Every fairness value of every grouping (intersections too) against sklearn (AUC, accuracy) and fairlearn
    (rates, equalized-odds and demographic-parity differences), and against the bootstrap form at unit weights."""
    test, val = random_case(task_type, seed), random_case(task_type, seed + 70)
    cfg = ScoringSpec(min_group_size=8)
    values, builders = fairness_axis(test, val, ATTRS, cfg)
    unit = evaluate(len(test), builders, unit_resampling(test)).replicates
    y, p, z, lab = _arrays(test)
    ops = values["operating_point"]["thresholds"]
    if task_type == "multiclass":
        d = np.eye(p.shape[1])[p.argmax(1)]
        decided = list(range(p.shape[1]))
        yy = np.where(lab[:, None], y, np.nan)
    else:
        decided = [k for k, n in enumerate(test.label_names) if ops.get(n) is not None]
        d = np.column_stack([(p[:, k] >= ops[n]["threshold"]) if ops.get(n) else np.zeros(len(p), bool)
                             for k, n in enumerate(test.label_names)]).astype(int)
        yy = y
    singles = {a.name: _groups_of(test, a) for a in ATTRS}
    checked = 0
    for gname, block in values["attributes"].items():
        parts = gname.split(" & ")
        group_of = singles[parts[0]] if len(parts) == 1 else np.asarray(
            [" & ".join(f"{a}={singles[a][i]}" for a in parts) for i in range(len(test))], dtype=object)
        scored = [g for g, e in block["groups"].items() if e["status"] == "ok"]
        assert sorted(scored) == sorted(g for g in set(group_of) if (group_of == g).sum() >= cfg.min_group_size)
        group_scores = {}
        for g in scored:
            sub = test.filter(group_of == g)
            for m in ("auc", "accuracy", "balanced_accuracy"):
                ref = ORACLES[m](sub, cfg)[m]
                _close(block["groups"][g][m], ref, (gname, g, m))
                group_scores.setdefault(m, {})[g] = ref
                checked += 1
        for m, per in group_scores.items():
            defined = {g: v for g, v in per.items() if v is not None}
            _close(block["worst"][m], min(defined.values()) if defined else None, (gname, "worst", m))
            _close(block["gap"][m], max(defined.values()) - min(defined.values()) if len(defined) >= 2 else None,
                   (gname, "gap", m))
        # rates per label and group (fairlearn), gaps, equalized odds and demographic parity
        label_gaps = {m: [] for m in ("tpr", "fpr", "fnr", "selection_rate")}
        eods, dps = [], []
        for k in decided:
            keep = ~np.isnan(yy[:, k]) & np.isin(group_of, scored)
            yk, dk, gk = yy[keep, k].astype(int), d[keep, k], group_of[keep].astype(str)
            present = sorted(set(gk))
            rates = {}
            for g in present:
                sel = gk == g
                pos, neg = (yk[sel] == 1).any(), (yk[sel] == 0).any()
                tpr = _rate(true_positive_rate, yk[sel], dk[sel]) if pos else None
                rates[g] = {"tpr": tpr, "fpr": _rate(false_positive_rate, yk[sel], dk[sel]) if neg else None,
                            "fnr": None if tpr is None else 1 - tpr,
                            "selection_rate": _rate(selection_rate, yk[sel], dk[sel])}
            mf = MetricFrame(metrics={"sel": partial(selection_rate, pos_label=1)}, y_true=yk, y_pred=dk,
                             sensitive_features=gk)
            for g in present:
                assert rates[g]["selection_rate"] == pytest.approx(mf.by_group.loc[g, "sel"], abs=TOL)
            if task_type != "binary":
                mine = block["per_label"][test.label_names[k]]
                for g in present:
                    for m, v in rates[g].items():
                        _close(mine["groups"][g][m], v, (gname, k, g, m))
                        checked += 1
            for m in label_gaps:
                vals = [r[m] for r in rates.values() if r[m] is not None]
                label_gaps[m].append(max(vals) - min(vals) if len(vals) >= 2 else None)
            both = [g for g in present if rates[g]["tpr"] is not None and rates[g]["fpr"] is not None]
            sel = np.isin(gk, both)
            eods.append(float(equalized_odds_difference(yk[sel], dk[sel], sensitive_features=gk[sel]))
                        if len(both) >= 2 else None)
            dps.append(float(demographic_parity_difference(yk, dk, sensitive_features=gk)) if len(present) >= 2 else None)
        if decided:
            for m, gaps in label_gaps.items():
                _close(block["gap"][m], _mean(gaps), (gname, "gap", m))
            _close(block["equalized_odds_difference"], _mean(eods), (gname, "eod"))
            _close(block["demographic_parity_difference"], _mean(dps), (gname, "dp"))
        # the bootstrap form at unit weights (single attributes are resampled)
        if len(parts) == 1:
            for path, v in _flat({k: block[k] for k in ("groups", "worst", "gap")}).items():
                rep = unit.get(("fairness", "attributes", gname, *path))
                if rep is not None:
                    _close(v, float(rep[0]) if np.isfinite(rep[0]) else None, (gname, path, "unit weights"))
                    checked += 1
    assert checked > 20


@pytest.mark.parametrize("task_type,seed", [(t, s) for t in ("binary", "multilabel", "multiclass") for s in range(3)])
def test_shift_axis_values(task_type: str, seed: int) -> None:
    """The in-distribution side on the target's labels (multiclass: renormalized over them, rows of other classes
    not labelled), the target value, the drop and the relative drop."""
    test, target = random_case(task_type, seed), random_case(task_type, seed + 90)
    labels = test.label_names[:-1] if len(test.label_names) > 2 else test.label_names
    target = target.select_labels(labels)
    metrics = ["auc", "accuracy"]
    cfg = ScoringSpec()
    tscores = compute_metrics(target, metrics, cfg)
    values, builders, loops = shift_axis(test, {"site-b": (target, tscores, {"task": "t-b"})}, metrics, cfg)
    unit = evaluate(len(test), builders, unit_resampling(test)).replicates
    # the restriction, by hand: renormalized probabilities over the kept classes
    y, p, z, lab = _arrays(test)
    idx = [test.label_names.index(n) for n in labels]
    meta = test.table.drop([c for c in test.table.columns if c.startswith(("prob:", "logit:", "label:"))])
    meta = meta.with_columns(**{label_column(n): test.table[label_column(n)] for n in labels})
    q = p[:, idx] / p[:, idx].sum(1, keepdims=True) if task_type == "multiclass" else p[:, idx]
    id_preds = Predictions.build(meta, q, labels, task_type)
    for m in metrics:
        ref_i = ORACLES[m](id_preds, cfg)[m]
        ref_t = ORACLES[m](target, cfg)[m]
        e = values["site-b"][m]
        _close(e["in_distribution"], ref_i, (m, "in_distribution"))
        _close(e["target"], ref_t, (m, "target"))
        drop = None if ref_i is None or ref_t is None else ref_i - ref_t
        _close(e["drop"], drop, (m, "drop"))
        _close(e["relative_drop"], drop / ref_i if drop is not None and ref_i else None, (m, "relative_drop"))
        rep = unit[("shift", "site-b", m, "in_distribution")][0]
        _close(e["in_distribution"], float(rep) if np.isfinite(rep) else None, (m, "unit weights"))
