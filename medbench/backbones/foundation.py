"""Foundation encoders from their own libraries: open_clip image towers and Hugging Face ``transformers``
vision models, registered as name prefixes like ``timm/`` (which also takes ``timm/hf-hub:ORG/NAME``).

``open_clip/<model>``
    an open_clip architecture (``open_clip.list_models()``), random init or ``--weights FILE``;
``open_clip/<model>:<tag>``
    with the pre-trained weights of an open_clip tag (``open_clip.list_pretrained_tags_by_model``), from
    the tag's hub repository;
``open_clip/hf-hub:ORG/NAME``
    an open_clip model published on the hub with its ``open_clip_config.json`` (e.g. BiomedCLIP,
    ``microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224``);
``hf/ORG/NAME``
    a ``transformers`` vision model (``AutoModel`` of the repository's ``config.json``, e.g. RAD-DINO,
    ``microsoft/rad-dino``; DINOv2, ViT, ...), input normalisation from its ``preprocessor_config.json``.

Only the image encoder is built (never a text tower), wrapped in :class:`EncoderNet`: a linear head on
the encoder's own embedding, so the encoder fine-tunes, probes and loads weights like every medbench
backbone. The libraries are optional (``pip install 'medbench[foundation]'``) and imported only when such a
name is used; without them the name fails in one line naming the extra. Configurations and weights come
from the Hugging Face cache or a download (:func:`medbench.backbones.weights.hub_file`; offline, one line
within seconds saying what to fetch), weights also from ``--weights FILE`` or the local weights folder.

**Input.** The input normalisation is the model's own (open_clip's preprocessing config, the
repository's image processor), used by the data loader as for every backbone. A one-channel task feeds
the encoder three channels: the single normalised channel is mapped back to pixels and normalised per
channel with the model's mean and std (exactly what a grey RGB image would give). An open_clip tower has
a fixed input size: images of another size are resized to it (bilinear, antialiased), as open_clip's own
preprocessing does; ``transformers`` models that interpolate their position embeddings (DINOv2, ViT with
``interpolate_pos_encoding``) take the task's crop as it is.

**Pooling** (:mod:`medbench.backbones.pooling`): the model's own embedding is an open_clip tower's image
embedding (what CLIP's zero-shot head reads) or a ``transformers`` model's class token (the mean of its
tokens or feature map when it has none); ``cls``/``mean`` read the tower's final normalised tokens.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from medbench.backbones.backbone import IMAGENET_MEAN, IMAGENET_STD, Backbone
from medbench.backbones.registry import register_prefix
from medbench.errors import BackboneError

if TYPE_CHECKING:
    import torch
    from torch import nn

EXTRA = "foundation"
OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def _require(module: str, package: str):
    """Import an optional library, or one line naming the extra that installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise BackboneError(f"{package} is not installed; pip install 'medbench[{EXTRA}]' (or pip install {package})",
                            field="--backbone") from None


def _help(repo: str) -> str:
    return (f"on a machine with network run 'huggingface-cli download {repo}' and copy the "
            f"models--{repo.replace('/', '--')} folder into this machine's Hugging Face cache (HF_HUB_CACHE)")


# --------------------------------------------------------------------------- the wrapper


def _make_encoder_net():
    import torch
    import torch.nn.functional as F
    from torch import nn

    class EncoderNet(nn.Module):
        """An image encoder with a linear head: ``forward_embedding`` (the encoder's own vector),
        ``forward_features`` (its final tokens or feature map, when it exposes them), ``get_classifier``."""

        def __init__(self, encoder: nn.Module, *, num_features: int, num_classes: int, in_chans: int,
                     mean: tuple, std: tuple, embed: Callable, features: Callable | None, input_size: int | None,
                     num_prefix_tokens: int = 0, has_class_token: bool = False):
            super().__init__()
            self.encoder = encoder
            self.num_features = num_features
            self.head = nn.Linear(num_features, num_classes) if num_classes > 0 else nn.Identity()
            self.in_chans = in_chans
            self.input_size = input_size
            self.num_prefix_tokens = num_prefix_tokens
            self.has_class_token = has_class_token
            self._embed = embed
            self._features = features
            m, s = torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)
            # one channel normalised with the mean of the model's means/stds (the loader's rule) -> three
            # channels normalised with the model's own: x_c = x (s_bar / s_c) + (m_bar - m_c) / s_c
            self.register_buffer("_gain", (s.mean() / s).view(1, -1, 1, 1), persistent=False)
            self.register_buffer("_shift", ((m.mean() - m) / s).view(1, -1, 1, 1), persistent=False)

        def _input(self, x: torch.Tensor) -> torch.Tensor:
            if x.shape[1] == 1 and self._gain.shape[1] == 3:
                x = x * self._gain + self._shift
            if self.input_size is not None and tuple(x.shape[-2:]) != (self.input_size, self.input_size):
                x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", antialias=True,
                                  align_corners=False)
            return x

        def forward_embedding(self, x: torch.Tensor) -> torch.Tensor:
            return self._embed(self.encoder, self._input(x))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.forward_embedding(x))

        def get_classifier(self) -> nn.Module:
            return self.head

        def forward_features(self, x: torch.Tensor) -> torch.Tensor:
            if self._features is None:
                from medbench.errors import BackboneError

                raise BackboneError(f"{type(self.encoder).__name__} exposes no tokens; use the model's own pooling "
                                    "(leave --pooling out)", field="--pooling")
            return self._features(self.encoder, self._input(x))

    return EncoderNet


_ENCODER_NET = None


def encoder_net(encoder: "nn.Module", **kw) -> "nn.Module":
    global _ENCODER_NET
    if _ENCODER_NET is None:
        _ENCODER_NET = _make_encoder_net()
    return _ENCODER_NET(encoder, **kw)


def _load_encoder_state(model: "nn.Module", path: Path, *, prefixes: tuple[str, ...],
                        optional: tuple[str, ...] = ()) -> None:
    """The encoder's tensors from a weights file (keys under one of ``prefixes``, stripped); every encoder
    tensor must be there except those under ``optional`` (e.g. an unused pooler)."""
    from medbench.backbones.weights import read_state_dict

    sd = read_state_dict(path)
    encoder = model.encoder
    own = encoder.state_dict()
    for prefix in prefixes:
        picked = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)} if prefix else dict(sd)
        if any(k in own for k in picked):
            break
    else:
        raise BackboneError(f"no tensor of the image encoder in this file (looked under {', '.join(repr(p) for p in prefixes)})",
                            where=path, field="--weights")
    loaded = {}
    for key, value in picked.items():
        if key not in own:
            continue
        if tuple(value.shape) != tuple(own[key].shape):
            raise BackboneError(f"tensor {key!r} has shape {tuple(value.shape)}, the encoder expects "
                                f"{tuple(own[key].shape)}", where=path, field="--weights")
        loaded[key] = value
    missing = [k for k in own if k not in loaded and not k.endswith("num_batches_tracked")
               and not any(k.startswith(o) for o in optional)]
    if missing:
        raise BackboneError(f"weights do not match the encoder: {len(missing)} of {len(own)} tensors missing "
                            f"(e.g. {missing[0]!r})", where=path, field="--weights")
    encoder.load_state_dict(loaded, strict=False)


# --------------------------------------------------------------------------- open_clip


def _open_clip_tokens(visual: "nn.Module", x: "torch.Tensor") -> "torch.Tensor":
    """The tower's final normalised tokens: a timm trunk's ``forward_features``; an open_clip ViT's
    transformer output through ``ln_post`` (class token first)."""
    trunk = getattr(visual, "trunk", None)
    if trunk is not None:
        return trunk.forward_features(x)
    seen: list = []
    handle = visual.transformer.register_forward_hook(lambda _m, _a, out: seen.append(out))
    try:
        visual(x)
    finally:
        handle.remove()
    tokens = seen[-1]
    if tokens.shape[0] != x.shape[0]:  # sequence-first transformer
        tokens = tokens.transpose(0, 1)
    return visual.ln_post(tokens)


def _open_clip_embed(visual: "nn.Module", x: "torch.Tensor") -> "torch.Tensor":
    out = visual(x)
    return out[0] if isinstance(out, tuple) else out


def _open_clip_build(model_cfg: dict, *, num_classes: int, in_chans: int, mean: tuple, std: tuple) -> "nn.Module":
    _require("open_clip", "open_clip_torch")
    from open_clip.model import _build_vision_tower

    try:
        visual = _build_vision_tower(model_cfg["embed_dim"], dict(model_cfg["vision_cfg"]),
                                     quick_gelu=bool(model_cfg.get("quick_gelu", False)))
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise BackboneError(f"open_clip cannot build this image tower: {str(err).splitlines()[0] if str(err) else err!r}",
                            field="model_cfg.vision_cfg") from None
    size = visual.image_size[0] if isinstance(visual.image_size, (tuple, list)) else visual.image_size
    trunk = getattr(visual, "trunk", None)
    if trunk is not None:
        prefix, cls = int(getattr(trunk, "num_prefix_tokens", 0)), bool(getattr(trunk, "has_class_token", False))
        features = _open_clip_tokens
    elif hasattr(visual, "transformer") and hasattr(visual, "ln_post"):
        cls = getattr(visual, "class_embedding", None) is not None
        prefix, features = int(cls), _open_clip_tokens
    else:  # e.g. the ModifiedResNet of CLIP RN50: its attention-pooled embedding only
        prefix, cls, features = 0, False, None
    return encoder_net(visual, num_features=int(model_cfg["embed_dim"]), num_classes=num_classes, in_chans=in_chans,
                       mean=mean, std=std, embed=_open_clip_embed, features=features, input_size=int(size),
                       num_prefix_tokens=prefix, has_class_token=cls)


def _load_open_clip_weights(model: "nn.Module", path: Path) -> None:
    _load_encoder_state(model, path, prefixes=("visual.", "module.visual."))


def open_clip_backbone(rest: str) -> Backbone:
    """``open_clip/<model>[:<tag>]`` or ``open_clip/hf-hub:ORG/NAME``."""
    open_clip = _require("open_clip", "open_clip_torch")
    name = f"open_clip/{rest}"
    tag = None
    if rest.startswith("hf-hub:"):
        from medbench.backbones.weights import hub_json

        repo = rest.removeprefix("hf-hub:")
        config = hub_json(repo, "open_clip_config.json", help_line=_help(repo), field=name)
        model_cfg, pre = config.get("model_cfg"), config.get("preprocess_cfg") or {}
        if not isinstance(model_cfg, dict) or "vision_cfg" not in model_cfg:
            raise BackboneError("open_clip_config.json has no model_cfg.vision_cfg", where=f"hf-hub:{repo}",
                                field="model_cfg")
        hub_id, arch = repo, model_cfg.get("vision_cfg", {}).get("timm_model_name") or "open_clip"
    else:
        arch, _, tag = rest.partition(":")
        model_cfg = open_clip.get_model_config(arch)
        if model_cfg is None:
            from medbench.utils import did_you_mean

            raise BackboneError(f"open_clip has no model {arch!r}{did_you_mean(arch, open_clip.list_models())}",
                                field="--backbone")
        pre = dict(model_cfg.get("preprocess_cfg") or {})
        hub_id = None
        if tag:
            cfg = open_clip.get_pretrained_cfg(arch, tag)
            if not cfg:
                raise BackboneError(f"open_clip has no pre-trained tag {tag!r} for {arch}; tags: "
                                    f"{', '.join(open_clip.list_pretrained_tags_by_model(arch)) or 'none'}",
                                    field="--backbone")
            hub_id = (cfg.get("hf_hub") or "").strip("/") or None
            if hub_id is None:
                raise BackboneError(f"open_clip tag {arch}:{tag} has no hub repository (only a URL); download it and "
                                    "pass --weights FILE with open_clip/" + arch, field="--backbone")
            pre = {**pre, **{k: cfg[k] for k in ("mean", "std") if cfg.get(k)}}
    mean = tuple(pre.get("mean") or open_clip.OPENAI_DATASET_MEAN)
    std = tuple(pre.get("std") or open_clip.OPENAI_DATASET_STD)
    size = model_cfg["vision_cfg"].get("image_size", 224)
    size = size[0] if isinstance(size, (list, tuple)) else size
    return Backbone(
        name=name,
        build=partial(_open_clip_build, model_cfg, mean=mean, std=std),
        family="open_clip",
        pretraining=f"see {'hf-hub:' + hub_id if hub_id else 'open_clip'}" if hub_id else "none",
        params=None,
        default_resolution=int(size),
        mean=mean,  # type: ignore[arg-type]
        std=std,  # type: ignore[arg-type]
        source="open_clip",
        weights=f"hf-hub:{hub_id}" if hub_id else "none (--weights FILE loads yours)",
        hub_id=hub_id,
        hub_filenames=OPEN_CLIP_WEIGHTS,
        load_weights=_load_open_clip_weights,
        weights_help=(_help(hub_id) + ", or pass --weights FILE") if hub_id else
        "pass an open_clip checkpoint with --weights FILE",
        description=f"open_clip image tower {arch}" + (f" ({tag})" if tag else ""),
        extra={"image_size": int(size)},
    )


# --------------------------------------------------------------------------- transformers


def _hf_patch_count(config: Any, h: int, w: int) -> int | None:
    patch = getattr(config, "patch_size", None)
    if isinstance(patch, (list, tuple)):
        patch = patch[0]
    return (h // patch) * (w // patch) if isinstance(patch, int) and patch > 0 else None


def _hf_forward(encoder: "nn.Module", x: "torch.Tensor"):
    kwargs = {"interpolate_pos_encoding": True} if getattr(encoder, "_medbench_interpolates", False) else {}
    return encoder(pixel_values=x, **kwargs).last_hidden_state


def _hf_prefix(encoder: "nn.Module", tokens: "torch.Tensor", x: "torch.Tensor") -> int:
    n = _hf_patch_count(encoder.config, x.shape[-2], x.shape[-1])
    return max(0, tokens.shape[1] - n) if n is not None and n <= tokens.shape[1] else 0


def _hf_features(encoder: "nn.Module", x: "torch.Tensor") -> "torch.Tensor":
    return _hf_forward(encoder, x)


def _hf_embed(encoder: "nn.Module", x: "torch.Tensor") -> "torch.Tensor":
    out = _hf_forward(encoder, x)
    if out.ndim == 4:
        return out.mean(dim=(2, 3))
    return out[:, 0] if _hf_prefix(encoder, out, x) >= 1 else out.mean(dim=1)


def _hf_build(config_dict: dict, *, num_classes: int, in_chans: int, mean: tuple, std: tuple) -> "nn.Module":
    import inspect

    transformers = _require("transformers", "transformers")
    model_type = config_dict.get("model_type")
    try:
        config = transformers.AutoConfig.for_model(model_type, **{k: v for k, v in config_dict.items()
                                                                  if k != "model_type"})
        encoder = transformers.AutoModel.from_config(config)  # never runs a repository's own code
    except (KeyError, TypeError, ValueError) as err:
        raise BackboneError(f"transformers {transformers.__version__} cannot build a {model_type!r} model from this "
                            f"config.json: {str(err).splitlines()[0] if str(err) else err!r}", field="model_type") from None
    encoder._medbench_interpolates = "interpolate_pos_encoding" in inspect.signature(encoder.forward).parameters
    hidden = getattr(config, "hidden_size", None) or (getattr(config, "hidden_sizes", None) or [None])[-1]
    if hidden is None:
        raise BackboneError(f"cannot tell the embedding width of a {model_type!r} model (no hidden_size)",
                            field="--backbone")
    size = getattr(config, "image_size", None)
    fixed = None if encoder._medbench_interpolates or model_type in ("dinov2", "dinov2_with_registers") else size
    registers = int(getattr(config, "num_register_tokens", 0) or 0)
    tokens = _hf_patch_count(config, 1, 1) is not None
    return encoder_net(encoder, num_features=int(hidden), num_classes=num_classes, in_chans=in_chans, mean=mean,
                       std=std, embed=_hf_embed, features=_hf_features,
                       input_size=int(fixed) if isinstance(fixed, int) else None,
                       num_prefix_tokens=(1 + registers) if tokens else 0, has_class_token=tokens)


def _load_hf_weights(model: "nn.Module", path: Path) -> None:
    prefix = getattr(model.encoder, "base_model_prefix", "") or ""
    _load_encoder_state(model, path, prefixes=("", f"{prefix}.") if prefix else ("",), optional=("pooler.",))


def _hf_preprocessor(repo: str, name: str) -> tuple[dict, Path | None]:
    """The repository's ``preprocessor_config.json`` (image mean/std, size) and its path; ({}, None) when the
    repository has none (ImageNet normalisation, recorded). Offline without it in the cache: one line, as
    for the configuration (a copied cache folder missing it would silently change the normalisation)."""
    from medbench.backbones.weights import _cached_hub_file, _download_hub_file, hub_offline, network_reachable

    filename = ("preprocessor_config.json",)
    path = _cached_hub_file(repo, filename)
    if path is None:
        if hub_offline() or not network_reachable():
            raise BackboneError(f"preprocessor_config.json of hf-hub:{repo} (the model's input normalisation) is not "
                                f"in the local cache; {_help(repo)}", field=name)
        try:
            path = _download_hub_file(repo, filename)
        except BackboneError:  # the repository ships none
            return {}, None
    from medbench.utils import read_json

    data = read_json(Path(path), error=BackboneError, field=name, expected="the repository's preprocessor_config.json")
    return (data if isinstance(data, dict) else {}), Path(path)


def hf_backbone(repo: str) -> Backbone:
    """``hf/ORG/NAME``: a transformers vision encoder from the repository's ``config.json``."""
    _require("transformers", "transformers")
    from medbench.backbones.weights import hub_json

    name = f"hf/{repo}"
    config = hub_json(repo, "config.json", help_line=_help(repo), field=name)
    if not isinstance(config.get("model_type"), str):
        raise BackboneError("config.json has no model_type", where=f"hf-hub:{repo}", field="model_type")
    from transformers import CONFIG_MAPPING

    if config["model_type"] not in CONFIG_MAPPING:
        raise BackboneError(f"model_type {config['model_type']!r} is not a model this transformers knows (a "
                            "repository's own code is never run)", where=f"hf-hub:{repo}", field="model_type")
    pre, pre_path = _hf_preprocessor(repo, name)
    mean = tuple(pre.get("image_mean") or IMAGENET_MEAN)
    std = tuple(pre.get("image_std") or IMAGENET_STD)
    crop = pre.get("crop_size") or pre.get("size") or config.get("image_size") or 224
    crop = crop.get("height", crop.get("shortest_edge", 224)) if isinstance(crop, dict) else crop
    return Backbone(
        name=name,
        build=partial(_hf_build, config, mean=mean, std=std),
        family="transformers",
        pretraining=f"see hf-hub:{repo}",
        params=None,
        default_resolution=int(crop),
        mean=mean,  # type: ignore[arg-type]
        std=std,  # type: ignore[arg-type]
        source="transformers",
        weights=f"hf-hub:{repo}",
        hub_id=repo,
        load_weights=_load_hf_weights,
        weights_help=_help(repo) + ", or pass --weights FILE (its model.safetensors)",
        description=f"transformers {config['model_type']} from hf-hub:{repo}"
                    + ("" if pre_path else " (no preprocessor_config.json in the cache: ImageNet normalisation)"),
        extra={"model_type": config["model_type"], "normalisation": "preprocessor_config.json" if pre_path else "ImageNet"},
    )


register_prefix("open_clip/", open_clip_backbone)
register_prefix("hf/", hf_backbone)
