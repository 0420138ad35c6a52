"""The backbone registry, CBR nets, weights loading and the offline failure path."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from medbench.backbones import create_model, get_backbone, list_backbones
from medbench.backbones.cbr import CBR_LAYOUTS, build_cbr, paper_convention_params
from medbench.errors import BackboneError


def test_registered_parameter_counts_match_the_built_networks() -> None:
    for bb in list_backbones():
        with torch.device("meta"):
            model = bb.build(num_classes=0, in_chans=3)
        assert sum(p.numel() for p in model.parameters()) == bb.params, bb.name


def test_builtin_names() -> None:
    names = {b.name for b in list_backbones()}
    for size in ("r50x1", "r50x3", "r101x1", "r101x3", "r152x2", "r152x4"):
        assert f"bit-m-{size}" in names and f"bit-s-{size}" in names
    assert {"resnet50", "cbr-large-t", "cbr-large-w", "cbr-small", "cbr-tiny"} <= names
    assert get_backbone("bit-m-r101x3").hub_id == "timm/resnetv2_101x3_bit.goog_in21k"
    assert get_backbone("cbr-small").default_init == "random"
    assert get_backbone("bit-m-r50x1").default_init == "pretrained"


def test_cbr_counts_against_rz19_table1() -> None:
    ours = {n: paper_convention_params(build_cbr(n, num_classes=0, in_chans=1)) for n in CBR_LAYOUTS}
    assert ours == {"cbr-large-t": 8_532_480, "cbr-large-w": 8_433_664, "cbr-small": 2_109_440,
                    "cbr-tiny": 1_076_480}
    # exact where the paper's table can be reproduced: LargeT and Tiny (table layout 32..256)
    assert ours["cbr-large-t"] == CBR_LAYOUTS["cbr-large-t"].paper_params
    assert ours["cbr-tiny"] == CBR_LAYOUTS["cbr-tiny"].paper_params


def test_unknown_backbone_suggests() -> None:
    with pytest.raises(BackboneError, match=r"unknown backbone 'cbr-smal' \(did you mean 'cbr-small'"):
        get_backbone("cbr-smal")
    with pytest.raises(BackboneError, match=r"timm has no model 'resnet5'"):
        get_backbone("timm/resnet5")


def test_head_is_zero_initialised_and_random_init_is_seeded() -> None:
    a = create_model("cbr-tiny", num_outputs=3, in_chans=1, seed=7).model
    b = create_model("cbr-tiny", num_outputs=3, in_chans=1, seed=7).model
    c = create_model("cbr-tiny", num_outputs=3, in_chans=1, seed=8).model
    assert torch.count_nonzero(a.fc.weight) == 0 and torch.count_nonzero(a.fc.bias) == 0
    assert torch.equal(a.blocks[0][0].weight, b.blocks[0][0].weight)
    assert not torch.equal(a.blocks[0][0].weight, c.blocks[0][0].weight)
    out = a(torch.randn(2, 1, 32, 32))
    assert out.shape == (2, 3) and torch.count_nonzero(out) == 0


def test_timm_any_model() -> None:
    built = create_model("timm/resnet18", num_outputs=2, in_chans=3, init="random")
    assert built.model(torch.randn(1, 3, 64, 64)).shape == (1, 2)
    assert built.backbone.source == "timm"


def _save_safetensors(model: torch.nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


def test_local_safetensors_weights_load_exactly(tmp_path: Path) -> None:
    import timm

    source = timm.create_model("resnet50", num_classes=1000)
    _save_safetensors(source, tmp_path / "w.safetensors")
    built = create_model("resnet50", num_outputs=4, in_chans=3, init="pretrained", weights=tmp_path / "w.safetensors")
    assert torch.equal(built.model.layer4[2].conv3.weight, source.layer4[2].conv3.weight)
    assert torch.count_nonzero(built.model.fc.weight) == 0  # the task's head, not ImageNet's
    assert built.weights_origin == "file"
    prov = built.provenance()
    assert len(prov["weights_sha256"]) == 64 and prov["init"] == "pretrained"
    # one input channel: the stem is summed over RGB (timm's adapt_input_conv)
    grey = create_model("resnet50", num_outputs=4, in_chans=1, init="pretrained", weights=tmp_path / "w.safetensors")
    assert torch.allclose(grey.model.conv1.weight, source.conv1.weight.sum(1, keepdim=True))


def test_mismatched_weights_are_refused(tmp_path: Path) -> None:
    _save_safetensors(build_cbr("cbr-tiny", num_classes=2, in_chans=1), tmp_path / "tiny.safetensors")
    with pytest.raises(BackboneError, match=r"tiny.safetensors: --weights: .*shape"):
        create_model("cbr-small", num_outputs=2, in_chans=1, init="pretrained", weights=tmp_path / "tiny.safetensors")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(BackboneError, match=r"junk.pth: --weights: cannot read weights"):
        create_model("cbr-small", num_outputs=2, in_chans=1, init="pretrained", weights=tmp_path / "junk.pth")


def _google_bit_npz(model: torch.nn.Module, path: Path) -> None:
    """Write ``model`` (timm ResNetV2) in the layout of Google's released BiT ``.npz`` files."""

    def hwio(t: torch.Tensor) -> np.ndarray:
        a = t.detach().numpy()
        return a.transpose(2, 3, 1, 0) if a.ndim == 4 else a

    w = {
        "resnet/root_block/standardized_conv2d/kernel": hwio(model.stem.conv.weight),
        "resnet/group_norm/gamma": hwio(model.norm.weight),
        "resnet/group_norm/beta": hwio(model.norm.bias),
        "resnet/head/conv2d/kernel": hwio(model.head.fc.weight),
        "resnet/head/conv2d/bias": hwio(model.head.fc.bias),
    }
    for i, stage in enumerate(model.stages):
        for j, block in enumerate(stage.blocks):
            p = f"resnet/block{i + 1}/unit{j + 1:02d}/"
            for letter, k in zip("abc", (1, 2, 3)):
                w[f"{p}{letter}/standardized_conv2d/kernel"] = hwio(getattr(block, f"conv{k}").weight)
                w[f"{p}{letter}/group_norm/gamma"] = hwio(getattr(block, f"norm{k}").weight)
                w[f"{p}{letter}/group_norm/beta"] = hwio(getattr(block, f"norm{k}").bias)
            if block.downsample is not None:
                w[f"{p}a/proj/standardized_conv2d/kernel"] = hwio(block.downsample.conv.weight)
    np.savez(path, **w)


def test_bit_s_loads_googles_npz(tmp_path: Path) -> None:
    import timm

    torch.manual_seed(0)
    source = timm.create_model("resnetv2_50x1_bit", num_classes=10)
    _google_bit_npz(source, tmp_path / "BiT-S-R50x1.npz")
    built = create_model("bit-s-r50x1", num_outputs=2, in_chans=3, weights=tmp_path / "BiT-S-R50x1.npz")
    got, want = built.model.stages[3].blocks[2].conv2.weight, source.stages[3].blocks[2].conv2.weight
    assert torch.equal(got, want)
    assert torch.equal(built.model.stem.conv.weight, source.stem.conv.weight)
    assert torch.count_nonzero(built.model.head.fc.weight) == 0


def test_bit_s_without_file_says_where_to_get_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MEDBENCH_WEIGHTS", str(tmp_path))
    with pytest.raises(BackboneError, match=r"storage.googleapis.com/bit_models/BiT-S-R50x1.npz.*--init random"):
        create_model("bit-s-r50x1", num_outputs=2, in_chans=3)


def test_weights_folder_is_used(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    source = build_cbr("cbr-tiny", num_classes=5, in_chans=1)
    _save_safetensors(source, tmp_path / "cbr-tiny.safetensors")
    monkeypatch.setenv("MEDBENCH_WEIGHTS", str(tmp_path))
    built = create_model("cbr-tiny", num_outputs=2, in_chans=1, init="pretrained")
    assert built.weights_origin == "local weights folder"
    assert torch.equal(built.model.blocks[3][0].weight, source.blocks[3][0].weight)


def test_preflight_weights_keep_their_origin_in_provenance(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The CLI resolves the weights before any run and hands the runs a path: the run's provenance still
    says the local weights folder, in this process and in a fresh one (a dispatched job)."""
    from medbench.backbones import weights
    from medbench.backbones.init import preflight

    _save_safetensors(build_cbr("cbr-tiny", num_classes=5, in_chans=1), tmp_path / "cbr-tiny.safetensors")
    monkeypatch.setenv("MEDBENCH_WEIGHTS", str(tmp_path))
    monkeypatch.setattr(weights, "_FOUND", {})
    init, path = preflight(get_backbone("cbr-tiny"), "pretrained", None)  # what cli._run does
    assert path == tmp_path / "cbr-tiny.safetensors"
    prov = create_model("cbr-tiny", num_outputs=2, in_chans=1, init=init, weights=path).provenance(hash_weights=False)
    assert prov["weights_origin"] == "local weights folder" and prov["weights_file"] == str(path)
    monkeypatch.setattr(weights, "_FOUND", {})  # a fresh process: the origin is read from where the file lies
    assert create_model("cbr-tiny", num_outputs=2, in_chans=1, init=init, weights=path).weights_origin == \
        "local weights folder"
    # the same tensors given as a file elsewhere are a file
    other = tmp_path / "elsewhere" / "cbr-tiny.safetensors"
    other.parent.mkdir()
    other.write_bytes(path.read_bytes())
    assert create_model("cbr-tiny", num_outputs=2, in_chans=1, init=init, weights=other).weights_origin == "file"


def test_hub_weights_keep_their_origin(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from dataclasses import replace

    from medbench.backbones import registry, weights
    from medbench.backbones.init import preflight

    bb = replace(get_backbone("cbr-tiny"), name="cbr-tiny-hub", hub_id="someone/cbr-tiny")
    monkeypatch.setitem(registry._REGISTRY, bb.name, bb)
    monkeypatch.setenv("MEDBENCH_WEIGHTS", str(tmp_path / "empty"))
    snapshot = tmp_path / "hf" / "models--someone--cbr-tiny" / "snapshots" / "0123abc" / "model.safetensors"
    snapshot.parent.mkdir(parents=True)
    _save_safetensors(build_cbr("cbr-tiny", num_classes=5, in_chans=1), snapshot)

    def origin_of_run(path: Path) -> str:
        return create_model(bb.name, num_outputs=2, in_chans=1, init="pretrained", weights=path).weights_origin

    # in the hub cache
    monkeypatch.setattr(weights, "_FOUND", {})
    monkeypatch.setattr(weights, "_cached_hub_file", lambda hub_id, *names: snapshot)
    _, path = preflight(bb, "pretrained", None)
    assert origin_of_run(path) == "hub cache"
    # downloaded by the preflight (network probe and download faked)
    monkeypatch.setattr(weights, "_FOUND", {})
    monkeypatch.setattr(weights, "_cached_hub_file", lambda hub_id, *names: None)
    monkeypatch.setattr(weights, "hub_offline", lambda: False)
    monkeypatch.setattr(weights, "network_reachable", lambda timeout=0: True)
    monkeypatch.setattr(weights, "_download_hub_file", lambda hub_id, *names: snapshot)
    _, path = preflight(bb, "pretrained", None)
    assert origin_of_run(path) == "hub download"
    monkeypatch.setattr(weights, "_FOUND", {})  # a fresh process sees the file in the cache
    assert origin_of_run(path) == "hub cache"


@pytest.mark.parametrize("offline_env", ["1", ""])
def test_no_network_fails_fast_with_instructions(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                 offline_env: str) -> None:
    """Hub weights with no network: a one-line error within seconds (probe, no retries)."""
    monkeypatch.setenv("MEDBENCH_WEIGHTS", str(tmp_path))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", offline_env)
    monkeypatch.setenv("MEDBENCH_OFFLINE", offline_env)
    monkeypatch.setenv("HF_ENDPOINT", "https://huggingface.invalid")  # never reachable, network or not
    t0 = time.perf_counter()
    with pytest.raises(BackboneError) as info:
        create_model("bit-m-r50x1", num_outputs=2, in_chans=3)
    assert time.perf_counter() - t0 < 10
    msg = str(info.value)
    assert "timm/resnetv2_50x1_bit.goog_in21k" in msg and "--weights FILE" in msg and "--init random" in msg
    assert ("offline" in msg) if offline_env else ("no network" in msg)


def test_list_backbones_shows_normalization(capsys: pytest.CaptureFixture) -> None:
    import json

    from medbench.cli import main

    def listing(*args: str) -> str:
        with pytest.raises(SystemExit) as exc:
            main(["list", "backbones", *args])
        assert exc.value.code == 0
        return capsys.readouterr().out

    rows = {r["name"]: r for r in json.loads(listing("--json"))}
    for bb in list_backbones():
        assert (rows[bb.name]["mean"], rows[bb.name]["std"]) == (list(bb.mean), list(bb.std)), bb.name
    assert rows["resnet50"]["mean"] == [0.485, 0.456, 0.406] and rows["resnet50"]["std"] == [0.229, 0.224, 0.225]
    assert rows["bit-m-r50x1"]["mean"] == [0.5, 0.5, 0.5] and rows["cbr-tiny"]["std"] == [0.5, 0.5, 0.5]
    assert rows["timm/<model>"]["mean"] is None  # each timm model's own pretrained config
    text = listing()
    assert "┃ normalization" in text and "┃ mean" not in text  # one column for both triples
    table = {line.split("│")[1].strip(): line for line in text.splitlines() if line.startswith("│")}
    assert "│ ImageNet " in table["resnet50"] and "│ mean 0.5 std 0.5 " in table["bit-m-r50x1"]
    assert "per model config" in table["timm/<model>"]


# ------------------------------------------------------------------ plug-ins (entry point group medbench.backbones)

PLUGIN_MODULE = """
from medbench.backbones.cbr import build_cbr

def build(*, num_classes, in_chans):
    \"\"\"A toy plug-in network.\"\"\"
    return build_cbr("cbr-tiny", num_classes=num_classes, in_chans=in_chans)

NOT_A_BACKBONE = 3
"""


@pytest.fixture
def fake_backbone_plugins(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """Entry points: two good plug-ins around three broken ones; a registry as in a fresh process."""
    from importlib.metadata import EntryPoint

    from medbench import plugins
    from medbench.backbones import registry

    (tmp_path / "medbench_fake_bb_plugin.py").write_text(PLUGIN_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    group = registry.BACKBONE_ENTRY_POINT_GROUP
    eps = [EntryPoint("toy-first", "medbench_fake_bb_plugin:build", group),
           EntryPoint("toy-broken", "medbench_no_such_module:build", group),
           EntryPoint("toy-wrong", "medbench_fake_bb_plugin:NOT_A_BACKBONE", group),
           EntryPoint("resnet50", "medbench_fake_bb_plugin:build", group),
           EntryPoint("toy-last", "medbench_fake_bb_plugin:build", group)]
    list_backbones()  # built-ins registered before the copy
    monkeypatch.setattr(registry, "_REGISTRY", {k: v for k, v in registry._REGISTRY.items() if v.source == "medbench"})
    monkeypatch.setattr(registry, "_PLUGINS_LOADED", False)
    monkeypatch.setattr(registry, "_PLUGIN_FAILURES", {})
    monkeypatch.setattr(plugins, "_WARNED", set())
    monkeypatch.setattr(registry, "entry_points", lambda group: eps if group == registry.BACKBONE_ENTRY_POINT_GROUP
                        else [])
    return eps


def test_broken_backbone_plugins_warn_and_the_rest_load(fake_backbone_plugins, capsys: pytest.CaptureFixture) -> None:
    names = {b.name: b for b in list_backbones()}
    assert {"toy-first", "toy-last"} <= set(names) and not {"toy-broken", "toy-wrong"} & set(names)
    assert names["resnet50"].source == "medbench"  # a plug-in cannot take a built-in name
    assert names["toy-last"].description == "A toy plug-in network."
    warnings = capsys.readouterr().err.splitlines()
    assert warnings == [
        "medbench: warning: entry point 'toy-broken' (medbench.backbones = 'medbench_no_such_module:build') failed "
        "to load: ModuleNotFoundError: No module named 'medbench_no_such_module'; skipped",
        "medbench: warning: entry point 'toy-wrong' (medbench.backbones = 'medbench_fake_bb_plugin:NOT_A_BACKBONE') "
        "failed to load: loads to int, neither a medbench Backbone nor a callable; skipped",
        "medbench: warning: entry point 'resnet50' (medbench.backbones = 'medbench_fake_bb_plugin:build') failed to "
        "load: registers 'resnet50', a built-in name; choose another; skipped",
    ]
    list_backbones()
    assert capsys.readouterr().err == ""  # once per process
    with pytest.raises(BackboneError) as info:
        get_backbone("toy-broken")
    message = str(info.value)
    assert message.startswith("--backbone: backbone 'toy-broken' comes from a plug-in that does not load: entry point "
                              "'toy-broken' (medbench.backbones = 'medbench_no_such_module:build')")
    assert message.endswith("ModuleNotFoundError: No module named 'medbench_no_such_module'") and "\n" not in message


def test_asking_for_a_broken_backbone_first_keeps_the_others(fake_backbone_plugins,
                                                              capsys: pytest.CaptureFixture) -> None:
    """The first plug-in lookup of the process names the broken one: its error, and the later plug-ins load."""
    with pytest.raises(BackboneError, match=r"'toy-broken' comes from a plug-in .*No module named"):
        get_backbone("toy-broken")
    err = capsys.readouterr().err
    assert "toy-broken" not in err and "toy-wrong" in err  # the error says it; the others are warned about
    built = create_model("toy-last", num_outputs=2, in_chans=1, init="random")
    assert built.backbone.source == "entry point ?" and built.model(torch.randn(1, 1, 32, 32)).shape == (1, 2)
    with pytest.raises(BackboneError, match=r"unknown backbone 'toy-nope'"):
        get_backbone("toy-nope")

