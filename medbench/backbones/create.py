"""Building a backbone for a task: architecture, init scheme, zero-initialised head."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medbench.backbones.backbone import Backbone
from medbench.backbones.blocks import classifier_of
from medbench.backbones.init import InitContext, apply_init, needs_weights, parse_init
from medbench.backbones.registry import get_backbone
from medbench.errors import BackboneError

if TYPE_CHECKING:
    from torch import nn


@dataclass
class BuiltModel:
    model: "nn.Module"
    backbone: Backbone
    init: str
    weights_path: Path | None
    weights_origin: str | None

    def provenance(self, *, hash_weights: bool = True) -> dict[str, Any]:
        from medbench.backbones.weights import weights_sha256

        return {
            "backbone": self.backbone.name,
            "family": self.backbone.family,
            "source": self.backbone.source,
            "pretraining": self.backbone.pretraining,
            "init": self.init,
            "weights_file": str(self.weights_path) if self.weights_path else None,
            "weights_origin": self.weights_origin,
            "weights_sha256": weights_sha256(self.weights_path) if (self.weights_path and hash_weights) else None,
            "params_total": sum(p.numel() for p in self.model.parameters()),
        }


def zero_init_head(model: "nn.Module") -> None:
    import torch

    head = classifier_of(model)
    with torch.no_grad():
        head.weight.zero_()
        if getattr(head, "bias", None) is not None:
            head.bias.zero_()


def create_model(
    name: "str | Backbone",
    *,
    num_outputs: int,
    in_chans: int,
    init: str | None = None,
    weights: Path | None = None,
    seed: int = 0,
) -> BuiltModel:
    """The backbone ``name`` (a registry name or a resolved :class:`Backbone`) with a fresh head of ``num_outputs`` for ``in_chans`` inputs.

    ``init`` defaults to ``pretrained`` for backbones with weights, ``random``
    otherwise. Random parts are drawn from ``seed``.
    """
    import torch

    backbone = name if isinstance(name, Backbone) else get_backbone(name)
    name = backbone.name
    init = init or backbone.default_init
    scheme, arg = parse_init(init)
    torch.manual_seed(seed)
    try:
        model = backbone.build(num_classes=num_outputs, in_chans=in_chans)
    except TypeError as err:
        raise BackboneError(f"constructor of {name!r} does not accept (num_classes=, in_chans=): {err}",
                            field="--backbone") from err
    ctx = InitContext(model=model, backbone=backbone, arg=arg, seed=seed, explicit_weights=weights)
    if weights is not None and not needs_weights(scheme):
        raise BackboneError(f"--weights given with --init {init}, which does not read weights; drop one",
                            field="--weights")
    apply_init(ctx, scheme)
    zero_init_head(model)
    return BuiltModel(model=model, backbone=backbone, init=init, weights_path=ctx.weights_path,
                      weights_origin=ctx.weights_origin)
