"""Foundation encoders through their own libraries (timm hf-hub, open_clip, transformers), random-init
configurations of the real architectures, weights and configurations from a local Hugging Face cache.

Oracles: each library's own forward (timm's ``forward_head``, open_clip's tower and its ``output_tokens``,
transformers' ``pooler_output``) on the same weights; a hand formula for the one-channel input.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medbench.backbones import get_backbone
from medbench.backbones.create import create_model
from medbench.backbones.init import preflight
from medbench.backbones.pooling import pooled_features
from medbench.errors import BackboneError

REVISION = "0" * 40


def _safetensors(state: dict) -> bytes:
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in state.items()})


@pytest.fixture
def hub(tmp_path: Path, monkeypatch):
    """A Hugging Face cache folder the hub client reads (offline); ``hub(repo, files)`` adds a repository."""
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def add(repo: str, files: dict[str, bytes]) -> Path:
        base = tmp_path / "hub" / f"models--{repo.replace('/', '--')}"
        (base / "refs").mkdir(parents=True)
        (base / "refs" / "main").write_text(REVISION)
        snap = base / "snapshots" / REVISION
        snap.mkdir(parents=True)
        for name, data in files.items():
            (snap / name).write_bytes(data)
        return snap

    return add


def test_timm_hf_hub_model_from_the_cache_with_its_own_config(hub) -> None:
    import timm

    torch.manual_seed(0)
    reference = timm.create_model("test_vit", pretrained=False, num_classes=10)
    config = {"architecture": "test_vit", "num_classes": 10,
              "pretrained_cfg": {"mean": [0.4, 0.4, 0.4], "std": [0.2, 0.25, 0.3], "input_size": [3, 160, 160],
                                 "fixed_input_size": True, "classifier": "head"}}
    hub("test-org/tiny-vit", {"config.json": json.dumps(config).encode(),
                              "model.safetensors": _safetensors(reference.state_dict())})
    bb = get_backbone("timm/hf-hub:test-org/tiny-vit")
    assert (bb.mean, bb.std, bb.default_resolution) == ((0.4, 0.4, 0.4), (0.2, 0.25, 0.3), 160)
    init, path = preflight(bb, None, None)
    assert init == "pretrained" and path.name == "model.safetensors"
    built = create_model(bb, num_outputs=2, in_chans=3, init="pretrained", weights=path)
    assert built.weights_origin == "hub cache"
    model = built.model.eval()
    reference.eval()
    x = torch.randn(2, 3, 160, 160)
    with torch.no_grad():
        torch.testing.assert_close(pooled_features(model, x, None), reference.forward_head(
            reference.forward_features(x), pre_logits=True))
        small = torch.randn(2, 3, 32, 32)  # the task's crop: position embeddings interpolated (dynamic size)
        assert pooled_features(model, small, "cls+mean").shape == (2, 128)


def test_hub_names_fail_fast_offline_with_what_to_fetch(hub) -> None:
    for name in ("timm/hf-hub:test-org/absent", "hf/test-org/absent", "open_clip/hf-hub:test-org/absent"):
        with pytest.raises(BackboneError) as err:
            get_backbone(name)
        text = str(err.value)
        assert "offline" in text and "huggingface-cli download test-org/absent" in text and "\n" not in text


def _dino_repo(hub) -> tuple[torch.nn.Module, dict]:
    from transformers import AutoModel, Dinov2Config

    config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                          patch_size=4, image_size=32)
    torch.manual_seed(0)
    reference = AutoModel.from_config(config).eval()
    pre = {"image_mean": [0.5, 0.45, 0.4], "image_std": [0.25, 0.2, 0.3], "crop_size": {"height": 32, "width": 32}}
    hub("test-org/tiny-dino", {"config.json": json.dumps(config.to_dict()).encode(),
                               "preprocessor_config.json": json.dumps(pre).encode(),
                               "model.safetensors": _safetensors(reference.state_dict())})
    return reference, pre


def test_transformers_encoder_with_its_normalisation_and_weights(hub) -> None:
    reference, pre = _dino_repo(hub)
    bb = get_backbone("hf/test-org/tiny-dino")
    assert bb.mean == tuple(pre["image_mean"]) and bb.std == tuple(pre["image_std"]) and bb.default_resolution == 32
    _, path = preflight(bb, "pretrained", None)
    model = create_model(bb, num_outputs=3, in_chans=3, init="pretrained", weights=path).model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = reference(pixel_values=x)
        torch.testing.assert_close(pooled_features(model, x, None), out.pooler_output)
        torch.testing.assert_close(pooled_features(model, x, "mean"), out.last_hidden_state[:, 1:].mean(1))
        assert model(x).shape == (2, 3)


def test_one_channel_input_is_the_grey_rgb_image_in_the_models_normalisation(hub) -> None:
    from medbench.data.loader import Normalization, normalize

    reference, pre = _dino_repo(hub)
    bb = get_backbone("hf/test-org/tiny-dino")
    _, path = preflight(bb, "pretrained", None)
    model = create_model(bb, num_outputs=3, in_chans=1, init="pretrained", weights=path).model.eval()
    grey = np.random.default_rng(0).integers(0, 256, size=(2, 1, 32, 32), dtype=np.uint8)
    one = normalize(torch.from_numpy(grey), Normalization(bb.mean, bb.std), channels=1)  # what the loader feeds a 1-channel task
    mean, std = np.array(pre["image_mean"]), np.array(pre["image_std"])
    rgb = torch.tensor((np.repeat(grey, 3, 1) / 255.0 - mean[None, :, None, None]) / std[None, :, None, None],
                       dtype=torch.float32)  # the hand formula: the grey image as RGB, per-channel normalised
    with torch.no_grad():
        torch.testing.assert_close(pooled_features(model, one, None), reference(pixel_values=rgb).pooler_output,
                                   atol=2e-5, rtol=1e-4)


def test_open_clip_tower_random_init_and_weights_from_a_file(tmp_path: Path) -> None:
    import open_clip
    from safetensors.torch import save_file

    bb = get_backbone("open_clip/ViT-S-32")
    assert bb.mean == tuple(open_clip.OPENAI_DATASET_MEAN) and bb.default_init == "random"
    torch.manual_seed(1)
    tower = create_model(bb, num_outputs=2, in_chans=3, init="random", seed=1).model.encoder
    path = tmp_path / "clip.safetensors"
    save_file({f"visual.{k}": v.contiguous() for k, v in tower.state_dict().items()} | {"text.dummy": torch.zeros(1)},
              str(path))
    model = create_model(bb, num_outputs=2, in_chans=3, init="pretrained", weights=path, seed=7).model.eval()
    tower.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        big = F.interpolate(x, size=(224, 224), mode="bilinear", antialias=True, align_corners=False)
        torch.testing.assert_close(pooled_features(model, x, None), tower(big))  # the tower's image embedding
        tower.output_tokens = True
        _, tokens = tower(big)  # open_clip's own patch tokens (after ln_post, class token left out)
        tower.output_tokens = False
        torch.testing.assert_close(pooled_features(model, x, "mean"), tokens.mean(1))
        assert pooled_features(model, x, "cls").shape == (2, 384)


def test_missing_library_names_the_extra(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "open_clip", None)
    monkeypatch.setitem(sys.modules, "transformers", None)
    for name, package in (("open_clip/ViT-S-32", "open_clip_torch"), ("hf/org/model", "transformers")):
        with pytest.raises(BackboneError, match=rf"{package} is not installed; pip install 'medbench\[foundation\]'"):
            get_backbone(name)


def test_foundation_extra_is_declared() -> None:
    import tomllib

    from conftest import REPO

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    names = {d.split(">")[0].split("=")[0].split("[")[0].strip() for d in extras["foundation"]}
    assert {"open_clip_torch", "transformers"} <= names


def test_a_repository_needing_its_own_code_is_refused(hub) -> None:
    hub("test-org/custom", {"config.json": json.dumps({"model_type": "my-custom-vit",
                                                       "auto_map": {"AutoModel": "modeling.MyModel"}}).encode(),
                            "preprocessor_config.json": b"{}"})
    with pytest.raises(BackboneError, match="model_type 'my-custom-vit' is not a model this transformers knows"):
        get_backbone("hf/test-org/custom")


def test_hostile_hub_files_are_one_line_before_anything_runs(hub) -> None:
    """Issue 16 for the foundation prefixes: a configuration nested beyond the JSON bound, and weights with a
    NaN tensor, are one BackboneError line naming the file, from get_backbone and the weights preflight (never
    a RecursionError, never a run that trains on NaN)."""
    from transformers import AutoModel, Dinov2Config

    deep = b"[" * 100_000 + b"]" * 100_000
    hub("test-org/deep-config", {"config.json": deep, "open_clip_config.json": deep})
    hub("test-org/deep-pre", {"config.json": json.dumps({"model_type": "dinov2"}).encode(),
                              "preprocessor_config.json": deep})
    for name, file in (("hf/test-org/deep-config", "config.json"), ("open_clip/hf-hub:test-org/deep-config", "open_clip_config.json"),
                       ("hf/test-org/deep-pre", "preprocessor_config.json")):
        with pytest.raises(BackboneError) as err:
            get_backbone(name)
        text = str(err.value)
        assert "nested deeper than" in text and file in text and "\n" not in text, text
    config = Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                          patch_size=4, image_size=32)
    state = AutoModel.from_config(config).state_dict()
    key = next(k for k in state if k.endswith("weight") and state[k].dim() == 2)
    state[key] = state[key].clone()
    state[key][0, 0] = float("nan")
    snap = hub("test-org/nan-dino", {"config.json": json.dumps(config.to_dict()).encode(),
                                     "preprocessor_config.json": b"{}", "model.safetensors": _safetensors(state)})
    bb = get_backbone("hf/test-org/nan-dino")
    with pytest.raises(BackboneError) as err:
        preflight(bb, "pretrained", None, in_chans=(3,))
    text = str(err.value)
    assert str(snap / "model.safetensors") in text or "model.safetensors" in text, text
    assert key in text and "\n" not in text, text
