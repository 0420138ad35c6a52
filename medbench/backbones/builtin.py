"""The backbones medbench ships: BiT-M, BiT-S, ResNet-50, the CBR nets, and timm/<any>.

Parameter counts are of the network without its head, for 3 input channels;
``tests/test_backbones.py`` rebuilds each on the meta device and checks them.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from medbench.backbones.backbone import HALF, IMAGENET_MEAN, IMAGENET_STD, Backbone
from medbench.backbones.registry import register_backbone, register_prefix
from medbench.errors import BackboneError

if TYPE_CHECKING:
    from torch import nn

# (medbench suffix, timm architecture, parameters without head)
BIT_SIZES = [
    ("r50x1", "resnetv2_50x1_bit", 23_500_352),
    ("r50x3", "resnetv2_50x3_bit", 211_174_080),
    ("r101x1", "resnetv2_101x1_bit", 42_492_480),
    ("r101x3", "resnetv2_101x3_bit", 381_789_888),
    ("r152x2", "resnetv2_152x2_bit", 232_238_208),
    ("r152x4", "resnetv2_152x4_bit", 928_340_224),
]
BIT_BLOCKS = ("stem", "stages.0", "stages.1", "stages.2", "stages.3")
RESNET_BLOCKS = ("conv1", "layer1", "layer2", "layer3", "layer4")


def _timm_build(arch: str, *, num_classes: int, in_chans: int) -> "nn.Module":
    import timm

    return timm.create_model(arch, pretrained=False, num_classes=num_classes, in_chans=in_chans)


def _timm_classifier(model: "nn.Module") -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return cfg.get("classifier", "fc")


def _load_timm_weights(model: "nn.Module", path: Path) -> None:
    """A timm network from a state dict file, or from Google's original ``.npz`` (BiT)."""
    from medbench.backbones.weights import load_state_dict_into

    if path.suffix.lower() == ".npz":
        if not hasattr(model, "load_pretrained"):
            raise BackboneError(f"{type(model).__name__} cannot read .npz weights", where=path, field="--weights")
        try:
            model.load_pretrained(str(path))
        except KeyError as err:
            raise BackboneError(f"not a BiT .npz checkpoint for this architecture: missing {err}", where=path,
                                field="--weights") from err
        except Exception as err:
            raise BackboneError(f"cannot read .npz weights: {str(err).splitlines()[0]}", where=path,
                                field="--weights") from err
        return
    load_state_dict_into(model, path, classifier=_timm_classifier(model))


def _load_cbr_weights(model: "nn.Module", path: Path) -> None:
    from medbench.backbones.weights import load_state_dict_into

    load_state_dict_into(model, path, classifier="fc")


for size, arch, params in BIT_SIZES:
    upper = "R" + size[1:]  # Google's file names: BiT-M-R50x1.npz
    register_backbone(Backbone(
        name=f"bit-m-{size}",
        build=partial(_timm_build, arch),
        family="bit",
        pretraining="ImageNet-21k",
        params=params,
        default_resolution=480,
        mean=HALF,
        std=HALF,
        source="medbench",
        weights=f"hf-hub:timm/{arch}.goog_in21k",
        hub_id=f"timm/{arch}.goog_in21k",
        load_weights=_load_timm_weights,
        weights_help=(f"on a machine with network get model.safetensors of hf-hub:timm/{arch}.goog_in21k (or "
                      f"https://storage.googleapis.com/bit_models/BiT-M-{upper}.npz) and pass --weights FILE, or "
                      f"save it as {{weights_dir}}/bit-m-{size}.safetensors (.npz)"),
        description=f"BiT-M {upper}: ResNet-v2 with GroupNorm + weight standardisation, ImageNet-21k",
        blocks=BIT_BLOCKS,
        extra={"timm_arch": arch},
    ))
    register_backbone(Backbone(
        name=f"bit-s-{size}",
        build=partial(_timm_build, arch),
        family="bit",
        pretraining="ImageNet-1k",
        params=params,
        default_resolution=480,
        mean=HALF,
        std=HALF,
        source="medbench",
        weights=f"local file BiT-S-{upper}.npz",
        hub_id=None,
        load_weights=_load_timm_weights,
        weights_help=(f"download https://storage.googleapis.com/bit_models/BiT-S-{upper}.npz and pass --weights FILE "
                      f"(or save it as {{weights_dir}}/bit-s-{size}.npz)"),
        description=f"BiT-S {upper}: ResNet-v2 with GroupNorm + weight standardisation, ImageNet-1k",
        blocks=BIT_BLOCKS,
        extra={"timm_arch": arch},
    ))

register_backbone(Backbone(
    name="resnet50",
    build=partial(_timm_build, "resnet50"),
    family="resnet",
    pretraining="ImageNet-1k",
    params=23_508_032,
    default_resolution=224,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    source="medbench",
    weights="hf-hub:timm/resnet50.tv_in1k",
    hub_id="timm/resnet50.tv_in1k",
    load_weights=_load_timm_weights,
    weights_help=("on a machine with network get model.safetensors of hf-hub:timm/resnet50.tv_in1k and pass "
                  "--weights FILE, or save it as {weights_dir}/resnet50.safetensors"),
    description="ResNet-50 (v1.5, BatchNorm), the RZ19 baseline",
    blocks=RESNET_BLOCKS,
    extra={"timm_arch": "resnet50"},
))


def _register_cbr() -> None:
    from medbench.backbones.cbr_spec import CBR_LAYOUTS, paper_convention_count

    def build(name: str, *, num_classes: int, in_chans: int) -> "nn.Module":
        from medbench.backbones.cbr import build_cbr

        return build_cbr(name, num_classes=num_classes, in_chans=in_chans)

    for name, layout in CBR_LAYOUTS.items():
        conv = paper_convention_count(layout, in_chans=3)
        bn = 2 * sum(layout.channels)
        register_backbone(Backbone(
            name=name,
            build=partial(build, name),
            family="cbr",
            pretraining="none",
            params=conv + bn,
            default_resolution=224,
            mean=HALF,
            std=HALF,
            source="medbench",
            weights="none (--weights FILE loads yours)",
            load_weights=_load_cbr_weights,
            weights_help="CBR nets have no published weights; pass your own with --weights FILE",
            description=f"RZ19 {name.upper()}: {layout.kernel}x{layout.kernel} conv-BN-ReLU-maxpool, channels "
                        f"{', '.join(map(str, layout.channels))}",
            blocks=tuple(f"blocks.{i}" for i in range(len(layout.channels))),
            extra={"paper_params": layout.paper_params},
        ))


_register_cbr()


def _timm_build_any_size(arch: str, model_args: dict, *, num_classes: int, in_chans: int) -> "nn.Module":
    """A ``timm/`` network; a ViT-like one with a fixed input size is built with ``dynamic_img_size`` so it
    takes the task's crop (position embeddings interpolated; unchanged at the native size)."""
    import timm

    if model_args.pop("_fixed_input_size", False):
        try:
            return timm.create_model(arch, pretrained=False, num_classes=num_classes, in_chans=in_chans,
                                     dynamic_img_size=True, **model_args)
        except TypeError:  # an architecture without dynamic sizes: its native size only
            pass
    return timm.create_model(arch, pretrained=False, num_classes=num_classes, in_chans=in_chans, **model_args)


def _timm_hub_build(arch: str, model_args: dict, fixed: bool, *, num_classes: int, in_chans: int) -> "nn.Module":
    return _timm_build_any_size(arch, {**model_args, "_fixed_input_size": fixed}, num_classes=num_classes,
                                in_chans=in_chans)


def timm_backbone(arch_or_tag: str) -> Backbone:
    """``timm/<model>[.<tag>]``: any timm architecture; pre-trained weights from its hub tag.
    ``timm/hf-hub:ORG/NAME``: a timm model published on the Hugging Face hub (DINOv2 and other ViTs), its
    architecture and input normalisation read from the repository's ``config.json``."""
    import timm
    from timm.models import get_pretrained_cfg

    if arch_or_tag.startswith("hf-hub:"):
        return timm_hub_backbone(arch_or_tag.removeprefix("hf-hub:"))
    arch = arch_or_tag.split(".")[0]
    if not timm.is_model(arch):
        from medbench.utils import did_you_mean

        raise BackboneError(f"timm has no model {arch!r}{did_you_mean(arch, timm.list_models())}",
                            field="--backbone")
    try:
        cfg = get_pretrained_cfg(arch_or_tag)  # without a tag: timm's default tag for the architecture
    except RuntimeError as err:
        raise BackboneError(str(err), field="--backbone") from None
    mean = tuple(cfg.mean) if cfg is not None else IMAGENET_MEAN
    std = tuple(cfg.std) if cfg is not None else IMAGENET_STD
    hub_id = cfg.hf_hub_id if cfg is not None else None
    fixed = bool(cfg is not None and cfg.fixed_input_size)
    return Backbone(
        name=f"timm/{arch_or_tag}",
        build=partial(_timm_hub_build, arch, {}, fixed),
        family="timm",
        pretraining="see timm tag" if hub_id else "none",
        params=None,
        default_resolution=int(cfg.input_size[-1]) if cfg is not None else 224,
        mean=mean,  # type: ignore[arg-type]
        std=std,  # type: ignore[arg-type]
        source="timm",
        weights=f"hf-hub:{hub_id}" if hub_id else "none",
        hub_id=hub_id,
        load_weights=_load_timm_weights if hub_id else None,
        description=f"timm {arch_or_tag}",
    )


def timm_hub_backbone(repo: str) -> Backbone:
    """``timm/hf-hub:ORG/NAME``: the repository's ``config.json`` (``architecture``, ``model_args``,
    ``pretrained_cfg``: mean, std, input size), from the Hugging Face cache or a download; offline without it
    in the cache, one line saying what to fetch."""
    import timm

    from medbench.backbones.weights import hub_json

    name = f"timm/hf-hub:{repo}"
    help_line = (f"on a machine with network run 'huggingface-cli download {repo}' and copy the "
                 f"models--{repo.replace('/', '--')} folder into this machine's Hugging Face cache (HF_HUB_CACHE)")
    config = hub_json(repo, "config.json", help_line=help_line, field=name)
    arch = config.get("architecture")
    if not isinstance(arch, str) or not timm.is_model(arch):
        raise BackboneError(f"config.json names architecture {arch!r}, which this timm ({timm.__version__}) does not "
                            "have", where=f"hf-hub:{repo}", field="architecture")
    cfg = config.get("pretrained_cfg") or {}
    model_args = dict(config.get("model_args") or {})
    size = (cfg.get("input_size") or [3, 224, 224])[-1]
    return Backbone(
        name=name,
        build=partial(_timm_hub_build, arch, model_args, bool(cfg.get("fixed_input_size", False))),
        family="timm",
        pretraining=f"see hf-hub:{repo}",
        params=None,
        default_resolution=int(size),
        mean=tuple(cfg.get("mean") or IMAGENET_MEAN),  # type: ignore[arg-type]
        std=tuple(cfg.get("std") or IMAGENET_STD),  # type: ignore[arg-type]
        source="timm (hf-hub)",
        weights=f"hf-hub:{repo}",
        hub_id=repo,
        load_weights=_load_timm_weights,
        weights_help=(f"{help_line}, or pass --weights FILE (its model.safetensors)"),
        description=f"timm {arch} from hf-hub:{repo}",
        extra={"timm_arch": arch, "model_args": model_args},
    )


register_prefix("timm/", timm_backbone)
