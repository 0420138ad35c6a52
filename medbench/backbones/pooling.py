"""Which vector of a frozen network represents an image (``medbench run --pooling``), for the probes.

``None`` (the default): **the model's own pooling**, the vector its classification head reads: timm's
``forward_head(forward_features(x), pre_logits=True)`` (a ViT's ``global_pool``: the class token for
``token``, the mean of patch tokens for ``avg``, with the model's ``fc_norm``; a CNN's global average
pool), a foundation encoder's own embedding (:mod:`medbench.backbones.foundation`: an open_clip tower's
image embedding, a transformers model's class token), and for any other network the input of its head
(``get_classifier()``).

``cls``
    the class token of the final (normalised) token sequence ``forward_features(x)[:, 0]``;
``mean``
    the mean of the patch tokens (prefix tokens such as the class and register tokens left out), or the
    global average of a CNN's feature map;
``cls+mean``
    both, concatenated (the DINOv2 linear evaluation).

``cls`` needs a network with a class token. The pooling is part of the feature cache key and of a probe
run's key; fine-tuning always trains the model's own head.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from medbench.errors import BackboneError, UsageError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from medbench.backbones.backbone import Backbone

POOLINGS = ("cls", "mean", "cls+mean")
MODEL = "model"  # the recorded name of the model's own pooling (pooling=None)


def parse_pooling(text: str | None) -> str | None:
    """None (the model's own), or one of :data:`POOLINGS`."""
    if text is None:
        return None
    value = text.strip().lower().replace(" ", "")
    if value in ("", MODEL, "default"):
        return None
    if value in ("mean+cls",):
        value = "cls+mean"
    if value not in POOLINGS:
        raise UsageError(f"expected one of {', '.join(POOLINGS)} (or 'model' for the model's own pooling), got "
                         f"{text!r}", field="--pooling")
    return value


def pooling_name(pooling: str | None) -> str:
    return pooling or MODEL


def _prefix_tokens(model: "nn.Module") -> int:
    return int(getattr(model, "num_prefix_tokens", 1 if getattr(model, "cls_token", None) is not None else 0))


def _has_class_token(model: "nn.Module") -> bool:
    flag = getattr(model, "has_class_token", None)
    if flag is not None:
        return bool(flag)
    return getattr(model, "cls_token", None) is not None


def pooled_features(model: "nn.Module", x: "torch.Tensor", pooling: str | None) -> "torch.Tensor":
    """``[B, D]`` features of the batch ``x`` (the network in eval mode, no gradient needed)."""
    import torch

    if pooling is None:
        own = getattr(model, "forward_embedding", None)
        if callable(own):
            return own(x)
        if callable(getattr(model, "forward_features", None)) and callable(getattr(model, "forward_head", None)):
            return model.forward_head(model.forward_features(x), pre_logits=True)
        return _head_input(model, x)
    if not callable(getattr(model, "forward_features", None)):
        raise BackboneError(f"{type(model).__name__} has no forward_features(); --pooling {pooling} needs the "
                            "token sequence or feature map (leave --pooling out for the model's own)", field="--pooling")
    f = model.forward_features(x)
    if f.ndim == 4:  # a CNN's feature map [B, C, H, W]
        if pooling != "mean":
            raise BackboneError(f"{type(model).__name__} has a feature map, no class token; use --pooling mean",
                                field="--pooling")
        return f.mean(dim=(2, 3))
    if f.ndim != 3:
        raise BackboneError(f"{type(model).__name__}.forward_features() gives a {f.ndim}-d tensor; expected tokens "
                            "[B, T, D] or a feature map [B, C, H, W]", field="--pooling")
    prefix = _prefix_tokens(model)
    parts = []
    if "cls" in pooling:
        if not _has_class_token(model) or prefix < 1:
            raise BackboneError(f"{type(model).__name__} has no class token; use --pooling mean", field="--pooling")
        parts.append(f[:, 0])
    if "mean" in pooling:
        parts.append(f[:, prefix:].mean(dim=1))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def _head_input(model: "nn.Module", x: "torch.Tensor") -> "torch.Tensor":
    """What the head receives (any network with ``get_classifier()``)."""
    from medbench.backbones.blocks import classifier_of

    seen: list = []
    handle = classifier_of(model).register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    try:
        model(x)
    finally:
        handle.remove()
    if not seen:
        raise BackboneError(f"{type(model).__name__} never called its head; it cannot be probed", field="--backbone")
    return seen[-1].flatten(1)


def check_pooling(backbone: "Backbone", pooling: str | None, *, in_chans: int, size: int) -> int:
    """Build ``backbone`` on the meta device and pool a meta batch at ``size`` px: the feature width, or a
    one-line error naming ``--pooling`` (a class token asked of a CNN, ...) before anything runs."""
    import torch

    with torch.device("meta"):
        model = backbone.build(num_classes=1, in_chans=in_chans)
        model.eval()
        x = torch.empty(1, in_chans, size, size)
        try:
            out = pooled_features(model, x, pooling)
        except BackboneError as err:
            raise BackboneError(f"{backbone.name}: {err.message}", field="--pooling") from None
    return int(out.shape[-1])
