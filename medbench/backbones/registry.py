"""The backbone registry: name -> constructor + metadata (after timm's registry).

Built-in names are registered by :mod:`medbench.backbones.builtin` (imported with the package). Other
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

from dataclasses import replace
from importlib.metadata import entry_points
from typing import Any, Callable

from medbench.backbones.backbone import Backbone
from medbench.errors import BackboneError
from medbench.plugins import plugin_failure, warn_plugin
from medbench.utils import did_you_mean

BACKBONE_ENTRY_POINT_GROUP = "medbench.backbones"
_REGISTRY: dict[str, Backbone] = {}
_PLUGINS_LOADED = False
#: entry points that failed to load: backbone name -> the one-line error
_PLUGIN_FAILURES: dict[str, str] = {}


def register_backbone(backbone: Backbone, *, overwrite: bool = False) -> Backbone:
    if backbone.name in _REGISTRY and not overwrite:
        raise BackboneError(f"backbone {backbone.name!r} is already registered by {_REGISTRY[backbone.name].source}",
                            field="name")
    _REGISTRY[backbone.name] = backbone
    return backbone


#: name prefix -> resolver of the rest of the name (``timm/<model>``), registered by the module defining it
_PREFIXES: dict[str, Callable[[str], Backbone]] = {}


def register_prefix(prefix: str, resolve: Callable[[str], Backbone]) -> None:
    """Names starting with ``prefix`` are resolved by ``resolve(rest_of_name)`` (e.g. ``timm/<model>``)."""
    _PREFIXES[prefix] = resolve


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
    _load_plugins()
    return sorted(_REGISTRY.values(), key=lambda b: b.source != "medbench")  # stable: registration order


def get_backbone(name: str) -> Backbone:
    for prefix, resolve in _PREFIXES.items():
        if name.startswith(prefix):
            return resolve(name.removeprefix(prefix))
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
