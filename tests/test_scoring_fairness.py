"""Subgroup fairness: group metrics equal fairlearn's; the threshold never sees the test split; small groups."""

from __future__ import annotations

from functools import partial

import numpy as np
import polars as pl
import pytest
from fairlearn.metrics import (MetricFrame, demographic_parity_difference, equalized_odds_difference,
                               false_negative_rate, false_positive_rate, selection_rate, true_positive_rate)
from sklearn.metrics import roc_auc_score

from medbench.data.base import label_column
from medbench.predictions import Predictions
from medbench.scoring import fairness
from medbench.scoring.bootstrap import Resampling, evaluate
from medbench.scoring.fairness import MISSING, choose_threshold, fairness_axis
from medbench.specs import AttributeSpec, ScoringSpec

ATTRS = [AttributeSpec(name="sex"), AttributeSpec(name="age_group", column="age", bins=[0, 40, 65, 200]),
         AttributeSpec(name="site")]


def _preds(n: int, seed: int, task_type: str = "multilabel", k: int = 3, gap: float = 1.0) -> Predictions:
    rng = np.random.default_rng(seed)
    sex = rng.choice(np.array(["M", "F"]), n)
    age = rng.uniform(18, 64.9, n)  # nobody in [65, 200): a declared, empty subgroup
    if task_type == "multiclass":
        y = np.eye(k)[rng.integers(0, k, n)]
    else:
        y = (rng.random((n, k)) < 0.4).astype(float)
    strength = np.where(sex == "F", 1.5 - gap, 1.5)[:, None]
    z = strength * (2 * y - 1) + rng.standard_normal((n, k))
    if task_type == "multiclass":
        p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    else:
        p = 1 / (1 + np.exp(-z))
        y[rng.random((n, k)) < 0.05] = np.nan
    labels = [f"l{j}" for j in range(k)]
    table = pl.DataFrame({"sample_id": [f"s{seed}-{i}" for i in range(n)], "patient_id": [f"p{i}" for i in range(n)],
                          "sex": [None if i % 50 == 0 else s for i, s in enumerate(sex)], "age": age,
                          "site": ["A"] * n})
    table = table.with_columns(**{label_column(lab): pl.Series([None if np.isnan(v) else int(v) for v in y[:, j]],
                                                               dtype=pl.Int8) for j, lab in enumerate(labels)})
    return Predictions.build(table, p, labels, task_type)


def _fairlearn_reference(test: Predictions, thresholds: dict, column: list, groups: list[str]):
    """Per label: MetricFrame by group, equalized-odds and demographic-parity differences (fairlearn),
    over the scored groups (and, for equalized odds, those holding both classes)."""
    y, p = test.y_true(), test.y_prob()
    g = np.asarray(column, dtype=object)
    out = {}
    for k, name in enumerate(test.label_names):
        keep = ~np.isnan(y[:, k]) & np.isin(g, groups)
        yk = y[keep, k].astype(int)
        dk = (p[keep, k] >= thresholds[name]["threshold"]).astype(int) if test.task_type != "multiclass" \
            else (p[keep].argmax(1) == k).astype(int)
        gk = g[keep].astype(str)
        mf = MetricFrame(metrics={"tpr": partial(true_positive_rate, pos_label=1),
                                  "fpr": partial(false_positive_rate, pos_label=1),
                                  "fnr": partial(false_negative_rate, pos_label=1),
                                  "selection_rate": partial(selection_rate, pos_label=1)},
                         y_true=yk, y_pred=dk, sensitive_features=gk)
        both = [x for x in groups if ((gk == x) & (yk == 1)).any() and ((gk == x) & (yk == 0)).any()]
        sel = np.isin(gk, both)
        out[name] = (mf.by_group,
                     equalized_odds_difference(yk[sel], dk[sel], sensitive_features=gk[sel]),
                     demographic_parity_difference(yk, dk, sensitive_features=gk))
    return out


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("task_type", ["multilabel", "multiclass"])
def test_group_metrics_equal_fairlearn(seed: int, task_type: str) -> None:
    val, test = _preds(300, 100 + seed, task_type), _preds(500, seed, task_type)
    cfg = ScoringSpec(min_group_size=20)
    values, builders = fairness_axis(test, val, ATTRS, cfg)
    sex = values["attributes"]["sex"]
    groups = [g for g, e in sex["groups"].items() if e["status"] == "ok"]
    assert groups == ["F", "M", MISSING][: len(groups)] and "F" in groups and "M" in groups
    thresholds = values["operating_point"]["thresholds"]
    ref = _fairlearn_reference(test, thresholds, test.table["sex"].fill_null(MISSING).to_list(), groups)
    for name, (by_group, eod, dp) in ref.items():
        mine = sex["per_label"][name]
        for g in groups:
            for m in ("tpr", "fpr", "fnr", "selection_rate"):
                assert mine["groups"][g][m] == pytest.approx(by_group.loc[g, m], abs=1e-6), (name, g, m)
        assert mine["equalized_odds_difference"] == pytest.approx(eod, abs=1e-6)
        assert mine["demographic_parity_difference"] == pytest.approx(dp, abs=1e-6)
    # group AUC against sklearn
    y, p = test.y_true(), test.y_prob()
    f = np.asarray(test.table["sex"].to_list()) == "F"
    ref_auc = np.mean([roc_auc_score(y[f & ~np.isnan(y[:, k]), k], p[f & ~np.isnan(y[:, k]), k])
                       for k in range(y.shape[1])])
    assert sex["groups"]["F"]["auc"] == pytest.approx(ref_auc, abs=1e-6)
    # the vectorized (bootstrap) form with unit weights reproduces every point value of the single attributes
    point = evaluate(len(test), builders, None).point
    checked = 0
    for path, v in point.items():
        node = values
        for key in path[1:]:
            node = node[key]
        assert v == pytest.approx(node, abs=1e-6), path
        checked += 1
    assert checked > 30


def test_harder_subgroup_shows_a_gap_with_an_interval() -> None:
    val, test = _preds(400, 7, gap=1.0), _preds(800, 8, gap=1.0)
    values, builders = fairness_axis(test, val, ATTRS, ScoringSpec())
    sex = values["attributes"]["sex"]
    assert sex["worst_group"]["auc"] == "F" and sex["gap"]["auc"] > 0.1
    assert sex["groups"]["F"]["fnr"] > sex["groups"]["M"]["fnr"]  # underdiagnosis of the harder group
    out = evaluate(len(test), builders, Resampling.of(test, n_resamples=200, seed=0, scope="test"))
    reps = out.replicates[("fairness", "attributes", "sex", "gap", "auc")]
    assert np.quantile(reps, 0.025) > 0


def test_empty_missing_and_small_groups_are_reported_not_dropped() -> None:
    val, test = _preds(200, 1), _preds(300, 2)
    values, _ = fairness_axis(test, val, ATTRS, ScoringSpec(min_group_size=20))
    age = values["attributes"]["age_group"]["groups"]
    assert list(age) == ["[0, 40)", "[40, 65)", "[65, 200)"]
    assert age["[65, 200)"] == {"n": 0, "status": "empty"}
    sex = values["attributes"]["sex"]["groups"]
    assert sex[MISSING]["n"] == 6 and sex[MISSING]["status"] == "too_small" and "auc" not in sex[MISSING]
    cross = values["attributes"]["sex & age_group"]["groups"]
    assert cross["sex=F & age_group=[65, 200)"]["status"] == "empty"
    assert "sex & site" not in values["attributes"]  # one site: crossing it would repeat 'sex'
    assert values["attributes"]["site"]["gap"]["auc"] is None  # one group: no gap
    assert sum(e["n"] for e in sex.values()) == 300


def test_missing_attribute_column_is_reported() -> None:
    val, test = _preds(100, 1), _preds(100, 2)
    values, _ = fairness_axis(test, val, [AttributeSpec(name="view")], ScoringSpec())
    assert values["attributes"]["view"]["status"] == "unavailable"


def test_threshold_rules() -> None:
    rng = np.random.default_rng(0)
    y = (rng.random(400) < 0.3).astype(float)
    p = np.clip(0.35 * y + 0.65 * rng.random(400), 0, 1)
    yo = choose_threshold(y, p, "youden", 0.9)
    se = choose_threshold(y, p, "sensitivity", 0.9)
    pred = p >= se["threshold"]
    assert pred[y == 1].mean() >= 0.9 and se["val_tpr"] >= 0.9
    assert (p >= yo["threshold"])[y == 1].mean() - (p >= yo["threshold"])[y == 0].mean() == pytest.approx(
        yo["val_tpr"] - yo["val_fpr"])
    assert choose_threshold(np.zeros(10), rng.random(10), "youden", 0.9) is None


def test_threshold_never_sees_the_test_split(monkeypatch) -> None:
    """The operating threshold is a function of the validation predictions only."""
    val, test = _preds(300, 21), _preds(400, 22)
    seen = []
    real = fairness.choose_threshold

    def spy(y, p, method, target):
        seen.append((y.copy(), p.copy()))
        return real(y, p, method, target)

    monkeypatch.setattr(fairness, "choose_threshold", spy)
    values, _ = fairness_axis(test, val, ATTRS, ScoringSpec())
    assert len(seen) == len(val.label_names)
    yv, pv = val.y_true(), val.y_prob()
    for k, (y, p) in enumerate(seen):
        assert np.array_equal(p, pv[:, k]) and np.array_equal(y, yv[:, k], equal_nan=True)
    # replacing the test predictions leaves the thresholds unchanged; replacing validation changes them
    shuffled = Predictions.build(test.table.drop([c for c in test.table.columns if c.startswith("prob:")]),
                                 np.random.default_rng(0).random(test.y_prob().shape), test.label_names, "multilabel")
    again, _ = fairness_axis(shuffled, val, ATTRS, ScoringSpec())
    assert again["operating_point"] == values["operating_point"]
    other, _ = fairness_axis(test, _preds(300, 23), ATTRS, ScoringSpec())
    assert other["operating_point"] != values["operating_point"]


def test_parity_is_measured_on_decisions_not_scores() -> None:
    """fairlearn's demographic parity of raw scores is silently 0; on thresholded decisions it is not."""
    val, test = _preds(300, 31, gap=1.2), _preds(600, 32, gap=1.2)
    values, _ = fairness_axis(test, val, ATTRS, ScoringSpec())
    sex = np.asarray(test.table["sex"].fill_null(MISSING).to_list())
    keep = sex != MISSING
    y, p = test.y_true(), test.y_prob()
    ok = keep & ~np.isnan(y[:, 0])
    raw = demographic_parity_difference(y[ok, 0], p[ok, 0], sensitive_features=sex[ok])
    assert raw == 0.0
    assert values["attributes"]["sex"]["per_label"]["l0"]["demographic_parity_difference"] > 0.0
