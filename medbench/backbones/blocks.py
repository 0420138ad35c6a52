"""The blocks of a network: the units weight transfusion copies, ``--freeze`` freezes and
representation similarity compares.

A backbone lists its blocks in ``Backbone.blocks``: dotted module paths in
forward order (ResNet-50: ``conv1, layer1 … layer4``; BiT: ``stem,
stages.0 … stages.3``; CBR: ``blocks.0 …``). A backbone without that list
(``timm/<any>``) uses timm's ``feature_info`` modules.

**Which tensors belong to block k.** Every tensor of the state dict (weights
and buffers such as BatchNorm running statistics) except the head's belongs to
exactly one block:

* a tensor under a block's module path belongs to that block;
* a tensor under no block path belongs to the closest block before it in
  state-dict (registration, i.e. forward) order — ResNet-50's ``bn1`` goes with
  ``conv1`` (together they are the stem), BiT's final ``norm`` with
  ``stages.3``; tensors before the first block go with block 0 (timm's
  ``feature_info`` of ResNet-18 starts at ``act1``, after ``conv1``/``bn1``);
* the head (``get_classifier()``) belongs to no block: it is never transfused
  nor frozen, and is zero-initialised after every init scheme.

So "the first K blocks" (``transfusion:K``, ``--freeze K``) are the tensors of
blocks 0 … K-1, and K = number of blocks covers every tensor but the head.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from medbench.errors import BackboneError

if TYPE_CHECKING:
    from torch import nn

    from medbench.backbones.backbone import Backbone


def block_names(backbone: "Backbone", model: "nn.Module") -> tuple[str, ...]:
    """The block module paths of ``model`` in forward order."""
    if backbone.blocks:
        names = tuple(backbone.blocks)
    else:
        info = getattr(model, "feature_info", None)
        names = tuple(f["module"] for f in info if "module" in f) if isinstance(info, list) else ()
        if not names:
            raise BackboneError(f"{backbone.name} declares no blocks (Backbone.blocks) and has no timm feature_info; "
                                "transfusion, --freeze and similarity need them", field="--backbone")
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise BackboneError(f"{backbone.name}: block {missing[0]!r} is not a module of {type(model).__name__}",
                            field="blocks")
    return names


def classifier_of(model: "nn.Module") -> "nn.Module":
    get = getattr(model, "get_classifier", None)
    if get is None:
        raise BackboneError(f"{type(model).__name__} has no get_classifier(); medbench needs it to reset the head",
                            field="backbone")
    head = get()
    if not hasattr(head, "weight"):
        raise BackboneError(f"{type(model).__name__}.get_classifier() returned {type(head).__name__}, not a layer "
                            "with weights", field="backbone")
    return head


def head_prefix(model: "nn.Module") -> str:
    """Dotted path of the head module (``get_classifier()``)."""
    head = classifier_of(model)
    for name, module in model.named_modules():
        if module is head:
            return name
    raise BackboneError(f"{type(model).__name__}.get_classifier() is not a sub-module of the network", field="backbone")


def _under(key: str, prefix: str) -> bool:
    return key == prefix or key.startswith(prefix + ".")


def tensor_blocks(model: "nn.Module", names: tuple[str, ...]) -> dict[str, int | None]:
    """State-dict key -> block index (``None`` for the head), by the rule in the module docstring."""
    head = head_prefix(model)
    out: dict[str, int | None] = {}
    current = 0
    for key in model.state_dict():
        if _under(key, head):
            out[key] = None
            continue
        for i, name in enumerate(names):
            if _under(key, name):
                current = i
                break
        out[key] = current
    return out


def check_block_count(k: int, names: tuple[str, ...], backbone: "Backbone", field: str) -> None:
    if not 0 <= k <= len(names):
        raise BackboneError(f"{backbone.name} has {len(names)} blocks ({', '.join(names)}); expected 0 <= K <= "
                            f"{len(names)}, got {k}", field=field)
