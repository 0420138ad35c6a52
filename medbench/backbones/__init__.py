"""Backbones: the registry, built-in architectures, weights and init schemes."""

from medbench.backbones import builtin  # noqa: F401,E402  (registers the built-in backbones)
from medbench.backbones import foundation  # noqa: F401,E402  (registers the open_clip/ and hf/ prefixes)
from medbench.backbones.backbone import Backbone
from medbench.backbones.registry import get_backbone, list_backbones, register_backbone

__all__ = ["Backbone", "create_model", "get_backbone", "list_backbones", "register_backbone"]


def create_model(*args, **kwargs):  # noqa: D103 - documented at medbench.backbones.create.create_model
    from medbench.backbones.create import create_model as _create

    return _create(*args, **kwargs)
