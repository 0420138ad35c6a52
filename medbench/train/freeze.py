"""Frozen features (RZ19 Appendix E): train only the head, or only the blocks above block L.

``--freeze head``
    every tensor but the head is frozen: a linear probe on the initial features.
``--freeze L``
    the first L entries of ``Backbone.blocks`` are frozen (the same tensors
    ``transfusion:L`` copies, see :mod:`medbench.backbones.blocks`); the blocks
    above and the head are trained. ``L`` equal to the number of blocks is the
    same as ``head`` and is recorded as ``head``.

Frozen parameters get ``requires_grad = False`` and are left out of the
optimiser (also under DeepSpeed, which only receives the trainable ones).
BatchNorm layers whose tensors are frozen stay in eval mode during training:
they normalise with their stored running statistics, which are not updated, so
the frozen part computes exactly the function it started with (in train mode
the batch statistics would change the features and the running statistics
would drift even though no weight moves). GroupNorm/LayerNorm have no running
statistics and need no special handling.

The freeze setting is part of the run key and of the run folder name
(``…-freeze-head-…``), and is written to ``result.json`` as the run's variant.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from medbench.errors import UsageError

if TYPE_CHECKING:
    from torch import nn

    from medbench.backbones.backbone import Backbone

FIELD = "--freeze"


def parse_freeze(spec: str | None, backbone: "Backbone | None" = None) -> str | None:
    """``None``, ``"head"`` or ``"<L>"`` (L >= 1); L = number of blocks becomes ``"head"`` when known."""
    if spec is None:
        return None
    text = spec.strip().lower()
    if text == "head":
        return "head"
    if not text.isdigit() or int(text) < 1:
        raise UsageError(f"expected 'head' or a number of blocks L >= 1 to freeze, got {spec!r}", field=FIELD)
    k = int(text)
    if backbone is not None and backbone.blocks:
        n = len(backbone.blocks)
        if k > n:
            raise UsageError(f"{backbone.name} has {n} blocks ({', '.join(backbone.blocks)}); cannot freeze {k}",
                             field=FIELD)
        if k == n:
            return "head"
    return str(k)


def freeze_variant(freeze: str | None) -> str:
    """The run-folder / leaderboard variant string of a freeze setting (``""`` when not frozen)."""
    return f"freeze-{freeze}" if freeze else ""


def _keep_eval(module: "nn.Module", args: tuple) -> None:
    if module.training:
        module.train(False)


def apply_freeze(model: "nn.Module", backbone: "Backbone", freeze: str | None) -> dict:
    """Freeze ``model`` in place; returns counts of trainable and frozen parameters."""
    from torch import nn

    from medbench.backbones.blocks import block_names, check_block_count, tensor_blocks

    if freeze is None:
        n = sum(p.numel() for p in model.parameters())
        return {"freeze": None, "trainable_params": n, "frozen_params": 0}
    names = block_names(backbone, model)
    k = len(names) if freeze == "head" else int(freeze)
    check_block_count(k, names, backbone, FIELD)
    owners = tensor_blocks(model, names)
    frozen_keys = {key for key, block in owners.items() if block is not None and block < k}
    for key, param in model.named_parameters():
        if key in frozen_keys:
            param.requires_grad_(False)
    frozen_bn = []
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            own = [f"{name}.{t}" for t, _ in (*module.named_parameters(recurse=False),
                                               *module.named_buffers(recurse=False))]
            if own and all(t in frozen_keys for t in own):
                module.register_forward_pre_hook(_keep_eval)
                module.train(False)
                frozen_bn.append(name)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    return {"freeze": freeze, "frozen_blocks": list(names[:k]), "trainable_params": trainable,
            "frozen_params": frozen, "frozen_batchnorm_layers": len(frozen_bn)}
