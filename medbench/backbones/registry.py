"""The backbone registry: name -> constructor + metadata (after timm's registry).

Built-in names are registered in :mod:`medbench.backbones.builtin`. Other
packages add backbones through the entry point group ``medbench.backbones``;
an entry point loads to a :class:`Backbone` or to a callable
``build(*, num_classes, in_chans) -> nn.Module`` (metadata then defaults to
"third-party"). ``timm/<model>`` builds any timm architecture.

A broken plug-in (its module does not import, it loads to something else, it
claims a built-in name) does not hide the others: the first time plug-ins are
loaded in a process it gives one warning line on stderr naming the entry point
and the error, and the rest load. Asking for its name (``get_backbone``) then
fails with one line naming the entry point and the original error.

Only :func:`create_model` builds networks; it returns the network with its
head replaced for the task and zero-initialised (BiT-HyperRule), and the
weights applied by the chosen init scheme.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, replace
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from medbench.errors import BackboneError, MedbenchError
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
#: entry points that failed to load: backbone name -> the one-line error
_PLUGIN_FAILURES: dict[str, str] = {}
#: plug-in failures already warned about in this process (group, name, value)
_WARNED: set[tuple[str, str, str]] = set()


def plugin_failure(group: str, ep: Any, err: BaseException) -> str:
    """One line naming the entry point (group, name, value, distribution) and its error."""
    dist = getattr(getattr(ep, "dist", None), "name", None)
    of = f" of {dist}" if dist else ""
    detail = " ".join(str(err).split())
    if not isinstance(err, MedbenchError):  # ours are self-explanatory; name a foreign exception's type
        detail = f"{type(err).__name__}: {detail}" if detail else type(err).__name__
    return f"entry point {ep.name!r} ({group} = {ep.value!r}{of}) failed to load: {detail}"


def warn_plugin(group: str, ep: Any, line: str) -> None:
    """Print ``line`` (a :func:`plugin_failure`) once per process as a ``medbench: warning:`` line on stderr."""
    key = (group, ep.name, ep.value)
    if key not in _WARNED:
        _WARNED.add(key)
        print(f"medbench: warning: {line}; skipped", file=sys.stderr)


def register_backbone(backbone: Backbone, *, overwrite: bool = False) -> Backbone:
    if backbone.name in _REGISTRY and not overwrite:
        raise BackboneError(f"backbone {backbone.name!r} is already registered by {_REGISTRY[backbone.name].source}",
                            field="name")
    _REGISTRY[backbone.name] = backbone
    return backbone


def _load_builtin() -> None:
    if not _REGISTRY:
        import medbench.backbones.builtin  # noqa: F401  (registers on import)


def _plugin_backbone(ep: Any) -> Backbone:
    dist = ep.dist.name if getattr(ep, "dist", None) else "?"
    obj = ep.load()
    if isinstance(obj, Backbone):
        bb = replace(obj, name=ep.name, source=f"entry point {dist}")
    elif callable(obj):
        bb = Backbone(name=ep.name, build=obj, source=f"entry point {dist}",
                      description=(obj.__doc__ or "").strip().split("\n")[0])
    else:
        raise BackboneError(f"loads to {type(obj).__name__}, neither a medbench Backbone nor a callable")
    if ep.name in _REGISTRY and _REGISTRY[ep.name].source == "medbench":
        raise BackboneError(f"registers {ep.name!r}, a built-in name; choose another")
    return bb


def _load_plugins(wanted: str | None = None) -> None:
    """Register every entry point of ``medbench.backbones`` that loads; warn about the others (not about
    ``wanted``, whose error the caller raises)."""
    global _PLUGINS_LOADED
    if _PLUGINS_LOADED:
        return
    for ep in entry_points(group=BACKBONE_ENTRY_POINT_GROUP):
        try:
            bb = _plugin_backbone(ep)
        except Exception as err:  # a broken plug-in must not hide the rest
            line = plugin_failure(BACKBONE_ENTRY_POINT_GROUP, ep, err)
            _PLUGIN_FAILURES[ep.name] = line
            if ep.name != wanted:
                warn_plugin(BACKBONE_ENTRY_POINT_GROUP, ep, line)
            continue
        _PLUGIN_FAILURES.pop(ep.name, None)
        _REGISTRY[ep.name] = bb
    _PLUGINS_LOADED = True  # only once every entry point was tried


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
        _load_plugins(wanted=name)
    if name not in _REGISTRY and name in _PLUGIN_FAILURES:
        raise BackboneError(f"backbone {name!r} comes from a plug-in that does not load: {_PLUGIN_FAILURES[name]}",
                            field="--backbone")
    if name not in _REGISTRY:
        names = sorted(_REGISTRY)
        raise BackboneError(
            f"unknown backbone {name!r}{did_you_mean(name, names)}; see 'medbench list backbones' "
            "(any timm model works as timm/<name>)",
            field="--backbone",
        )
    return _REGISTRY[name]
