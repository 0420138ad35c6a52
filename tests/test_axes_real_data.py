"""Fairness by sex and age bin, and calibration, for a real model on real radiographs (../shared/data).

The NIH ChestX-ray14 sample is read here directly from its official layout (the dataset adapters are a
separate stage); the model is a logistic regression per finding on downsampled pixels, trained on a
patient-grouped split. Scoring then runs exactly as for a fine-tuned backbone.
"""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from conftest import shared_data

from medbench.data.base import DatasetIndex, label_column
from medbench.data.image_io import read_image
from medbench.data.splits import assign_splits
from medbench.predictions import Predictions
from medbench.scoring import compute_metrics
from medbench.scoring.bootstrap import Resampling, evaluate
from medbench.scoring.calibration import calibration_axis, reliability_png
from medbench.scoring.fairness import fairness_axis
from medbench.spec import AttributeSpec, ScoringSpec, SplitSpec

pytestmark = pytest.mark.shared
FINDINGS = ["Effusion", "Infiltration", "Atelectasis", "Cardiomegaly"]


@pytest.fixture(scope="module")
def nih_predictions() -> tuple[Predictions, Predictions]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    root = shared_data("nih-cxr-1000")
    raw = pl.read_csv(root / "Data_Entry_2017_v2020.csv")
    findings = [set(s.split("|")) for s in raw["Finding Labels"].to_list()]
    table = pl.DataFrame({
        "sample_id": raw["Image Index"], "patient_id": raw["Patient ID"].cast(pl.Utf8),
        "path": [f"images/{n}" for n in raw["Image Index"].to_list()],
        "sex": raw["Patient Gender"], "age": raw["Patient Age"].cast(pl.Float64), "view": raw["View Position"],
        **{label_column(f): pl.Series([int(f in s) for s in findings], dtype=pl.Int8) for f in FINDINGS},
    })
    index = DatasetIndex(name="nih-cxr-1000", table=table, label_names=FINDINGS, root=root)
    split = assign_splits(index, SplitSpec(fractions={"train": 0.6, "val": 0.15, "test": 0.25}), where="test")
    table = table.with_columns(split)
    pixels = []
    for rel in table["path"].to_list():
        img = read_image(root / rel).astype(np.float32)
        img = img.mean(-1) if img.ndim == 3 else img
        pixels.append(img.reshape(16, img.shape[0] // 16, 16, img.shape[1] // 16).mean((1, 3)).ravel())
    x = np.vstack(pixels)
    y = table.select([label_column(f) for f in FINDINGS]).to_numpy().astype(float)
    is_ = {s: (table["split"] == s).to_numpy() for s in ("train", "val", "test")}
    scaler = StandardScaler().fit(x[is_["train"]])
    xs = scaler.transform(x)
    probs = np.column_stack([LogisticRegression(C=0.05, max_iter=2000).fit(xs[is_["train"]], y[is_["train"], k])
                             .predict_proba(xs)[:, 1] for k in range(len(FINDINGS))])
    meta = table.drop("path")
    return tuple(Predictions.build(meta.filter(pl.Series(is_[s])), probs[is_[s]], FINDINGS, "multilabel")
                 for s in ("val", "test"))


def test_fairness_by_sex_and_age_for_a_real_model(nih_predictions) -> None:
    val, test = nih_predictions
    assert set(val.table["patient_id"].to_list()).isdisjoint(test.table["patient_id"].to_list())
    auc = compute_metrics(test, ["auc"])["auc"]
    assert 0.55 < auc < 0.95  # a real, imperfect model
    attrs = [AttributeSpec(name="sex"), AttributeSpec(name="age_group", column="age", bins=[0, 40, 65, 120])]
    values, builders = fairness_axis(test, val, attrs, ScoringSpec(min_group_size=20))
    sex = values["attributes"]["sex"]
    assert {g: e["status"] for g, e in sex["groups"].items()} == {"F": "ok", "M": "ok"}
    assert sum(e["n"] for e in sex["groups"].values()) == len(test)
    for g in ("F", "M"):
        assert 0.4 < sex["groups"][g]["auc"] < 1.0 and sex["groups"][g]["tpr"] is not None
    assert sex["gap"]["auc"] is not None and sex["equalized_odds_difference"] is not None
    age = values["attributes"]["age_group"]["groups"]
    assert list(age) == ["[0, 40)", "[40, 65)", "[65, 120)"] and sum(e["n"] for e in age.values()) == len(test)
    assert age["[40, 65)"]["status"] == "ok" and age["[0, 40)"]["status"] in ("ok", "too_small")
    assert all(t is not None for t in values["operating_point"]["thresholds"].values())
    assert "sex & age_group" in values["attributes"]
    out = evaluate(len(test), builders, Resampling.of(test, n_resamples=200, seed=0, scope="test"))
    assert out.resampling.unit == "patient"  # NIH patients have several images: resampled whole
    reps = out.replicates[("fairness", "attributes", "sex", "gap", "auc")]
    # strict replicates (issue 14, item 3): the gap is undefined exactly where a group's AUC is (a group drew one
    # class of a label that both classes hold in the test set), and defined in most resamples
    f, m = (out.replicates[("fairness", "attributes", "sex", "groups", g, "auc")] for g in ("F", "M"))
    assert np.array_equal(np.isnan(reps), np.isnan(f) | np.isnan(m))
    assert np.isfinite(reps).mean() > 0.5


def test_calibration_for_a_real_model(nih_predictions, tmp_path) -> None:
    val, test = nih_predictions
    values, builders, calibrated = calibration_axis(test, val, ScoringSpec())
    assert set(values["temperature"]) == set(FINDINGS)
    # the guard (issue 14, item 5): a label is scaled when validation holds 20 images and 5 of each class
    y = val.y_true()
    for k, name in enumerate(FINDINGS):
        pos, neg = int((y[:, k] == 1).sum()), int((y[:, k] == 0).sum())
        status, t = values["temperature_status"][name], values["temperature"][name]
        if min(pos, neg) < 5:
            assert status in ("too_few", "one_class") and t is None, (name, pos, neg, status)
        else:
            assert status in ("fitted", "not_positive", "out_of_range"), (name, status)
            assert (t is not None and 0.05 <= t <= 20) == (status == "fitted")
    assert "fitted" in values["temperature_status"].values()
    for which in ("before", "after"):
        for m in ("ece", "mce", "brier", "nll"):
            assert values[which][m] is not None and values[which][f"{m}/Effusion"] is not None
    assert 0 < values["before"]["ece"] < 0.5 and 0 < values["after"]["ece"] < 0.5
    point = evaluate(len(test), builders, None).point  # the vectorized form agrees with netcal/sklearn here too
    assert point[("calibration", "before", "ece")] == pytest.approx(values["before"]["ece"], abs=1e-6)
    assert point[("calibration", "after", "nll")] == pytest.approx(values["after"]["nll"], abs=1e-6)
    png = reliability_png(test, calibrated, ScoringSpec(), "nih-cxr-1000 · logistic regression")
    (tmp_path / "reliability.png").write_bytes(png)
    assert png[:4] == b"\x89PNG"
