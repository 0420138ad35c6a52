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
