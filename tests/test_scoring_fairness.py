"""Subgroup fairness: group metrics equal fairlearn's; the threshold never sees the test split; small groups."""

from __future__ import annotations

from functools import partial

import numpy as np
import polars as pl
import pytest
from fairlearn.metrics import (
    MetricFrame,
    demographic_parity_difference,
    equalized_odds_difference,
    false_negative_rate,
    false_positive_rate,
    selection_rate,
    true_positive_rate,
)
from sklearn.metrics import roc_auc_score

from medbench.data.base import label_column
from medbench.predictions import Predictions
from medbench.scoring import fairness
from medbench.scoring.bootstrap import Resampling, evaluate
from medbench.scoring.fairness import MISSING, choose_threshold, fairness_axis
from medbench.spec import AttributeSpec, ScoringSpec

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


@pytest.mark.parametrize("val_kind", ["none", "empty"])
def test_without_validation_no_threshold_is_claimed(val_kind: str) -> None:
    """No validation predictions: the operating point says no threshold was chosen and why (never 'val'),
    no decision rate is reported, AUC and accuracy per group still are, and the bootstrap has no rate."""
    val_full, test = _preds(200, 41), _preds(400, 42)
    val = None if val_kind == "none" else val_full.filter(np.zeros(len(val_full), dtype=bool))
    values, builders = fairness_axis(test, val, ATTRS, ScoringSpec())
    op = values["operating_point"]
    assert op["chosen_on"] is None and op["thresholds"] == {name: None for name in test.label_names}
    assert "no validation predictions" in op["reason"]
    sex = values["attributes"]["sex"]
    for g in ("F", "M"):
        assert sex["groups"][g]["auc"] is not None and sex["groups"][g]["accuracy"] is not None
        assert all(sex["groups"][g][m] is None for m in ("tpr", "fpr", "fnr", "selection_rate"))
    assert sex["equalized_odds_difference"] is None and sex["demographic_parity_difference"] is None
    assert sex["gap"]["auc"] is not None and sex["gap"]["tpr"] is None
    keys = set(evaluate(len(test), builders, None).point)
    assert ("fairness", "attributes", "sex", "groups", "F", "auc") in keys
    assert not any(k[-1] in ("tpr", "fpr", "fnr", "selection_rate", "equalized_odds_difference") for k in keys)
    # with validation predictions the same call reports thresholds chosen on 'val', no reason
    with_val, _ = fairness_axis(test, val_full, ATTRS, ScoringSpec())
    op = with_val["operating_point"]
    assert op["chosen_on"] == "val" and op["reason"] is None
    assert all(t is not None and 0 <= t["threshold"] <= 1 for t in op["thresholds"].values())
    assert with_val["attributes"]["sex"]["groups"]["F"]["tpr"] is not None


def test_operating_point_of_multiclass_and_of_a_one_class_validation_label() -> None:
    val, test = _preds(200, 51, "multiclass"), _preds(300, 52, "multiclass")
    op = fairness_axis(test, val, ATTRS, ScoringSpec())[0]["operating_point"]
    assert op["rule"] == "argmax" and op["chosen_on"] is None and op["thresholds"] == {} and "argmax" in op["reason"]
    val, test = _preds(200, 53), _preds(300, 54)
    y = val.y_true()
    y[:, 1] = 0.0
    val = Predictions.build(val.table.drop([c for c in val.table.columns if c.startswith(("prob:", "label:"))])
                            .with_columns(**{label_column(f"l{j}"): pl.Series([None if np.isnan(v) else int(v)
                                                                                for v in y[:, j]], dtype=pl.Int8)
                                             for j in range(3)}), val.y_prob(), val.label_names, "multilabel")
    values = fairness_axis(test, val, ATTRS, ScoringSpec())[0]
    op = values["operating_point"]
    assert op["chosen_on"] == "val" and op["thresholds"]["l1"] is None and op["thresholds"]["l0"] is not None
    assert "l1" in op["reason"] and "l0" not in op["reason"]
    assert set(values["attributes"]["sex"]["per_label"]) == {"l0", "l2"}


def test_auc_gap_replicate_is_undefined_when_one_group_is() -> None:
    """A resample where the small group's AUC is undefined (it drew none of its one positive) has no AUC gap
    and no worst group (NaN, counted in n_undefined), not a gap of 0 nor the other group's value."""
    rng = np.random.default_rng(3)
    n = 300
    sex = np.array(["F"] * 25 + ["M"] * (n - 25))
    y = (rng.random(n) < 0.4).astype(float)
    y[:25] = 0.0
    y[0] = 1.0  # the women hold one positive
    p = 1 / (1 + np.exp(-(1.5 * (2 * y - 1) + rng.standard_normal(n))))
    table = pl.DataFrame({"sample_id": [f"s{i}" for i in range(n)], "sex": sex.tolist()}).with_columns(
        **{label_column("l0"): pl.Series(y.astype(np.int8))})
    test = Predictions.build(table, p[:, None], ["l0"], "binary")
    values, builders = fairness_axis(test, test, [AttributeSpec(name="sex")], ScoringSpec(min_group_size=20))
    assert values["attributes"]["sex"]["gap"]["auc"] is not None
    reps = evaluate(n, builders, Resampling.of(test, n_resamples=200, seed=0, scope="test")).replicates
    f_auc = reps[("fairness", "attributes", "sex", "groups", "F", "auc")]
    gap = reps[("fairness", "attributes", "sex", "gap", "auc")]
    lost = np.isnan(f_auc)
    assert 10 < lost.sum() < 190  # some resamples lose the positive, most keep it
    assert np.isnan(gap[lost]).all() and np.isfinite(gap[~lost]).all()
    worst = reps[("fairness", "attributes", "sex", "worst", "auc")]
    assert np.isnan(worst[lost]).all() and np.isfinite(worst[~lost]).all()


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
