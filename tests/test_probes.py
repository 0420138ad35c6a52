"""Frozen-feature protocols (linear probe, kNN) against independent oracles, the feature cache's reuse,
integrity and resumption, the protocol as a run-key field and a leaderboard axis.

Oracles: scikit-learn's ``LogisticRegression`` (same C, same formulation) for the linear probe, a
brute-force Python loop for DINO's weighted kNN, the networks' own ``forward_features``/``forward_head`` for
the pooling, and counted forward calls and image decodes for "computed once, reused".
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from dataclasses import replace
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from scipy.special import expit, softmax
from sklearn.linear_model import LogisticRegression

from medbench.backbones import get_backbone, register_backbone
from medbench.data.locate import DataLocations
from medbench.probe.knn import TEMPERATURE, KNNProbe, candidate_ks
from medbench.probe.linear import LAMBDAS, PATIENCE, fit_linear_probe, standardisation
from medbench.probe.selection import Selection
from medbench.run.request import RunRequest, run_key
from medbench.run.runner import Runner
from medbench.spec.catalog import Catalog
from medbench.store import RunStore
from medbench.train.finetune import EngineConfig
from medbench.utils import writer_tag

# --------------------------------------------------------------------------- unit: the fits against oracles


def _features(n: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)) * rng.uniform(0.3, 4.0, d) + rng.normal(size=d) * 3


def _labels(x: np.ndarray, task_type: str, outputs: int, seed: int, missing: float = 0.0) -> np.ndarray:
    """Labels of one linear rule (the same for every split) plus noise drawn from ``seed``."""
    truth = np.random.default_rng(99).normal(size=(x.shape[1], outputs))
    rng = np.random.default_rng(seed)
    z = (x - x.mean(0)) / x.std(0) @ truth / np.sqrt(x.shape[1]) * 3 + rng.normal(size=(len(x), outputs))
    if task_type == "multiclass":
        y = np.eye(outputs)[z.argmax(1)]
    else:
        y = (z > 0).astype(float)
    y[rng.random(y.shape) < missing] = np.nan
    return y


def _sklearn_probs(z_train, y, z_test, c: float) -> np.ndarray:
    """One LogisticRegression per label (or one multinomial for a class vector), tight tolerance."""
    model = LogisticRegression(C=c, tol=1e-12, max_iter=100_000)
    return model.fit(z_train, y).predict_proba(z_test)


def _probs_of(task_type: str, logits: np.ndarray) -> np.ndarray:
    return softmax(logits, axis=1) if task_type == "multiclass" else expit(logits)


def _val_auc(y: np.ndarray):
    from sklearn.metrics import roc_auc_score

    def score(p: np.ndarray) -> float:
        if y.ndim == 1:
            return roc_auc_score(y, p[:, 1] if p.shape[1] == 2 else p)
        return float(np.mean([roc_auc_score(y[:, k], p[:, k]) for k in range(y.shape[1])]))
    return score


@pytest.mark.parametrize("task_type, outputs", [("binary", 1), ("multiclass", 3), ("multilabel", 4)])
def test_linear_probe_equals_scikit_learn_at_the_regularisation_it_chose(task_type: str, outputs: int) -> None:
    x_train, x_val, x_test = _features(160, 12, 0), _features(60, 12, 1), _features(50, 12, 2)
    missing = 0.2 if task_type == "multilabel" else 0.0
    y_train = _labels(x_train, task_type, outputs, 3, missing)
    y_val = _labels(x_val, task_type, outputs, 4)
    y_val_score = y_val.argmax(1) if task_type == "multiclass" else y_val
    score = _val_auc(y_val_score) if task_type != "multiclass" else (lambda p: float((p.argmax(1) == y_val_score).mean()))
    probe, record = fit_linear_probe(x_train, y_train, task_type, x_val,
                                     Selection(("val", lambda logits: score(_probs_of(task_type, logits)))))
    assert record["converged"] and all(f["converged"] for f in record["sweep"])

    mean, scale = standardisation(x_train)
    z_train, z_val, z_test = ((x - mean) / scale for x in (x_train, x_val, x_test))
    # the choice: scikit-learn at every C of the grid, scored on val, first best (strongest regularisation)
    n = len(x_train)

    def sk(c: float, z: np.ndarray) -> np.ndarray:
        if task_type == "multiclass":
            return _sklearn_probs(z_train, y_train.argmax(1), z, c)
        cols = []
        for k in range(outputs):
            known = ~np.isnan(y_train[:, k])
            cols.append(_sklearn_probs(z_train[known], y_train[known, k], z, c)[:, 1])
        return np.stack(cols, 1)

    # the documented rule on scikit-learn's validation scores: strong to weak, the first best, stop after
    # PATIENCE weaker values without a better one
    best, best_score, fitted = None, None, 0
    for i, lam in enumerate(LAMBDAS):
        fitted += 1
        value = score(sk(1 / (lam * n), z_val))
        if best_score is None or value > best_score:
            best, best_score = i, value
        if i - best >= PATIENCE:
            break
    assert [f["lambda"] for f in record["sweep"]] == list(LAMBDAS[:fitted])
    assert record["chosen"]["lambda"] == LAMBDAS[best]
    assert record["chosen"]["C"] == pytest.approx(1 / (LAMBDAS[best] * n))
    np.testing.assert_allclose(_probs_of(task_type, probe.logits(x_test)), sk(record["chosen"]["C"], z_test), atol=2e-5)


def test_linear_probe_standardises_on_the_training_rows_only() -> None:
    x_train, x_test = _features(80, 6, 5), _features(30, 6, 6)
    y = _labels(x_train, "binary", 1, 7)
    probe, _ = fit_linear_probe(x_train, y, "binary", x_train[:5], Selection(("none", lambda p: 0.0)),
                                lambdas=(1e-2,))
    np.testing.assert_allclose(probe.mean, x_train.mean(0))
    np.testing.assert_allclose(probe.scale, x_train.std(0))
    # the test features do not move the standardisation: predicting a set or its halves gives the same rows
    np.testing.assert_array_equal(probe.logits(x_test)[:10], probe.logits(x_test[:10]))


def test_linear_probe_degenerate_training_labels() -> None:
    x = _features(40, 5, 8)
    y = _labels(x, "multilabel", 3, 9)
    y[:, 1] = 0.0  # one class only: a constant, the smoothed training rate
    y[:, 2] = np.nan  # never annotated
    probe, record = fit_linear_probe(x, y, "multilabel", x[:4], Selection(("none", lambda p: 0.0)), lambdas=(1e-2,))
    p = expit(probe.logits(x))
    assert record["constant_labels"] == [1, 2]
    np.testing.assert_allclose(p[:, 1], 0.5 / 41, rtol=1e-6)
    np.testing.assert_allclose(p[:, 2], 0.5, rtol=1e-6)
    # a class absent from a multiclass training set gets probability 0; the others sum to 1
    ym = np.eye(4)[np.arange(40) % 3]
    probe, record = fit_linear_probe(x, ym, "multiclass", x[:4], Selection(("none", lambda p: 0.0)), lambdas=(1e-2,))
    logits = probe.logits(x)
    pm = softmax(logits, axis=1)
    assert record["classes_fitted"] == [0, 1, 2] and np.isfinite(logits).all()
    assert np.all(pm[:, 3] == 0) and np.allclose(pm.sum(1), 1, atol=1e-6)


def _brute_force_knn(x_train, y_train, x_query, k: int, task_type: str) -> np.ndarray:
    a = x_train / np.linalg.norm(x_train, axis=1, keepdims=True)
    q = x_query / np.linalg.norm(x_query, axis=1, keepdims=True)
    out = np.zeros((len(x_query), y_train.shape[1]))
    for i in range(len(q)):
        if task_type == "multiclass":
            ranked = sorted(range(len(a)), key=lambda j: -float(q[i] @ a[j]))[:k]
            w = np.array([np.exp(float(q[i] @ a[j]) / TEMPERATURE) for j in ranked])
            for c in range(y_train.shape[1]):
                out[i, c] = sum(wj for wj, j in zip(w, ranked) if y_train[j].argmax() == c) / w.sum()
            continue
        for col in range(y_train.shape[1]):
            known = [j for j in range(len(a)) if not np.isnan(y_train[j, col])]
            ranked = sorted(known, key=lambda j: -float(q[i] @ a[j]))[:k]
            w = np.array([np.exp(float(q[i] @ a[j]) / TEMPERATURE) for j in ranked])
            out[i, col] = sum(wj * y_train[j, col] for wj, j in zip(w, ranked)) / w.sum()
    return out


@pytest.mark.parametrize("task_type, outputs, missing", [("multiclass", 3, 0.0), ("multilabel", 3, 0.25),
                                                         ("binary", 1, 0.0)])
def test_knn_equals_a_brute_force_weighted_vote(task_type: str, outputs: int, missing: float) -> None:
    x_train, x_query = _features(70, 8, 10), _features(25, 8, 11)
    y = _labels(x_train, task_type, outputs, 12, missing)
    probe = KNNProbe(x_train, y, task_type)
    ks = [1, 5, 20]
    got = probe.predict_proba(x_query, ks)
    for k in ks:
        np.testing.assert_allclose(got[k], _brute_force_knn(x_train, y, x_query, k, task_type), atol=1e-6)


def test_knn_grid_is_capped_by_the_images_that_can_vote() -> None:
    assert candidate_ks(2) == [2]
    assert candidate_ks(30) == [5, 10, 20, 30]
    assert candidate_ks(1000) == [5, 10, 20, 50, 100, 200]


# --------------------------------------------------------------------------- pooling of real architectures


@pytest.mark.parametrize("arch", ["test_vit", "resnet18", "cbr-tiny"])
def test_pooling_of_real_architectures_against_their_own_forward(arch: str) -> None:
    import timm
    import torch

    from medbench.backbones.cbr import build_cbr
    from medbench.backbones.pooling import pooled_features
    from medbench.errors import BackboneError

    torch.manual_seed(0)
    model = build_cbr(arch, num_classes=2, in_chans=1) if arch.startswith("cbr") else \
        timm.create_model(arch, pretrained=False, num_classes=2, in_chans=1, **({"dynamic_img_size": True}
                                                                                 if "vit" in arch else {}))
    model.eval()
    x = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        f = model.forward_features(x)
        own = model.forward_head(f, pre_logits=True)
        assert torch.equal(pooled_features(model, x, None), own)
        if f.ndim == 3:  # tokens: class token first, then patches
            p = model.num_prefix_tokens
            torch.testing.assert_close(pooled_features(model, x, "cls"), f[:, 0])
            torch.testing.assert_close(pooled_features(model, x, "mean"), f[:, p:].mean(1))
            torch.testing.assert_close(pooled_features(model, x, "cls+mean"), torch.cat([f[:, 0], f[:, p:].mean(1)], 1))
        else:
            torch.testing.assert_close(pooled_features(model, x, "mean"), f.mean((2, 3)))
            torch.testing.assert_close(pooled_features(model, x, "mean"), own)  # a CNN's own pool is the mean
            with pytest.raises(BackboneError, match="no class token"):
                pooled_features(model, x, "cls")


# --------------------------------------------------------------------------- end to end through the runner

FORWARDED = {"images": 0}
COUNTING = "test-counting-cbr"


def _counting_build(*, num_classes: int, in_chans: int):
    from medbench.backbones.cbr import build_cbr

    net = build_cbr("cbr-tiny", num_classes=num_classes, in_chans=in_chans)
    inner = net.forward_features

    def counted(x):
        if x.device.type == "meta":  # the preflight's shape check computes nothing
            return inner(x)
        FORWARDED["images"] += len(x)
        if FORWARDED.get("interrupt_after") is not None and FORWARDED["images"] >= FORWARDED["interrupt_after"]:
            FORWARDED["interrupt_after"] = None
            os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C: the runner stops after this part
        return inner(x)

    net.forward_features = counted
    return net


register_backbone(replace(get_backbone("cbr-tiny"), name=COUNTING, build=_counting_build), overwrite=True)

TOY = """task: toy-derm
version: 1
family: test
dataset: {name: toy, adapter: csv, options: {csv: labels.csv, path_column: file, path_root: img,
          patient_column: patient, label_column: dx, sex_column: sex}}
type: multiclass
labels: [nv, mel, bkl]
metrics: [auc, accuracy]
headline: auc
attributes: [sex]
splits: {method: grouped, fractions: {train: 0.5, val: 0.25, test: 0.25}}
input: {resize: 16, crop: 12, channels: 1}
hyperrule: {batch_size: 8, base_lr: 0.1, schedule: [1, 2, 3, 4, 5], mixup_alpha: 0.0, validation_points: 1}
default_seeds: 1
"""


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """72 PNG files of three classes (16 px) in a CSV layout: images that must be decoded from disk."""
    from PIL import Image

    root = tmp_path_factory.mktemp("toy")
    data, tasks = root / "toy", root / "tasks"
    (data / "img").mkdir(parents=True)
    tasks.mkdir()
    rng = np.random.default_rng(0)
    lines = ["file,patient,dx,sex"]
    for i in range(72):
        c = i % 3
        arr = (rng.random((16, 16)) * 80 + 60 * c).astype(np.uint8)
        arr[:, 4 * c:4 * c + 4] = 255  # a class-dependent stripe
        Image.fromarray(arr).save(data / "img" / f"{i:02d}.png")
        lines.append(f"{i:02d}.png,p{i // 2},{['nv', 'mel', 'bkl'][c]},{'MF'[i % 2]}")
    (data / "labels.csv").write_text("\n".join(lines) + "\n")
    (tasks / "toy-derm.yaml").write_text(TOY)
    return data, tasks


class Messages:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def run_started(self, *a) -> None:
        pass

    def step(self, *a) -> None:
        pass

    def run_finished(self, outcome) -> None:
        pass

    def message(self, text: str) -> None:
        self.lines.append(text)


def _runner(toy: tuple[Path, Path], out: Path) -> Runner:
    data, tasks = toy
    return Runner(Catalog([tasks]), DataLocations(None, {"toy": data}), RunStore(out), reporter=Messages(),
                  fail_fast=True)


def _req(protocol: str | None, **kw) -> RunRequest:
    return RunRequest(task="toy-derm", backbone=COUNTING, seed=kw.pop("seed", 0), init=kw.pop("init", "random"),
                      protocol=protocol, engine=EngineConfig(engine="torch"), **kw)


def _no_decoding(monkeypatch) -> None:
    import medbench.data.cache as cache

    def refuse(*a, **k):
        raise AssertionError("an image was decoded")

    monkeypatch.setattr(cache, "_decode_rows", refuse)


def _cached(out: Path, split: str) -> np.ndarray:
    from medbench.store.features import FeatureEntry

    (path,) = [p for p in (out / "features" / "toy-derm" / COUNTING).iterdir() if f"-{split}-" in p.name]
    spec = json.loads((path / "spec.json").read_text())
    features, _ = FeatureEntry(path, spec["key"], spec["spec"], spec["n_rows"], spec["part_rows"]).load()
    return features


def _probs(run_dir: Path, split: str) -> np.ndarray:
    t = pl.read_parquet(run_dir / "predictions" / f"{split}.parquet")
    return t.select([c for c in t.columns if c.startswith("prob:")]).to_numpy()


@pytest.fixture(scope="module")
def probed(toy, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A linear probe, then kNN, then a 2-shot linear probe and fine-tuning, each in a fresh runner (as separate
    commands), into one store; forward passes and decodes counted per command."""
    out = tmp_path_factory.mktemp("probed")
    mp = pytest.MonkeyPatch()
    counts = {}
    try:
        outcomes = {}
        for name, req in (("linear", _req("linear")), ("knn", _req("knn")), ("shots", _req("linear", shots=2)),
                          ("finetune", _req(None, max_steps=3))):
            if name != "linear":
                _no_decoding(mp)  # the preprocessing cache of the first command is reused: nothing decoded
            FORWARDED["images"] = 0
            (outcomes[name],) = _runner(toy, out).run_all([req])
            counts[name] = FORWARDED["images"]
    finally:
        mp.undo()
    return {"out": out, "outcomes": outcomes, "forwarded": counts}


def test_features_are_computed_once_and_reused_by_other_protocols_and_subsets(probed: dict) -> None:
    linear, knn, shots = (probed["outcomes"][k] for k in ("linear", "knn", "shots"))
    assert linear.result["probe"]["features"]["embedded_images"] == 72  # train + val + test, each image once
    assert probed["forwarded"]["linear"] == 72
    assert probed["forwarded"]["knn"] == 0 and probed["forwarded"]["shots"] == 0  # nothing embedded, nothing decoded
    assert knn.result["probe"]["features"] == {**knn.result["probe"]["features"], "embedded_images": 0,
                                               "cached_images": 72}
    assert knn.result["probe"]["features"]["entries"] == linear.result["probe"]["features"]["entries"]
    assert shots.result["variant"]["n_train"] == 6 and shots.result["probe"]["n_train"] == 6
    assert probed["forwarded"]["finetune"] > 0  # fine-tuning trains its own network


def test_linear_probe_run_predictions_equal_scikit_learn_on_the_cached_features(probed: dict, toy) -> None:
    out, run = probed["out"], probed["outcomes"]["linear"]
    f_train, f_test = _cached(out, "train"), _cached(out, "test")
    split = pl.read_parquet(run.run_dir.path / "splits.parquet")
    assert len(f_train) == (split["split"] == "train").sum()
    labels = run.run_dir.read_json("config.json")["task_spec"]["labels"]
    train_meta = split.filter(pl.col("split") == "train")
    y = np.array([labels.index(v) for v in _toy_classes(toy, train_meta["sample_id"].to_list())])
    mean, scale = standardisation(f_train)
    c = run.result["probe"]["chosen"]["C"]
    expected = LogisticRegression(C=c, tol=1e-12, max_iter=100_000).fit((f_train - mean) / scale, y).predict_proba(
        (f_test - mean) / scale)
    np.testing.assert_allclose(_probs(run.run_dir.path, "test"), expected, atol=2e-5)


def _toy_classes(toy, sample_ids: list[str]) -> list[str]:
    table = pl.read_csv(toy[0] / "labels.csv")
    by_file = dict(zip(table["file"], table["dx"]))
    return [by_file[Path(s).name] for s in sample_ids]


def test_knn_run_predictions_equal_a_brute_force_vote_on_the_cached_features(probed: dict, toy) -> None:
    out, run = probed["out"], probed["outcomes"]["knn"]
    f_train, f_test = _cached(out, "train"), _cached(out, "test")
    split = pl.read_parquet(run.run_dir.path / "splits.parquet")
    labels = run.run_dir.read_json("config.json")["task_spec"]["labels"]
    classes = _toy_classes(toy, split.filter(pl.col("split") == "train")["sample_id"].to_list())
    y = np.eye(3)[[labels.index(c) for c in classes]]
    k = run.result["probe"]["chosen"]["k"]
    expected = _brute_force_knn(f_train.astype(np.float64), y, f_test.astype(np.float64), k, "multiclass")
    np.testing.assert_allclose(_probs(run.run_dir.path, "test"), expected, atol=1e-6)


def test_probe_runs_are_scored_on_every_axis_and_keyed_by_protocol(probed: dict) -> None:
    linear, knn, finetune = (probed["outcomes"][k] for k in ("linear", "knn", "finetune"))
    for o in (linear, knn):
        metrics = o.run_dir.read_json("metrics.json")
        assert {"test", "val", "calibration", "fairness", "ci"} <= set(metrics)
        assert o.result["protocol"] in ("linear", "knn") and "-" + o.result["protocol"] + "-" in o.run_dir.path.name
    assert "protocol" not in finetune.run_dir.read_json("config.json")["request"] or \
        finetune.run_dir.read_json("config.json")["request"]["protocol"] is None
    keys = {o.result["key"] for o in (linear, knn, finetune)}
    assert len(keys) == 3


def test_one_leaderboard_holds_the_protocols_side_by_side(probed: dict) -> None:
    from medbench.board.aggregate import build_leaderboard
    from medbench.board.compare import Tolerance, compare_boards
    from medbench.board.render import render_html, render_markdown
    from medbench.board.schema import validate_board

    runs = [probed["outcomes"][k].run_dir for k in ("linear", "knn", "finetune")]
    board = build_leaderboard(runs)
    validate_board(board)
    assert [(e["protocol"], e["init"]) for e in board["entries"]] == [("finetune", "random"), ("knn", "random"),
                                                                       ("linear", "random")]
    # each protocol is its own group: three bests, nobody compared across protocols
    assert all(e.get("significance") is None for e in board["entries"])
    md = render_markdown(board)
    assert "\n## Protocols\n" in md and "| task | backbone | init | metric | finetune | linear | knn |" in md
    assert "random · linear" in md
    page = render_html(board)
    assert 'id="view-protocols"' in page and "<th data-col=\"knn\"" in page
    # the gate matches entries on the protocol as well
    report = compare_boards(board, board, tolerance=Tolerance())
    assert report["compared"] == 3 and not report["missing"]
    without_knn = {**board, "entries": [e for e in board["entries"] if e["protocol"] != "knn"]}
    report = compare_boards(board, without_knn, tolerance=Tolerance(), allow_missing=True)
    assert [m["protocol"] for m in report["missing"]] == ["knn"]


def test_probe_runs_record_their_files_and_an_edit_is_refused(probed: dict, tmp_path: Path) -> None:
    """Issue 16 for probe runs: result.json records the sha256 of every file of the run (hashlib over the bytes
    on disk), so a damaged prediction file stops a re-score before it writes anything, and an edited
    metrics.json is refused by the leaderboard, each naming the file."""
    import hashlib
    import shutil

    from medbench.board.aggregate import build_leaderboard
    from medbench.errors import IntegrityError
    from medbench.store import RunDir
    from medbench.store.scores import rescore

    for name in ("linear", "knn"):
        run = probed["outcomes"][name].run_dir.path
        files = json.loads((run / "result.json").read_text())["files"]
        on_disk = {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest() for p in run.rglob("*")
                   if p.is_file() and p.name != "result.json" and not p.name.startswith(".")}
        assert files == on_disk and {"predictions/test.parquet", "predictions/val.parquet", "metrics.json"} <= set(files)
    copy = tmp_path / "run"
    shutil.copytree(probed["outcomes"]["linear"].run_dir.path, copy)
    metrics = (copy / "metrics.json").read_bytes()
    data = bytearray((copy / "predictions" / "test.parquet").read_bytes())
    data[len(data) // 2] ^= 0x01
    (copy / "predictions" / "test.parquet").write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="test.parquet: sha256 differs"):
        rescore(RunDir(copy))
    assert (copy / "metrics.json").read_bytes() == metrics
    shutil.rmtree(copy)
    shutil.copytree(probed["outcomes"]["linear"].run_dir.path, copy)
    edited = json.loads(metrics)
    edited["test"] = {k: 0.99 for k in edited["test"]}
    (copy / "metrics.json").write_text(json.dumps(edited))
    with pytest.raises(IntegrityError, match="metrics.json: sha256 differs"):
        build_leaderboard([RunDir(copy)])


def test_a_damaged_or_half_written_part_is_never_used(toy, tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "out"
    FORWARDED["images"] = 0
    (first,) = _runner(toy, out).run_all([_req("linear")])
    before = {s: _cached(out, s) for s in ("train", "val", "test")}
    train_dir = next(p for p in (out / "features" / "toy-derm" / COUNTING).iterdir() if "-train-" in p.name)
    part = train_dir / "part-00000.npy"
    data = bytearray(part.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit of a finished part
    part.write_bytes(bytes(data))
    (test_dir,) = [p for p in (out / "features" / "toy-derm" / COUNTING).iterdir() if "-test-" in p.name]
    (test_dir / "manifest.json").unlink()  # a test part without its sidecar: as if killed between the two files
    (test_dir / "part-00000.json").unlink()
    gone = subprocess.Popen(["true"])
    gone.wait()
    host = writer_tag().split("@", 1)[1]
    (test_dir / f".part-00000.npy.x.{gone.pid}@{host}.tmp").write_bytes(b"half")  # and a killed writer's file
    FORWARDED["images"] = 0
    runner = _runner(toy, out)
    (again,) = runner.run_all([_req("knn")])
    assert FORWARDED["images"] == len(before["train"]) + len(before["test"])  # both recomputed, val reused
    assert any("computing the damaged parts again" in m for m in runner.reporter.lines)
    for s in ("train", "val", "test"):
        np.testing.assert_array_equal(_cached(out, s), before[s])
    assert not list(test_dir.glob(".*.tmp"))
    assert again.result["probe"]["features"]["embedded_images"] == len(before["train"]) + len(before["test"])


def test_feature_cache_files_are_read_back_with_bounds(toy, tmp_path: Path, monkeypatch) -> None:
    """What the feature cache reads back (issue 16): a manifest that lists other parts than the entry has, one
    nested beyond the JSON bound, a started entry's spec.json that is not an object, and a part whose features
    are not finite (written with matching digests, as a broken extractor would) never give features of another
    shape or a NaN to a probe: the entry is completed again (only the non-finite part is recomputed) and every
    split's features equal the first computation's."""
    import hashlib
    import io

    import medbench.store.features as features

    monkeypatch.setattr(features, "PART_ROWS", 8)
    out = tmp_path / "out"
    FORWARDED["images"] = 0
    _runner(toy, out).run_all([_req("linear")])
    before = {s: _cached(out, s) for s in ("train", "val", "test")}
    dirs = {s: next(p for p in (out / "features" / "toy-derm" / COUNTING).iterdir() if f"-{s}-" in p.name)
            for s in ("train", "val", "test")}
    manifest = json.loads((dirs["train"] / "manifest.json").read_text())
    assert len(manifest["parts"]) > 1
    manifest["parts"] = manifest["parts"][:1]  # one part listed: the others' rows would be missing
    (dirs["train"] / "manifest.json").write_text(json.dumps(manifest))
    (dirs["train"] / "spec.json").write_text("[1, 2]")
    (dirs["test"] / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    arr = np.load(dirs["val"] / "part-00000.npy")
    arr[0, 0] = np.nan
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    digest = hashlib.sha256(buf.getvalue()).hexdigest()
    (dirs["val"] / "part-00000.npy").write_bytes(buf.getvalue())
    meta = json.loads((dirs["val"] / "part-00000.json").read_text())
    (dirs["val"] / "part-00000.json").write_text(json.dumps({**meta, "sha256": digest}))
    manifest = json.loads((dirs["val"] / "manifest.json").read_text())
    manifest["parts"][0]["sha256"] = digest
    (dirs["val"] / "manifest.json").write_text(json.dumps(manifest))
    FORWARDED["images"] = 0
    (outcome,) = _runner(toy, out).run_all([_req("knn")])
    assert outcome.status == "ok", outcome.error
    assert FORWARDED["images"] == 8  # the val part with a NaN, nothing else
    for s in ("train", "val", "test"):
        np.testing.assert_array_equal(_cached(out, s), before[s])
    assert np.isfinite(_probs(outcome.run_dir.path, "test")).all()


def test_an_interrupted_extraction_resumes_with_the_missing_parts_only(toy, tmp_path: Path, monkeypatch) -> None:
    import medbench.store.features as features
    from medbench.run.failures import StopRequested

    monkeypatch.setattr(features, "PART_ROWS", 8)
    out = tmp_path / "out"
    FORWARDED.update(images=0, interrupt_after=16)  # Ctrl-C during the second part of the training images
    with pytest.raises(StopRequested, match="while computing train features"):
        _runner(toy, out).run_all([_req("linear")])
    FORWARDED["interrupt_after"] = None
    done = FORWARDED["images"]
    assert done == 16
    FORWARDED["images"] = 0
    (outcome,) = _runner(toy, out).run_all([_req("linear")])
    assert outcome.status == "ok" and FORWARDED["images"] == 72 - done
    train = next(p for p in (out / "features" / "toy-derm" / COUNTING).iterdir() if "-train-" in p.name)
    n_train = outcome.run_dir.read_json("config.json")["data"]["n"]["train"]
    assert len(json.loads((train / "manifest.json").read_text())["parts"]) == -(-n_train // 8)


def test_seed_free_probes_share_features_across_seeds_and_subsets(toy, tmp_path: Path) -> None:
    """A pre-trained init has no random tensor: every seed and data-efficiency subset reads one feature set."""
    import torch
    from safetensors.torch import save_file

    from medbench.backbones.cbr import build_cbr

    weights = tmp_path / "cbr.safetensors"
    torch.manual_seed(3)
    save_file({k: v.contiguous() for k, v in build_cbr("cbr-tiny", num_classes=1, in_chans=1).state_dict().items()
               if not k.startswith("fc.")}, str(weights))
    out = tmp_path / "out"
    FORWARDED["images"] = 0
    reqs = [_req("linear", init="pretrained", weights=weights, seed=s, **v) for s in (0, 1)
            for v in ({}, {"fraction": 0.5})]
    outcomes = _runner(toy, out).run_all(reqs)
    assert [o.status for o in outcomes] == ["ok"] * 4
    assert FORWARDED["images"] == 72  # once, for two seeds x (full set, half set)
    plain = [o for o in outcomes if not o.result["variant"]]
    # the same features and a deterministic fit: seed 1 repeats seed 0 (so medbench run keeps the first seed)
    assert plain[0].result["metrics"]["test"] == plain[1].result["metrics"]["test"]
    halves = [o.result["variant"]["n_train"] for o in outcomes if o.result["variant"]]
    assert len(halves) == 2


def test_probe_preflight_errors_name_the_field(toy, tmp_path: Path) -> None:
    from medbench.errors import BackboneError, DataError, UsageError

    runner = _runner(toy, tmp_path / "out")
    with pytest.raises(UsageError, match="--freeze applies to --protocol finetune"):
        runner.preflight([_req("linear", freeze="head")])
    with pytest.raises(BackboneError, match="no class token; use --pooling mean"):
        runner.preflight([_req("knn", pooling="cls")])
    data, tasks = toy
    no_val = tmp_path / "tasks"
    no_val.mkdir()
    (no_val / "toy-derm.yaml").write_text(TOY.replace("train: 0.5, val: 0.25, test: 0.25", "train: 0.75, val: 0.0, test: 0.25"))
    runner = Runner(Catalog([no_val]), DataLocations(None, {"toy": data}), RunStore(tmp_path / "o2"))
    with pytest.raises(DataError, match="splits: the linear probe chooses its regularisation on the validation split"):
        runner.preflight([_req("linear")])


# --------------------------------------------------------------------------- run key


def test_fine_tuning_keys_do_not_change_and_probe_settings_enter_the_key() -> None:
    from dataclasses import asdict

    from medbench.run.request import _canonical_variant
    from medbench.spec import ResolvedTask
    from medbench.spec.model import TaskSpec
    from medbench.store import STORE_FORMAT
    from medbench.train.numerics import TRAINING_NUMERICS
    from medbench.utils import sha256_json

    spec = TaskSpec.model_validate({"task": "k", "version": 1, "family": "t", "type": "binary", "labels": ["a"],
                                    "dataset": {"name": "d", "adapter": "synthetic"}})
    task = ResolvedTask(spec, None, "test")
    req = RunRequest(task="k", backbone="cbr-tiny", seed=1, init="random")
    # the key as documented before protocols existed: every set request field, nothing for protocol/pooling
    old_fields = {k: v for k, v in asdict(req).items() if v is not None and k not in ("protocol", "pooling")}
    expected = sha256_json({"store_format": STORE_FORMAT, "request": {**old_fields, "weights": None},
                            "task_hash": task.hash, "data": "fp", "ood": [], "plan": {"p": 1}, "input": None,
                            "world_size": 1, "training_numerics": TRAINING_NUMERICS})
    assert run_key(req, task, "fp", None, plan={"p": 1}) == expected
    bb = get_backbone("cbr-tiny")
    finetune = run_key(_canonical_variant(replace(req, protocol="finetune"), bb), task, "fp", None, plan={"p": 1})
    assert finetune == expected  # --protocol finetune spelled out is the same run
    linear = _canonical_variant(replace(req, protocol="linear", max_steps=9, engine=EngineConfig(zero_stage=2)), bb)
    assert linear.max_steps is None and linear.engine == EngineConfig()  # what a probe does not use is dropped
    keys = {run_key(_canonical_variant(replace(req, protocol=p, pooling=q), bb), task, "fp", None, plan={"p": 1})
            for p, q in (("linear", None), ("knn", None), ("linear", "mean"))}
    assert len(keys) == 3 and expected not in keys


def test_protocols_declared_by_task_suite_and_command_line(tmp_path: Path) -> None:
    from medbench.cli.run import _task_protocols

    base = "version: 1\nfamily: t\ntype: binary\nlabels: [a]\ndataset: {name: d, adapter: synthetic}\n"
    (tmp_path / "t1.yaml").write_text("task: t1\n" + base + "protocols: [linear, knn]\n")
    (tmp_path / "t2.yaml").write_text("task: t2\n" + base)
    (tmp_path / "inner.yaml").write_text("suite: inner\ntasks: [t2]\nprotocols: [knn]\n")
    (tmp_path / "outer.yaml").write_text("suite: outer\ntasks: [t1]\nsuites: [inner]\n")
    (tmp_path / "all.yaml").write_text("suite: all\nsuites: [outer]\nprotocols: [finetune, linear]\n")
    catalog = Catalog([tmp_path])
    assert _task_protocols(catalog, ["t1", "t2"], [], None) == {"t1": ["linear", "knn"], "t2": ["finetune"]}
    assert _task_protocols(catalog, ["t1", "t2"], ["outer"], None) == {"t1": ["linear", "knn"], "t2": ["knn"]}
    assert _task_protocols(catalog, ["t1", "t2"], ["all"], None) == {"t1": ["finetune", "linear"],
                                                                       "t2": ["finetune", "linear"]}
    assert _task_protocols(catalog, ["t1", "t2"], ["all"], ["knn,finetune"]) == {"t1": ["knn", "finetune"],
                                                                                   "t2": ["knn", "finetune"]}
    # a task's protocols say which runs to make, not what one computes: the task hash ignores them
    assert catalog.task("t1").hash == Catalog([tmp_path]).task("t1").hash
    (tmp_path / "t1.yaml").write_text("task: t1\n" + base)
    assert Catalog([tmp_path]).task("t1").hash == catalog.task("t1").hash


def test_cli_protocol_errors_are_one_line(cli, tmp_path: Path) -> None:
    proc = cli("run", "-b", "cbr-tiny", "-t", "smoke-tb", "--protocol", "linaer", "--out", str(tmp_path))
    assert proc.returncode == 2 and "--protocol: unknown protocol 'linaer' (did you mean 'linear'?)" in proc.stderr
    proc = cli("run", "-b", "cbr-tiny", "-t", "smoke-tb", "--pooling", "cls", "--out", str(tmp_path))
    assert proc.returncode == 2 and "--pooling: applies to the probes" in proc.stderr
    proc = cli("run", "-b", "cbr-tiny", "-t", "smoke-tb", "--protocol", "knn", "--freeze", "head", "--out",
               str(tmp_path))
    assert proc.returncode == 2 and "--freeze: applies to --protocol finetune" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("backbone, pooling, dim", [("timm/test_vit", "cls+mean", 128), ("timm/resnet18", None, 512)])
def test_probes_of_timm_architectures_end_to_end(toy, tmp_path: Path, backbone: str, pooling: str | None,
                                                 dim: int) -> None:
    """A small ViT (its class and patch tokens) and a ResNet from timm, random init, through the runner."""
    data, _ = toy
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "toy-derm.yaml").write_text(TOY.replace("input: {resize: 16, crop: 12, channels: 1}",
                                                     "input: {resize: 32, crop: 32, channels: 1}"))
    runner = Runner(Catalog([tasks]), DataLocations(None, {"toy": data}), RunStore(tmp_path / "out"),
                    reporter=Messages(), fail_fast=True)
    reqs = [RunRequest(task="toy-derm", backbone=backbone, seed=0, init="random", protocol=p, pooling=pooling)
            for p in ("linear", "knn")]
    linear, knn = runner.run_all(reqs)
    assert linear.status == knn.status == "ok"
    assert linear.result["probe"]["features"]["dim"] == dim
    assert linear.result["probe"]["pooling"]["name"] == (pooling or "model")
    assert knn.result["probe"]["features"]["embedded_images"] == 0
    assert (linear.run_dir.path / "predictions" / "test.parquet").is_file()


@pytest.mark.slow
def test_feature_extraction_sharded_over_launched_ranks_equals_one_process(tmp_path: Path) -> None:
    """torchrun, 2 CPU processes: each computes part of every feature entry; the probe equals one process's."""
    import socket
    import sys

    from conftest import PROCESS_GROUP_VARS, REPO, run_cli

    args = ["run", "-b", "cbr-tiny", "-t", "smoke-tb", "--seeds", "1", "--init", "random", "--protocol", "linear",
            "--threads", "1"]
    one, two = tmp_path / "one", tmp_path / "two"
    r1 = run_cli(*args, "-o", str(one))
    assert r1.returncode == 0, r1.stderr[-3000:]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in PROCESS_GROUP_VARS}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    r2 = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                         "127.0.0.1", "--master_port", str(port), "-m", "medbench.cli", *args, "-o", str(two)],
                        capture_output=True, text=True, env=env, timeout=900)
    assert r2.returncode == 0, r2.stdout[-2000:] + r2.stderr[-3000:]
    [run1], [run2] = ([p for p in (o / "runs").glob("*/*/*") if p.is_dir()] for o in (one, two))
    assert run1.name == run2.name  # a probe's key does not depend on the world size
    ranks = {json.loads(p.read_text()).get("rank") for p in (two / "features").rglob("part-*.json")}
    assert ranks == {0, 1}
    for split in ("val", "test"):
        np.testing.assert_allclose(_probs(run1, split), _probs(run2, split), atol=1e-5)


def test_knn_vote_shares_as_logits_give_the_shares_back() -> None:
    from medbench.probe.knn import EPS, vote_logits

    shares = np.array([[0.0, 0.25, 0.75], [1.0, 0.0, 0.0], [0.5, 0.5, 0.0]])
    np.testing.assert_allclose(softmax(vote_logits(shares, "multiclass"), axis=1), shares, atol=3 * EPS)
    binary = np.array([[0.0], [0.3], [1.0]])
    logits = vote_logits(binary, "binary")
    assert np.isfinite(logits).all()
    np.testing.assert_allclose(expit(logits), binary, atol=2 * EPS)


def test_seed_free_probe_settings_run_their_first_seed_only() -> None:
    from medbench.run.request import expand_requests

    def plan(init: str) -> list[tuple]:
        reqs = expand_requests(["t"], "b", [0, 1, 2], init=init, weights=None, max_steps=7, engine=EngineConfig(),
                               variants=[{"fraction": 0.5}, {"resolution": 64}], freeze="head",
                               protocols=["finetune", "linear"], pooling="mean")
        return [(r.protocol, r.seed, r.fraction, r.resolution, r.max_steps, r.freeze, r.pooling) for r in reqs]

    finetune = [(None, s, f, r, 7, "head", None) for f, r in ((None, None), (0.5, None), (None, 64)) for s in (0, 1, 2)]
    assert plan("pretrained") == finetune + [("linear", 0, None, None, None, None, "mean")] + \
        [("linear", s, 0.5, None, None, None, "mean") for s in (0, 1, 2)] + [("linear", 0, None, 64, None, None, "mean")]
    assert plan("random") == finetune + [("linear", s, f, r, None, None, "mean")
                                         for f, r in ((None, None), (0.5, None), (None, 64)) for s in (0, 1, 2)]


def test_features_of_a_grey_one_channel_cache_are_those_of_its_three_identical_channels() -> None:
    """Probes read pixels through the evaluation path: a grey cache stored with one channel feeds a 3-channel
    network what the 3 identical channels would, normalised per channel (hand formula in float32)."""
    import torch

    from medbench.data.loader import Normalization
    from medbench.probe.features import embed_rows

    class Identity(torch.nn.Module):  # its features are its (flattened) input
        def forward_embedding(self, x: torch.Tensor) -> torch.Tensor:
            return x.flatten(1)

    rng = np.random.default_rng(3)
    grey = rng.integers(0, 256, size=(7, 1, 6, 6), dtype=np.uint8)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    rows = np.array([5, 0, 3, 3])
    got = embed_rows(Identity(), grey, rows, crop=6, norm=Normalization(mean, std), pooling=None, device="cpu",
                     batch_size=3, channels=3, workers=2)
    x = np.repeat(grey[rows], 3, axis=1).astype(np.float32)
    m = (255 * np.asarray(mean, dtype=np.float32)).reshape(1, 3, 1, 1)
    s = (255 * np.asarray(std, dtype=np.float32)).reshape(1, 3, 1, 1)
    want = ((x - m) / s).reshape(len(rows), -1)
    assert got.shape == want.shape and np.allclose(got, want, rtol=0, atol=1e-6)
    colour = embed_rows(Identity(), np.repeat(grey, 3, axis=1), rows, crop=6, norm=Normalization(mean, std),
                        pooling=None, device="cpu", batch_size=3)
    assert np.array_equal(got, colour)
