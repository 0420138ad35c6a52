"""The backbone registry: name -> constructor + metadata (after timm's registry).

Built-in names are registered in :mod:`medbench.backbones.builtin`. Other
packages add backbones through the entry point group ``medbench.backbones``;
an entry point loads to a :class:`Backbone` or to a callable
``build(*, num_classes, in_chans) -> nn.Module`` (metadata then defaults to
"third-party"). ``timm/<model>`` builds any timm architecture.

Only :func:`create_model` builds networks; it returns the network with its
head replaced for the task and zero-initialised (BiT-HyperRule), and the
weights applied by the chosen init scheme.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from medbench.errors import BackboneError
from medbench.utils import did_you_mean

if TYPE_CHECKING:  # torch is imported only when a network is built
    from torch import nn

BACKBONE_ENTRY_POINT_GROUP = "medbench.backbones"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class Backbone:
    """What medbench knows about a backbone before building it."""

    name: str
    #: ``build(num_classes=..., in_chans=...) -> nn.Module`` with random weights
    build: Callable[..., "nn.Module"]
    family: str = "third-party"
    #: the pre-training data, e.g. "ImageNet-21k"; "none" when there are no pre-trained weights
    pretraining: str = "none"
    #: parameters without the classification head, for 3 input channels
    params: int | None = None
    default_resolution: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    #: where the name is defined: "medbench", "timm", "entry point <distribution>"
    source: str = "medbench"
    #: where pre-trained weights come from, for people
    weights: str = "none"
    #: hub repository of the weights (Hugging Face), if any
    hub_id: str | None = None
    #: loads pre-trained weights from a local file into a built network; None: no pre-trained weights
    load_weights: Callable[["nn.Module", Path], None] | None = None
    #: how to get the weights file when the hub cannot serve it
    weights_help: str = ""
    description: str = ""
    #: names of the stages transfusion counts, in order (dotted module paths)
    blocks: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def default_init(self) -> str:
        return "pretrained" if self.load_weights is not None and self.pretraining != "none" else "random"


_REGISTRY: dict[str, Backbone] = {}
_PLUGINS_LOADED = False


def register_backbone(backbone: Backbone, *, overwrite: bool = False) -> Backbone:
    if backbone.name in _REGISTRY and not overwrite:
        raise BackboneError(f"backbone {backbone.name!r} is already registered by {_REGISTRY[backbone.name].source}",
                            field="name")
    _REGISTRY[backbone.name] = backbone
    return backbone


def _load_builtin() -> None:
    if not _REGISTRY:
        import medbench.backbones.builtin  # noqa: F401  (registers on import)


def _load_plugins() -> None:
    global _PLUGINS_LOADED
    if _PLUGINS_LOADED:
        return
    _PLUGINS_LOADED = True
    for ep in entry_points(group=BACKBONE_ENTRY_POINT_GROUP):
        dist = ep.dist.name if ep.dist else "?"
        try:
            obj = ep.load()
        except Exception as err:
            raise BackboneError(f"cannot load entry point {ep.value!r} of {dist}: {err}",
                                where=f"entry point {ep.name}", field=BACKBONE_ENTRY_POINT_GROUP) from err
        if isinstance(obj, Backbone):
            bb = replace(obj, name=ep.name, source=f"entry point {dist}")
        elif callable(obj):
            bb = Backbone(name=ep.name, build=obj, source=f"entry point {dist}",
                          description=(obj.__doc__ or "").strip().split("\n")[0])
        else:
            raise BackboneError(f"entry point {ep.value!r} is neither a medbench Backbone nor a callable",
                                where=f"entry point {ep.name}", field=BACKBONE_ENTRY_POINT_GROUP)
        if ep.name in _REGISTRY and _REGISTRY[ep.name].source == "medbench":
            raise BackboneError(f"{dist} registers {ep.name!r}, a built-in name; choose another",
                                where=f"entry point {ep.name}", field=BACKBONE_ENTRY_POINT_GROUP)
        _REGISTRY[ep.name] = bb


def list_backbones() -> list[Backbone]:
    _load_builtin()
    _load_plugins()
    return sorted(_REGISTRY.values(), key=lambda b: b.source != "medbench")  # stable: registration order


def get_backbone(name: str) -> Backbone:
    _load_builtin()
    if name.startswith("timm/"):
        from medbench.backbones.builtin import timm_backbone

        return timm_backbone(name.removeprefix("timm/"))
    if name not in _REGISTRY:
        _load_plugins()
    if name not in _REGISTRY:
        names = sorted(_REGISTRY)
        raise BackboneError(
            f"unknown backbone {name!r}{did_you_mean(name, names)}; see 'medbench list backbones' "
            "(any timm model works as timm/<name>)",
            field="--backbone",
        )
    return _REGISTRY[name]
