"""Issue 14, "no silent wrong number": a test per scoring item (1, 2, 3, 4, 5, 8, 10, 11), each against an
independent oracle (a hand count, scikit-learn, netcal, scipy), each failing on the code before the fix."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from conftest import run_cli
from fake_runs import task_spec, write_run
from netcal.scaling import TemperatureScaling
from scipy.optimize import minimize_scalar
from scipy.special import expit, log_expit
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from medbench.data.base import label_column
from medbench.predictions import Predictions
from medbench.scoring import compute_metrics, get_metric
from medbench.scoring.bootstrap import Resampling, evaluate, interval
from medbench.scoring.fairness import fairness_axis
from medbench.scoring.paired import paired_difference, seed_mean
from medbench.spec import AttributeSpec, ScoringSpec
from medbench.store import CONFIG, METRICS, find_run_dirs


def _table(y: np.ndarray, labels: list[str], **extra) -> pl.DataFrame:
    n = y.shape[0]
    t = pl.DataFrame({"sample_id": [f"s{i:04d}" for i in range(n)], "patient_id": [f"p{i:04d}" for i in range(n)],
                      **extra})
    return t.with_columns(**{label_column(lab): pl.Series([None if np.isnan(v) else int(v) for v in y[:, j]],
                                                          dtype=pl.Int8) for j, lab in enumerate(labels)})


# --------------------------------------------------------------------------- item 1


def test_item1_multiclass_rows_without_a_scored_class_are_not_labelled() -> None:
    """3 classes restricted to 2 (an OOD label map, the in-distribution side of a shift): the row of the third
    class has no positive among the scored ones; it is left out of every metric, never scored as class 0."""
    labels = ["a", "b"]
    y = np.array([[1, 0], [0, 1], [0, 0], [1, 0]], dtype=float)  # row 2's class (c) is outside the scored set
    p = np.array([[0.9, 0.1], [0.2, 0.8], [0.3, 0.7], [0.6, 0.4]])  # row 2 'predicted' b
    preds = Predictions.build(_table(y, labels), p, labels, "multiclass")
    m = compute_metrics(preds, ["accuracy", "brier", "nll", "ece"], ScoringSpec(ece_bins=10))
    assert m["accuracy"] == 1.0  # 3 of 3 labelled rows right (0.75 when row 2 counted as class a)
    keep = [0, 1, 3]
    assert m["brier"] == pytest.approx(np.mean(((p[keep] - y[keep]) ** 2).sum(1)), abs=1e-12)
    assert m["nll"] == pytest.approx(-np.mean(np.log([0.9, 0.8, 0.6])), abs=1e-12)
    # top-label ECE over the three labelled rows, bins of width 0.1: confidences 0.9, 0.8, 0.6, all right
    assert m["ece"] == pytest.approx(np.mean([0.1, 0.2, 0.4]), abs=1e-12)
    assert preds.label_counts()["outside_classes"] == 1


def test_item1_shift_in_distribution_side_skips_rows_of_other_classes() -> None:
    """The in-distribution side of a shift comparison restricted to the target's classes scores only the rows
    whose class is among them (accuracy 1.0 here; 0.75 when the third class's rows became class 0)."""
    from medbench.scoring.shift import restrict_labels, shift_axis

    labels = ["a", "b", "c"]
    y = np.eye(3)[[0, 1, 2, 0]]
    p = np.array([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.1, 0.3, 0.6], [0.7, 0.2, 0.1]])
    test = Predictions.build(_table(y, labels), p, labels, "multiclass")
    target = restrict_labels(test, ["a", "b"])
    values = shift_axis(test, {"t": (target, compute_metrics(target, ["accuracy"]), {})}, ["accuracy"],
                        ScoringSpec())[0]
    assert values["t"]["accuracy"]["in_distribution"] == 1.0


# --------------------------------------------------------------------------- item 2


def test_item2_two_class_multiclass_brier_is_the_sum_over_classes_inside_its_interval() -> None:
    rng = np.random.default_rng(0)
    n = 300
    y = np.eye(2)[rng.integers(0, 2, n)]
    p1 = np.clip(0.5 + 0.3 * (2 * y[:, 1] - 1) + rng.normal(0, 0.2, n), 0.01, 0.99)
    p = np.column_stack([1 - p1, p1])
    preds = Predictions.build(_table(y, ["neg", "pos"]), p, ["neg", "pos"], "multiclass")
    brier = compute_metrics(preds, ["brier"])["brier"]
    assert brier == pytest.approx(np.mean(((p - y) ** 2).sum(1)), abs=1e-12)  # not half of it
    res = Resampling.of(preds, n_resamples=300, seed=0, scope="test")
    reps = evaluate(n, [get_metric("brier").builder(preds)], res).replicates["brier"]
    ci = interval(reps, 0.95)
    assert ci["low"] < brier < ci["high"]


# --------------------------------------------------------------------------- item 3


def test_item3_a_replicate_with_an_undefined_label_is_undefined_and_counted(tmp_path: Path) -> None:
    """Multilabel: label Edema has 3 positives in the test set, so some resamples draw none of them; the macro
    AUC of those resamples is undefined (counted in n_undefined), not the mean of the other labels."""
    from medbench.store.scores import read_replicates, rescore

    run = write_run(tmp_path, seed=0)
    path = run.prediction_file("test")
    table = pl.read_parquet(path)
    edema = np.zeros(table.height, dtype=np.int8)
    edema[[0, 50, 100]] = 1
    table.with_columns(pl.Series("label:Edema", edema)).write_parquet(path)
    scores = rescore(run, {"bootstrap": 300})
    reps = read_replicates(run)
    rare, macro = reps[("test", "auc/Edema")], reps[("test", "auc")]
    lost = np.isnan(rare)
    assert 0 < lost.sum() < 300
    assert np.isnan(macro[lost]).all() and np.isfinite(macro[~lost]).all()
    assert scores["ci"]["test"]["auc"]["n_undefined"] == int(lost.sum())
    # by hand on the defined resamples: the mean of the labels' AUCs (sklearn)
    preds = Predictions.load(path)
    res = Resampling.of(preds, n_resamples=300, seed=0, scope="test")
    counts = np.hstack(list(res.counts()))
    y, p = preds.y_true(), preds.y_prob()
    for b in np.flatnonzero(~lost)[:10]:
        idx = res.sample_indices(counts[:, b])
        ref = np.mean([roc_auc_score(y[idx, k][~np.isnan(y[idx, k])], p[idx, k][~np.isnan(y[idx, k])])
                       for k in range(y.shape[1])])
        assert macro[b] == pytest.approx(ref, abs=1e-9)


def test_item3_a_label_undefined_at_the_point_is_left_out_everywhere() -> None:
    rng = np.random.default_rng(1)
    n = 200
    y = (rng.random((n, 2)) < 0.4).astype(float)
    y[:, 1] = 0.0  # one class in the test set
    p = expit(1.5 * (2 * y - 1) + rng.standard_normal((n, 2)))
    preds = Predictions.build(_table(y, ["common", "never"]), p, ["common", "never"], "multilabel")
    out = evaluate(n, [get_metric("auc").builder(preds)], Resampling.of(preds, n_resamples=100, seed=0, scope="test"))
    assert out.point["auc"] == pytest.approx(roc_auc_score(y[:, 0], p[:, 0]), abs=1e-12)
    assert np.isfinite(out.replicates["auc"]).all()


def test_item3_worst_group_replicate_is_undefined_when_a_group_is() -> None:
    rng = np.random.default_rng(3)
    n = 300
    sex = np.array(["F"] * 25 + ["M"] * (n - 25))
    y = (rng.random(n) < 0.4).astype(float)
    y[:25] = 0.0
    y[:2] = 1.0
    p = expit(1.5 * (2 * y - 1) + rng.standard_normal(n))
    test = Predictions.build(_table(y[:, None], ["l0"], sex=sex.tolist()), p[:, None], ["l0"], "binary")
    _, builders = fairness_axis(test, test, [AttributeSpec(name="sex")], ScoringSpec(min_group_size=20))
    reps = evaluate(n, builders, Resampling.of(test, n_resamples=300, seed=0, scope="test")).replicates
    f_auc = reps[("fairness", "attributes", "sex", "groups", "F", "auc")]
    worst = reps[("fairness", "attributes", "sex", "worst", "auc")]
    lost = np.isnan(f_auc)
    assert lost.any() and np.isnan(worst[lost]).all()  # not the other group's AUC
    assert np.array_equal(worst[~lost], np.minimum(f_auc[~lost],
                                                   reps[("fairness", "attributes", "sex", "groups", "M", "auc")][~lost]))


def test_item3_paired_tests_and_seed_means_keep_undefined_replicates_undefined() -> None:
    a = np.array([0.8, np.nan, 0.7, 0.9])
    b = np.array([0.6, 0.5, np.nan, 0.7])
    d = paired_difference(0.8, a, 0.6, b)
    assert d["n_undefined"] == 2 and d["n_resamples"] == 4
    point, reps = seed_mean([0.8, 0.6], [a, b])
    assert np.isnan(reps[1]) and np.isnan(reps[2]) and reps[0] == pytest.approx(0.7)


# --------------------------------------------------------------------------- item 4


def test_item4_logits_are_kept_and_scored_in_float64() -> None:
    """Saturated float32 probabilities tie in the AUC and clip the NLL; the logits do neither."""
    z = np.array([16.0, 17.0, 18.0, 19.0, 20.0, 21.0, -20.0, 20.0])
    y = np.array([0, 1, 1, 0, 1, 1, 1, 0], dtype=float)
    labels = ["x"]
    p32 = (1 / (1 + np.exp(-z.astype(np.float32)))).astype(np.float32)  # what float32 probabilities were
    table = _table(y[:, None], labels).with_columns(**{"logit:x": pl.Series(z.astype(np.float32)),
                                                       "prob:x": pl.Series(p32.astype(np.float64))})
    preds = Predictions(table, labels, "binary")
    m = compute_metrics(preds, ["auc", "nll"])
    assert m["auc"] == pytest.approx(roc_auc_score(y, z), abs=1e-12)
    assert m["auc"] != pytest.approx(roc_auc_score(y, p32), abs=1e-3)  # the float32 probabilities tie
    nll = -np.where(y == 1, log_expit(z), log_expit(-z))
    assert m["nll"] == pytest.approx(nll.mean(), rel=1e-9)  # a confident error at +20 costs 20, not 36


def test_item4_older_files_with_probabilities_only_are_still_read() -> None:
    y = np.array([[0], [1], [1], [0]], dtype=float)
    p = np.array([[0.2], [0.7], [0.9], [0.4]])
    preds = Predictions.build(_table(y, ["x"]), p, ["x"], "binary")
    assert compute_metrics(preds, ["auc", "accuracy"]) == {"auc": 1.0, "accuracy": 1.0}


# --------------------------------------------------------------------------- item 5


def _val(n: int, seed: int, scale: float = 1.0, logits: bool = False) -> Predictions:
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.4).astype(float)
    z = scale * (1.2 * (2 * y - 1) + rng.standard_normal(n))
    if logits:
        return Predictions.from_logits(_table(y[:, None], ["x"]), z[:, None], ["x"], "binary")
    return Predictions.build(_table(y[:, None], ["x"]), expit(z)[:, None], ["x"], "binary")


def test_item5_temperature_from_two_validation_images_is_refused() -> None:
    from medbench.scoring.calibration import calibration_axis

    two = Predictions.build(_table(np.array([[0.0], [1.0]]), ["x"]), expit(np.array([[0.3], [2.5]])), ["x"], "binary")
    test = _val(400, 1)
    values, _, after = calibration_axis(test, two, ScoringSpec())
    assert values["temperature_status"] == {"x": "too_few"} and values["temperature"] == {"x": None}
    assert values["after"] == values["before"]  # identity, not T = 0.035 'fitted'


def test_item5_fitted_temperature_equals_netcal_and_scipy_and_is_bounded() -> None:
    from medbench.scoring.calibration import T_MAX, T_MIN, fit_temperature_details

    val = _val(600, 2, scale=3.0, logits=True)
    temps, status = fit_temperature_details(val)
    assert status == {"x": "fitted"}
    z, y = val.logits()[:, 0], val.y_true()[:, 0]
    ref = minimize_scalar(lambda t: -np.mean(np.where(y == 1, log_expit(z / t), log_expit(-z / t))),
                          bounds=(T_MIN, T_MAX), method="bounded", options={"xatol": 1e-10}).x
    assert temps["x"] == pytest.approx(ref, rel=1e-5)
    ts = TemperatureScaling(method="mle")
    ts.fit(val.y_prob()[:, 0], y.astype(int), tensorboard=False)
    assert temps["x"] == pytest.approx(1 / float(np.asarray(ts.temperature).reshape(-1)[0]), rel=1e-3)
    # perfectly separated validation data drive T to 0: refused as out of range, not fitted
    y_sep = np.array([0.0] * 30 + [1.0] * 30)
    sep = Predictions.from_logits(_table(y_sep[:, None], ["x"]), (8 * (2 * y_sep - 1))[:, None], ["x"], "binary")
    assert fit_temperature_details(sep)[1] == {"x": "out_of_range"}


def test_item5_temperature_status_is_shown_where_people_read_results(tmp_path: Path) -> None:
    from medbench.board.aggregate import build_leaderboard
    from medbench.board.render import render_html, render_markdown
    from medbench.store.scores import rescore

    run = write_run(tmp_path, seed=0, n_val=6)  # 6 validation images: too few to fit a temperature
    rescore(run, {"bootstrap": 20})
    board = build_leaderboard(find_run_dirs([tmp_path]))
    md = render_markdown(board)
    assert "too_few" in md and "temperature" in md
    assert "too_few" in render_html(board)
    proc = run_cli("leaderboard", str(tmp_path), "-o", str(tmp_path / "b.json"))
    assert proc.returncode == 0, proc.stderr
    assert "too_few" in proc.stdout


# --------------------------------------------------------------------------- item 8


def test_item8_training_numerics_not_the_release_enter_the_run_key(monkeypatch) -> None:
    import medbench
    from medbench.run.request import RunRequest, run_key
    from medbench.spec.catalog import Catalog
    from medbench.train import numerics

    task = Catalog([]).task("smoke-tb")
    req = RunRequest(task="smoke-tb", backbone="cbr-tiny", seed=0, init="random")
    key = run_key(req, task, "fp", None)
    monkeypatch.setattr(medbench, "__version__", "99.0")
    assert run_key(req, task, "fp", None) == key  # a release that changes nothing keeps the runs
    monkeypatch.setattr(numerics, "TRAINING_NUMERICS", numerics.TRAINING_NUMERICS + 1)
    assert run_key(req, task, "fp", None) != key  # a change to the trained numbers retrains


def test_item8_leaderboard_refuses_runs_of_different_training_numerics(tmp_path: Path) -> None:
    from medbench.errors import UsageError
    from medbench.store.scores import rescore

    for seed, version in ((0, 1), (1, 2)):
        run = write_run(tmp_path, seed=seed)
        config = run.read_json(CONFIG)
        config["training_numerics"] = version
        run.write_json(CONFIG, config)
        rescore(run, {"bootstrap": 10})
    from medbench.board.aggregate import build_leaderboard

    with pytest.raises(UsageError, match="different training numerics"):
        build_leaderboard(find_run_dirs([tmp_path]))
    proc = run_cli("leaderboard", str(tmp_path), "-o", str(tmp_path / "b.json"))
    assert proc.returncode == 2 and "training numerics" in proc.stderr and "Traceback" not in proc.stderr


def _as_an_older_medbench_wrote_it(run, metrics: dict) -> None:
    """``metrics.json`` as older scoring code wrote it, recorded in ``result.json`` as that medbench did (the
    run's file digests, issue 16): a legitimate old score, not an edit (an edit is refused, see
    tests/test_hostile_inputs.py)."""
    import hashlib

    run.write_json(METRICS, metrics)
    result = json.loads((run.path / "result.json").read_text())
    result["files"][METRICS] = hashlib.sha256((run.path / METRICS).read_bytes()).hexdigest()
    (run.path / "result.json").write_text(json.dumps(result))


def test_item8_runs_scored_by_older_scoring_code_are_rescored_when_read(tmp_path: Path) -> None:
    from medbench.store.scores import rescore

    run = write_run(tmp_path, seed=0)
    rescore(run, {"bootstrap": 30})
    old = run.read_json(METRICS)
    old["scoring"].pop("scoring_version", None)  # as written before scoring was versioned
    old["test"]["auc"] = 0.123  # a stale number
    _as_an_older_medbench_wrote_it(run, old)
    proc = run_cli("leaderboard", str(tmp_path), "-o", str(tmp_path / "b.json"))
    assert proc.returncode == 0, proc.stderr
    assert "re-scored from its saved predictions" in " ".join(proc.stdout.split())
    new = run.read_json(METRICS)
    from medbench.scoring import SCORING_VERSION

    assert new["scoring"]["scoring_version"] == SCORING_VERSION and new["scoring"]["bootstrap"] == 30
    assert new["test"]["auc"] != 0.123
    board = json.loads((tmp_path / "b.json").read_text())
    assert board["entries"][0]["headline"]["mean"] == new["test"]["auc"]


@pytest.mark.slow
def test_item8_run_rescores_a_reused_run_and_saves_logits(tmp_path: Path) -> None:
    """``medbench run`` reusing a completed run re-scores it when its scores are older and says so; the run's
    prediction files hold the logits (item 4) and its config the training-numerics version."""
    args = ["run", "--backbone", "cbr-tiny", "--task", "smoke-covidx", "--seeds", "1", "--max-steps", "2",
            "--threads", "1", "--out", str(tmp_path)]
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    run = find_run_dirs([tmp_path])[0]
    table = pl.read_parquet(run.prediction_file("test"))
    assert {"logit:normal", "logit:pneumonia", "logit:COVID-19"} <= set(table.columns)
    assert table["logit:normal"].dtype == pl.Float32 and table["prob:normal"].dtype == pl.Float64
    from medbench.train.numerics import TRAINING_NUMERICS

    assert run.read_json(CONFIG)["training_numerics"] == TRAINING_NUMERICS
    m = run.read_json(METRICS)
    m["scoring"]["scoring_version"] = 0
    _as_an_older_medbench_wrote_it(run, m)
    proc = run_cli(*args, env={"MEDBENCH_PROGRESS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = " ".join((proc.stdout + proc.stderr).split())
    assert "1 run(s) were already complete and reused" in out and "re-scored from its saved predictions" in out
    assert run.read_json(METRICS)["scoring"]["scoring_version"] != 0


# --------------------------------------------------------------------------- item 10


def test_item10_degenerate_results_are_warned_in_the_run_and_the_board(tmp_path: Path) -> None:
    from medbench.board.aggregate import build_leaderboard
    from medbench.board.render import render_html, render_markdown
    from medbench.store.scores import rescore

    spec = task_spec("smoke-tb")
    for seed in (0, 1):
        run = write_run(tmp_path, task="smoke-tb", seed=seed, spec=spec, n_val=8,
                        history={"step": [0, 1], "loss": [1.0, 1.0], "lr": [0.1, 0.1], "val_step": [],
                                 "val_metric": [], "seconds": 1.0, "data_wait_seconds": 0.0})
        path = run.prediction_file("test")
        table = pl.read_parquet(path)
        table.with_columns(pl.lit(0.3).alias("prob:tuberculosis"),  # a collapsed network
                           pl.lit(0, dtype=pl.Int8).alias("label:tuberculosis")).write_parquet(path)  # one class
        scores = rescore(run, {"bootstrap": 20})
        codes = {w["code"] for w in scores["warnings"]}
        assert {"constant_scores", "headline_undefined", "temperature_not_fitted", "empty_convergence",
                "probabilities_only"} <= codes, codes
    board = build_leaderboard(find_run_dirs([tmp_path]))
    warned = {w["code"]: w for w in board["entries"][0]["warnings"]}
    assert warned["headline_undefined"]["seeds"] == [0, 1]
    assert "constant_scores" in render_markdown(board) and "constant_scores" in render_html(board)
    proc = run_cli("leaderboard", str(tmp_path), "-o", str(tmp_path / "b.json"))
    assert proc.returncode == 0, proc.stderr
    assert "headline_undefined" in proc.stdout and "warning" in proc.stdout
    from medbench.board.schema import load_board

    load_board(tmp_path / "b.json")  # the warnings follow the schema


def test_item10_undefined_resamples_are_warned() -> None:
    from medbench.scoring.checks import score_warnings

    scores = {"test": {"auc": 0.8}, "ci": {"test": {"auc": {"low": 0.7, "high": 0.9, "n_undefined": 118}}},
              "scoring": {"resampling": {"test": {"n_resamples": 1000}}}}
    w = score_warnings(scores, {}, headline="auc")
    assert [x["code"] for x in w] == ["undefined_resamples"] and "118 of 1000" in w[0]["message"]


# --------------------------------------------------------------------------- item 11


def test_item11_balanced_accuracy_is_registered_and_equals_sklearn() -> None:
    rng = np.random.default_rng(4)
    n = 200
    cls = rng.integers(0, 4, n)
    cls[cls == 3] = rng.integers(0, 3, (cls == 3).sum())  # class 3 absent from the test labels
    y = np.eye(4)[cls]
    z = rng.normal(0, 1, (n, 4)) + 1.2 * y
    labels = ["a", "b", "c", "d"]
    preds = Predictions.build(_table(y, labels), np.exp(z) / np.exp(z).sum(1, keepdims=True), labels, "multiclass")
    got = compute_metrics(preds, ["balanced_accuracy"])["balanced_accuracy"]
    with pytest.warns(UserWarning):  # sklearn: a predicted class not in y_true; it averages over the present ones
        ref = balanced_accuracy_score(cls, z.argmax(1))
    assert got == pytest.approx(ref, abs=1e-12)


def test_item11_missing_attribute_values_form_the_missing_group_never_nan() -> None:
    rng = np.random.default_rng(5)
    n = 120
    y = (rng.random(n) < 0.5).astype(float)
    site = ["A"] * 50 + ["B"] * 50 + [float("nan")] * 10 + [None] * 10
    age = [float("nan")] * 30 + list(rng.uniform(20, 80, n - 30))
    table = _table(y[:, None], ["x"]).with_columns(pl.Series("site", [str(s) if s is not None else None for s in site]),
                                                    pl.Series("age", age))
    test = Predictions.build(table, expit(2 * y - 1 + rng.standard_normal(n))[:, None], ["x"], "binary")
    attrs = [AttributeSpec(name="site"), AttributeSpec(name="age_group", column="age", bins=[0, 50, 200])]
    values, _ = fairness_axis(test, test, attrs, ScoringSpec(min_group_size=5))
    site_groups = values["attributes"]["site"]["groups"]
    assert "nan" not in site_groups and site_groups["(missing)"]["n"] == 20
    age_groups = values["attributes"]["age_group"]["groups"]
    assert age_groups["(missing)"]["n"] == 30 and "(out of bins)" not in age_groups


def test_item11_ece_point_lies_inside_its_interval(tmp_path: Path) -> None:
    """A well calibrated model on a small test set: the plug-in ECE is biased upward and the bootstrap replicates
    more so, so their plain percentile interval excludes the point; the reported (bias-corrected) one holds it."""
    from medbench.store.scores import read_replicates, rescore

    rng = np.random.default_rng(2)
    n = 150
    p = rng.uniform(0.05, 0.95, n)
    y = (rng.random(n) < p).astype(float)
    run = write_run(tmp_path, task="smoke-tb", n_test=n, spec=task_spec("smoke-tb"))
    path = run.prediction_file("test")
    table = pl.read_parquet(path).with_columns(pl.Series("prob:tuberculosis", p),
                                               pl.Series("label:tuberculosis", y.astype(np.int8)),
                                               pl.Series("patient_id", [f"q{i:04d}" for i in range(n)]))
    table.write_parquet(path)
    scores = rescore(run, {"bootstrap": 500})
    point, ci = scores["test"]["ece"] if "ece" in scores["test"] else scores["calibration"]["before"]["ece"], \
        scores["ci"]["calibration"]["before"]["ece"]
    reps = read_replicates(run)[("calibration", "before", "ece")]
    assert np.quantile(reps, 0.025) > point  # the symptom: the point below its replicates' percentile interval
    assert ci["low"] < point < ci["high"]
    assert ci["bias"] == pytest.approx(np.mean(reps) - point)


def test_item11_definitions_are_documented() -> None:
    doc = (Path(__file__).resolve().parent.parent / "docs" / "metrics.md").read_text()
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert "docs/metrics.md" in readme
    for name in ("auc", "accuracy", "balanced_accuracy", "ece", "mce", "brier", "nll", "equalized_odds_difference",
                 "relative_drop", "(missing)", "oracle"):
        assert name in doc, name
    from medbench.store import rundir  # the run store documents the two versions

    assert "TRAINING_NUMERICS" in rundir.__doc__ and "SCORING_VERSION" in rundir.__doc__
