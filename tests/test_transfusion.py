"""RZ19's Transfusion tools: Mean-Var, weight transfusion, Gabor init, frozen features, CKA/SVCCA, the recipe."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import REPO, run_cli, shared_data

from medbench.analysis.similarity import compare_models, linear_cka, svcca
from medbench.backbones import create_model, get_backbone
from medbench.backbones.blocks import block_names, tensor_blocks
from medbench.backbones.cbr import build_cbr
from medbench.backbones.init import gabor_bank
from medbench.errors import BackboneError, MedbenchError


def _save(model: torch.nn.Module, path: Path) -> Path:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def _is_batchnorm(key: str) -> bool:
    return key.startswith("blocks.") and key.split(".")[2] == "1"  # blocks.<i>.1.<tensor>: conv, BN, ReLU, pool


@pytest.fixture(scope="session")
def tiny_source(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    """A CBR-Tiny "pre-trained" net whose tensors have distinct means and variances, non-identity BatchNorm."""
    g = torch.Generator().manual_seed(11)
    net = build_cbr("cbr-tiny", num_classes=7, in_chans=1)
    with torch.no_grad():
        for name, t in net.state_dict().items():
            if t.dtype != torch.float32:  # num_batches_tracked
                t.fill_(100)
                continue
            if _is_batchnorm(name):  # BatchNorm: scale, shift and running statistics far from identity
                t.copy_(1.5 + torch.rand(t.shape, generator=g))
            else:
                mu = float(torch.rand((), generator=g)) - 0.5
                sd = 0.01 + 0.3 * float(torch.rand((), generator=g))
                t.copy_(mu + sd * torch.randn(t.shape, generator=g))
    return net, _save(net, tmp_path_factory.mktemp("w") / "tiny.safetensors")


@pytest.fixture(scope="session")
def resnet_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Stand-in for ImageNet weights: a randomly initialised timm ResNet-50 with a fixed seed, its BatchNorm
    layers moved away from identity as training would."""
    import timm

    torch.manual_seed(1234)
    net = timm.create_model("resnet50", num_classes=1000)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5), m.bias.normal_(0, 0.1)
                m.running_mean.normal_(0, 0.1), m.running_var.uniform_(0.5, 1.5)
    return _save(net, tmp_path_factory.mktemp("w") / "r50.safetensors")


# ---------------------------------------------------------------------------------------------- Mean-Var


def test_mean_var_draws_match_each_source_tensor(tiny_source) -> None:
    from scipy import stats

    source, path = tiny_source
    model = create_model("cbr-tiny", num_outputs=2, in_chans=1, init="mean-var", weights=path, seed=3).model
    src = source.state_dict()
    checked = 0
    for name, t in model.state_dict().items():
        if name.startswith("fc."):
            assert torch.count_nonzero(t) == 0
            continue
        if _is_batchnorm(name):  # BatchNorm reset to identity
            want = {"weight": 1.0, "bias": 0.0, "running_mean": 0.0, "running_var": 1.0, "num_batches_tracked": 0}
            assert torch.all(t == want[name.rsplit(".", 1)[1]]), name
            continue
        s, x = src[name].double().flatten(), t.double().flatten()
        n, mu, var = x.numel(), s.mean(), s.var(correction=0)
        # 5 standard errors: of the mean sigma/sqrt(n), of the variance sigma^2 sqrt(2/(n-1))
        assert abs(x.mean() - mu) < 5 * math.sqrt(var / n), name
        assert abs(x.var() / var - 1) < 5 * math.sqrt(2 / (n - 1)), name
        # drawn independently of the source values, not copied or permuted from them
        assert abs(torch.corrcoef(torch.stack([x, s]))[0, 1]) < 5 / math.sqrt(n), name
        if n > 1000:
            assert stats.kstest(((x - mu) / var.sqrt()).numpy(), "norm").pvalue > 1e-3, name
        checked += 1
    assert checked == 8  # four convs: weight and bias each
    again = create_model("cbr-tiny", num_outputs=2, in_chans=1, init="mean-var", weights=path, seed=3).model
    other = create_model("cbr-tiny", num_outputs=2, in_chans=1, init="mean-var", weights=path, seed=4).model
    assert torch.equal(model.blocks[2][0].weight, again.blocks[2][0].weight)
    assert not torch.equal(model.blocks[2][0].weight, other.blocks[2][0].weight)


def test_mean_var_takes_no_argument(tiny_source) -> None:
    with pytest.raises(BackboneError, match="'mean-var' takes no argument"):
        create_model("cbr-tiny", num_outputs=2, in_chans=1, init="mean-var:2", weights=tiny_source[1])


# ---------------------------------------------------------------------------------------------- transfusion


def test_transfusion_copies_exactly_the_first_k_blocks(tiny_source) -> None:
    source, path = tiny_source
    src = source.state_dict()
    rand = create_model("cbr-tiny", num_outputs=2, in_chans=1, init="random", seed=5).model.state_dict()
    names = get_backbone("cbr-tiny").blocks
    for k in range(len(names) + 1):
        model = create_model("cbr-tiny", num_outputs=2, in_chans=1, init=f"transfusion:{k}", weights=path,
                             seed=5).model
        owners = tensor_blocks(model, names)
        for key, t in model.state_dict().items():
            block = owners[key]
            if block is None:  # the head
                assert torch.count_nonzero(t) == 0, key
            elif block < k:
                assert torch.equal(t, src[key]), (k, key)
            else:
                assert torch.equal(t, rand[key]) and not torch.equal(t, src[key]), (k, key)
    for bad, msg in (("transfusion:5", "has 4 blocks"), ("transfusion", "needs the number of blocks"),
                     ("transfusion:x", "needs the number of blocks")):
        with pytest.raises(BackboneError, match=msg):
            create_model("cbr-tiny", num_outputs=2, in_chans=1, init=bad, weights=path)


def test_resnet50_transfusion_of_the_stem_includes_bn1_and_reads_the_hub_cache(
        resnet_weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """transfusion:1 on ResNet-50 = conv1 + bn1 (the stem); weights found in the Hugging Face cache layout."""
    from safetensors.torch import load_file

    snap = tmp_path / "hf" / "models--timm--resnet50.tv_in1k" / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    (snap / "model.safetensors").symlink_to(resnet_weights)
    (tmp_path / "hf" / "models--timm--resnet50.tv_in1k" / "refs").mkdir()
    (tmp_path / "hf" / "models--timm--resnet50.tv_in1k" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf"))  # read at import
    monkeypatch.setenv("MEDBENCH_WEIGHTS", str(tmp_path / "none"))
    built = create_model("resnet50", num_outputs=3, in_chans=3, init="transfusion:1", seed=0)
    assert built.weights_origin == "hub cache"
    src = load_file(str(resnet_weights))
    got = built.model.state_dict()
    copied = {k for k in got if not k.startswith("fc.") and torch.equal(got[k], src[k])
              and not k.endswith("num_batches_tracked")}
    assert copied == {"conv1.weight", "bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var"}


def test_timm_models_without_declared_blocks_use_feature_info() -> None:
    model = create_model("timm/resnet18", num_outputs=2, in_chans=3, init="random").model
    names = block_names(get_backbone("timm/resnet18"), model)
    assert names == ("act1", "layer1", "layer2", "layer3", "layer4")
    owners = tensor_blocks(model, names)
    assert owners["conv1.weight"] == 0 and owners["bn1.bias"] == 0 and owners["layer1.0.conv1.weight"] == 1
    assert owners["fc.weight"] is None


# ---------------------------------------------------------------------------------------------- Gabor


def test_gabor_fills_only_the_first_conv_with_oriented_filters() -> None:
    model = create_model("cbr-small", num_outputs=2, in_chans=1, init="gabor", seed=2).model
    rand = create_model("cbr-small", num_outputs=2, in_chans=1, init="random", seed=2).model.state_dict()
    w = model.blocks[0][0].weight.detach().double()  # 32 x 1 x 7 x 7
    assert torch.allclose(w, gabor_bank(32, 1, 7, 7))
    assert torch.allclose(w.mean((1, 2, 3)), torch.zeros(32, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(w.std((1, 2, 3), correction=0), torch.full((32,), math.sqrt(2 / 49), dtype=torch.float64))
    # orientations k x 22.5 degrees: filter i + 4 is filter i rotated by 90 degrees, for both phases
    for i in (i for i in range(32) if i % 8 < 4):
        assert torch.allclose(w[i + 4, 0], torch.rot90(w[i, 0], -1, (0, 1)), atol=1e-9), i
    assert not torch.allclose(w[0, 0], w[0, 0].T, atol=1e-3)  # oriented, not isotropic
    assert torch.count_nonzero(model.blocks[0][0].bias) == 0
    for key, t in model.state_dict().items():
        if not key.startswith(("blocks.0.0.", "fc.")):
            assert torch.equal(t, rand[key]), key
    with pytest.raises(BackboneError, match="does not read weights"):
        create_model("cbr-small", num_outputs=2, in_chans=1, init="gabor", weights=Path("x.safetensors"))


# ---------------------------------------------------------------------------------------------- similarity


def test_linear_cka_identity_orthogonal_and_scale_invariance() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 40, generator=g, dtype=torch.float64) @ torch.randn(40, 40, generator=g,
                                                                                dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(40, 40, generator=g, dtype=torch.float64))
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x, x @ q) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x, 7.5 * x @ q + 3.0) == pytest.approx(1.0, abs=1e-12)  # scaling, and a shift
    y = torch.randn(300, 40, generator=g, dtype=torch.float64)
    assert linear_cka(x, y) == pytest.approx(linear_cka(2.0 * x @ q, y @ q.T), abs=1e-12)
    assert linear_cka(x, y) < 0.3  # unrelated representations
    xc, yc = x - x.mean(0), y - y.mean(0)  # the feature-space form of Kornblith et al. (2019), Eq. 5
    feature_form = (yc.T @ xc).norm() ** 2 / ((xc.T @ xc).norm() * (yc.T @ yc).norm())
    assert linear_cka(x, y) == pytest.approx(float(feature_form), rel=1e-10)
    skew = torch.diag(torch.linspace(0.1, 10, 40, dtype=torch.float64))
    assert linear_cka(x, x @ skew) < 0.99  # not invariant to arbitrary invertible maps
    assert linear_cka(torch.zeros(10, 3), x[:10]) is None


def test_svcca_identity_and_orthogonal_invariance() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2000, 30, generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(30, 30, generator=g, dtype=torch.float64))
    same, dims = svcca(x, x)
    assert same == pytest.approx(1.0, abs=1e-9) and dims[0] == dims[1] >= 28
    assert svcca(x, 3 * x @ q)[0] == pytest.approx(1.0, abs=1e-9)
    assert svcca(x, torch.randn(2000, 30, generator=g, dtype=torch.float64))[0] < 0.2


def test_model_compared_with_itself_is_1_in_every_layer() -> None:
    model = create_model("cbr-tiny", num_outputs=2, in_chans=1, seed=0).model
    other = create_model("cbr-tiny", num_outputs=2, in_chans=1, seed=1).model
    x = torch.randn(64, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    layers = get_backbone("cbr-tiny").blocks
    same = compare_models(model, model, layers, lambda: [x[:32], x[32:]], methods=("cka", "svcca"))
    assert [r["name"] for r in same] == list(layers)
    assert all(r["cka"] == pytest.approx(1.0, abs=1e-9) and r["svcca"] == pytest.approx(1.0, abs=1e-9) for r in same)
    diff = compare_models(model, other, layers, lambda: [x], methods=("cka",))
    assert diff[-1]["cka"] < 0.99


# ---------------------------------------------------------------------------------------------- frozen features


def _batches(n: int):
    g = torch.Generator().manual_seed(0)
    for step in range(n):
        yield step, torch.randn(8, 1, 16, 16, generator=g), (torch.rand(8, 3, generator=g) < 0.4).float()


@pytest.mark.parametrize(("freeze", "moving"), [("head", ("fc.",)), ("2", ("fc.", "blocks.2.", "blocks.3."))])
def test_frozen_run_changes_only_the_allowed_tensors(freeze: str, moving: tuple[str, ...]) -> None:
    from medbench.spec import HyperRuleSpec
    from medbench.train.distributed import prepare_environment
    from medbench.train.finetune import EngineConfig, Finetuner
    from medbench.train.freeze import apply_freeze, parse_freeze
    from medbench.train.hyperrule import make_plan

    backbone = get_backbone("cbr-tiny")
    model = create_model("cbr-tiny", num_outputs=3, in_chans=1, seed=0).model
    info = apply_freeze(model, backbone, parse_freeze(freeze, backbone))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = make_plan(100, HyperRuleSpec(batch_size=8, base_lr=1.0, schedule=[1, 2, 3, 4, 5]))
    tuner = Finetuner(model, plan, "multilabel", EngineConfig(engine="deepspeed"), prepare_environment(), seed=0)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sum(p.numel() for g in tuner.optimizer.param_groups for p in g["params"]) == info["trainable_params"] \
        == sum(p.numel() for p in trainable)
    tuner.fit(_batches(plan.total_steps))
    after = tuner.module.state_dict()
    for key in before:
        changed = not torch.equal(before[key], after[key])
        allowed = key.startswith(moving)
        if key.endswith(("weight", "running_mean")):  # every trainable weight moves; frozen BN stats stay
            assert changed == allowed, key
        else:
            assert not changed or allowed, key


def test_freeze_spellings() -> None:
    from medbench.train.freeze import parse_freeze

    bb = get_backbone("resnet50")
    assert parse_freeze("HEAD", bb) == "head" and parse_freeze("5", bb) == "head" and parse_freeze("2", bb) == "2"
    for bad in ("0", "6", "all", "-1"):
        with pytest.raises(MedbenchError, match="--freeze"):
            parse_freeze(bad, bb)


@pytest.mark.parametrize(("args", "fragment"), [
    (["--init", "transfusion:9", "--weights", "w.safetensors"], "--init: cbr-tiny has 4 blocks"),
    (["--freeze", "0"], "--freeze: expected 'head' or a number of blocks L >= 1"),
    (["--similarity", "cca"], "--similarity: unknown similarity method 'cca'"),
])
def test_bad_study_options_are_one_line_errors(args: list[str], fragment: str, tmp_path: Path) -> None:
    proc = run_cli("run", "-b", "cbr-tiny", "--task", "smoke-tb", "--out", str(tmp_path), *args)
    assert proc.returncode == 2 and fragment in proc.stderr, proc.stderr
    assert proc.stderr.strip().count("\n") == 0


# ---------------------------------------------------------------------------------------------- recipe


def test_recipe_skips_weight_inits_without_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from medbench.recipes.transfusion import RecipeConfig, plan_requests

    monkeypatch.setenv("MEDBENCH_WEIGHTS", str(tmp_path))
    reqs, skipped = plan_requests(RecipeConfig(task="smoke-tb", backbones=("cbr-small",), seeds=(0, 1)))
    assert [(r.init, r.seed) for r in reqs] == [("random", 0), ("random", 1)]
    assert [s["init"] for s in skipped] == ["pretrained", "mean-var", "transfusion:1", "transfusion:3"]
    assert "no pre-trained weights found" in skipped[0]["reason"]


def test_recipe_end_to_end_on_a_smoke_task(tmp_path: Path, tiny_source, resnet_weights: Path) -> None:
    tiny_rgb = _save(build_cbr("cbr-tiny", num_classes=4, in_chans=3), tmp_path / "tiny-rgb.safetensors")
    args = ["transfusion", "--task", "smoke-tb", "--backbones", "cbr-tiny,resnet50",
            "--inits", "random,pretrained,mean-var,transfusion:1", "--freeze", "head",
            "--weights", f"cbr-tiny={tiny_rgb}", "--weights", f"resnet50={resnet_weights}",
            "--similarity", "cka,svcca", "--seeds", "1", "--max-steps", "2", "--out", str(tmp_path / "out")]
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    folder = tmp_path / "out" / "transfusion" / "smoke-tb"
    report = json.loads((folder / "report.json").read_text())
    assert report["arms"] == ["random", "pretrained", "mean-var", "transfusion:1", "pretrained+freeze-head"]
    t1 = {r["backbone"]: r for r in report["table1"]}
    assert t1["cbr-tiny"]["params_rz19_convention"] == t1["cbr-tiny"]["params_rz19_table1"] == 1_076_480
    assert t1["resnet50"]["params_rz19_table1"] is None
    for row in t1.values():
        for arm in report["arms"]:
            assert 0.0 <= row[arm]["mean"] <= 1.0 and row[arm]["n"] == 1
    assert [r["label"] for r in report["table2"]] == ["tuberculosis"]
    assert set(report["table2"][0]) == {"label", "cbr-tiny random", "cbr-tiny pretrained", "resnet50 random",
                                        "resnet50 pretrained"}
    sims = report["similarity"]
    assert sims["resnet50"]["pretrained"]["layers"] == ["conv1", "layer1", "layer2", "layer3", "layer4"]
    assert len(sims["cbr-tiny"]["random"]["cka"]) == 4
    for bb in ("cbr-tiny", "resnet50"):
        # frozen features: the fine-tuned network's blocks compute exactly the initial ones
        assert sims[bb]["pretrained+freeze-head"]["cka"] == pytest.approx([1.0] * len(sims[bb]["random"]["cka"]))
        assert all(0.0 <= v <= 1.0 + 1e-9 for e in sims[bb].values() for m in ("cka", "svcca") for v in e[m])
    assert min(sims["resnet50"]["mean-var"]["cka"]) < 0.999  # fine-tuning moved it
    assert report["convergence"]["resnet50"]["random"]["step"] == [1, 2]
    for name in ("table1.md", "table2.md", "similarity.md", "table1.csv", "report.md", "leaderboard.json"):
        assert (folder / name).stat().st_size > 0, name
    for name in ("convergence.png", "similarity.png"):
        assert (folder / name).read_bytes()[:4] == b"\x89PNG"
    run_dirs = sorted(p.name for p in (tmp_path / "out" / "runs" / "smoke-tb" / "resnet50").iterdir())
    assert len(run_dirs) == 5 and sum("freeze-head" in d for d in run_dirs) == 1
    frozen = next((tmp_path / "out" / "runs" / "smoke-tb" / "resnet50").glob("pretrained-seed0-freeze-head-*"))
    result = json.loads((frozen / "result.json").read_text())
    assert result["regime"] == "freeze-head" and result["freeze"]["trainable_params"] == 2049
    assert (frozen / "similarity.json").is_file() and (frozen / "similarity.png").is_file()
    board = json.loads((folder / "leaderboard.json").read_text())
    assert sum(e.get("regime") == "freeze-head" for e in board["entries"]) == 2 and len(board["entries"]) == 10
    # the same command again reuses every run and rebuilds the same tables
    again = run_cli(*args)
    assert again.returncode == 0 and "10 run(s) were already complete and reused" in again.stdout
    assert json.loads((folder / "report.json").read_text())["table1"] == report["table1"]


# ---------------------------------------------------------------------------------------------- recipe, real data

#: PneumoniaMNIST (../shared/data/medmnist, real paediatric chest X-rays, 28 px) through a --tasks-dir override of
#: the built-in task that changes only the compute knobs: native 28 px instead of the 160 -> 128 upscaling, batch
#: 64, one seed. Dataset, labels, official split and metrics are the built-in task's.
PNEUMONIA_CPU = ("input: {resize: 28, crop: 24}\n"
                 "hyperrule: {batch_size: 64, base_lr: 0.2, schedule: [10, 50, 80, 95, 100], mixup_alpha: 0.0}\n"
                 "default_seeds: 1\n")
REAL_STEPS = 6


@pytest.mark.shared
@pytest.mark.slow
def test_recipe_end_to_end_on_real_pneumoniamnist(tmp_path: Path, resnet_weights: Path) -> None:
    """`medbench transfusion` on real radiographs: CBR-Tiny and ResNet-50 (stand-in weights), four inits and a
    linear probe; tables, per-run per-layer CKA, convergence plot; the rerun trains nothing."""
    import polars as pl
    from PIL import Image

    data = shared_data("medmnist", "pneumoniamnist.npz").parent
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    builtin = REPO / "tasks" / "medmnist" / "pneumoniamnist.yaml"
    (tasks / "pneumoniamnist.yaml").write_text(f"task: pneumoniamnist\ninclude: {builtin}\n{PNEUMONIA_CPU}")
    torch.manual_seed(7)  # the CBR stand-in: a seeded net of its own, one input channel like the task
    tiny = _save(build_cbr("cbr-tiny", num_classes=2, in_chans=1), tmp_path / "cbr-tiny.safetensors")
    inits = ["random", "pretrained", "mean-var", "transfusion:1"]
    arms = [*inits, "pretrained+freeze-head"]
    out = tmp_path / "out"
    args = ["transfusion", "--task", "pneumoniamnist", "--tasks-dir", str(tasks), "--data", f"medmnist={data}",
            "--backbones", "cbr-tiny,resnet50", "--inits", ",".join(inits), "--freeze", "head",
            "--weights", f"cbr-tiny={tiny}", "--weights", f"resnet50={resnet_weights}",
            "--seeds", "1", "--max-steps", str(REAL_STEPS), "--out", str(out)]
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    folder = out / "transfusion" / "pneumoniamnist"
    report = json.loads((folder / "report.json").read_text())
    assert report["skipped"] == []  # both backbones had weights: every arm was planned
    assert report["arms"] == arms and report["headline"] == "auc" and len(report["runs"]) == 10

    # the runs read the real file: the publisher's split of this copy, not a synthetic stand-in
    run_root = out / "runs" / "pneumoniamnist"
    runs = {(bb, json.loads((p / "result.json").read_text())["init"], "freeze-head" in p.name): p
            for bb in ("cbr-tiny", "resnet50") for p in (run_root / bb).iterdir()}
    assert len(runs) == 10
    for path in runs.values():
        config = json.loads((path / "config.json").read_text())
        assert config["data"]["n"] == {"train": 2428, "val": 270, "test": 468}, path.name

    # Table 1: a row per backbone, a numeric test AUC in every arm's column (report.json, CSV and Markdown agree)
    t1 = {r["backbone"]: r for r in report["table1"]}
    assert t1["cbr-tiny"]["params_rz19_convention"] == 1_076_480 and t1["cbr-tiny"]["params_as_run"] == 1_077_440
    assert t1["resnet50"]["params_as_run"] == 23_501_760  # one input channel, no head
    csv1 = {r["backbone"]: r for r in pl.read_csv(folder / "table1.csv").to_dicts()}
    md1 = {line.split("|")[1].strip(): line for line in (folder / "table1.md").read_text().splitlines()[2:]}
    assert set(t1) == set(csv1) == set(md1) == {"cbr-tiny", "resnet50"}
    header = [c.strip() for c in (folder / "table1.md").read_text().splitlines()[0].strip("|").split("|")]
    assert header[-len(arms):] == arms
    for bb, row in t1.items():
        cells = [c.strip() for c in md1[bb].strip("|").split("|")][-len(arms):]
        for arm, cell in zip(arms, cells):
            value = row[arm]["mean"]
            assert isinstance(value, float) and 0.0 <= value <= 1.0 and row[arm]["n"] == 1, (bb, arm)
            assert csv1[bb][arm] == pytest.approx(value) and cell == f"{value:.4f}", (bb, arm)
    # real images carry signal even after a few steps: the best CBR arm is well above chance
    assert max(t1["cbr-tiny"][arm]["mean"] for arm in arms) > 0.7, t1["cbr-tiny"]

    # Table 2: per-label AUC from the saved predictions = the runs' own headline (one binary label)
    (t2,) = report["table2"]
    assert t2["label"] == "pneumonia"
    assert set(t2) == {"label"} | {f"{bb} {arm}" for bb in t1 for arm in ("random", "pretrained")}
    for bb in t1:
        for arm in ("random", "pretrained"):
            assert t2[f"{bb} {arm}"]["mean"] == pytest.approx(t1[bb][arm]["mean"], abs=1e-6), (bb, arm)
    assert pl.read_csv(folder / "table2.csv")["cbr-tiny random"][0] == pytest.approx(t2["cbr-tiny random"]["mean"])

    # per-layer CKA stored in every run: one value per block, in [0, 1]; exactly the initial network when frozen
    for (bb, init, frozen), path in runs.items():
        sim = json.loads((path / "similarity.json").read_text())
        assert [layer["name"] for layer in sim["layers"]] == list(get_backbone(bb).blocks), path.name
        cka = [layer["cka"] for layer in sim["layers"]]
        assert all(isinstance(v, float) and -1e-9 <= v <= 1.0 + 1e-9 for v in cka), (path.name, cka)
        if frozen:
            assert cka == pytest.approx([1.0] * len(cka), abs=1e-6), path.name
        else:  # fine-tuning on real images moved the deepest block
            assert cka[-1] < 0.999, (path.name, cka)
        arm = init + ("+freeze-head" if frozen else "")
        assert report["similarity"][bb][arm]["cka"] == pytest.approx(cka), (bb, arm)
    sim_rows = pl.read_csv(folder / "similarity.csv")
    assert sim_rows.height == sum(len(get_backbone(bb).blocks) for bb in t1) * len(arms)

    # convergence: a validation curve per (backbone, arm) over every step, and a real two-panel PNG
    for bb in t1:
        assert list(report["convergence"][bb]) == arms
        for arm, curve in report["convergence"][bb].items():
            assert curve["step"] == list(range(1, REAL_STEPS + 1)), (bb, arm)
            assert all(0.0 <= v <= 1.0 for v in curve["val_metric"]), (bb, arm)
    with Image.open(folder / "convergence.png") as img:
        assert img.format == "PNG" and img.width > 2 * img.height  # a panel per backbone, side by side
        img.load()
        lo, hi = img.convert("L").getextrema()
        assert hi - lo > 100  # something was drawn
    assert (folder / "similarity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the same command again: every run reused (no run folder written to), the same tables
    stamps = {p: [(f, f.stat().st_mtime_ns) for f in sorted(p.rglob("*")) if f.is_file()] for p in runs.values()}
    again = run_cli(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "10 run(s) were already complete and reused" in again.stdout
    assert {p.name for bb in t1 for p in (run_root / bb).iterdir()} == {p.name for p in runs.values()}
    for p, files in stamps.items():
        assert [(f, f.stat().st_mtime_ns) for f in sorted(p.rglob("*")) if f.is_file()] == files, p.name
    rebuilt = json.loads((folder / "report.json").read_text())
    assert rebuilt["table1"] == report["table1"] and rebuilt["table2"] == report["table2"]
    assert rebuilt["similarity"] == report["similarity"]
