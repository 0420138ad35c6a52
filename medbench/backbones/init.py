"""Initialisation schemes for ``--init``: a registry of functions, one per scheme.

A scheme receives an :class:`InitContext` and sets the network's weights in
place. ``--init NAME[:ARG]`` selects one; the head is zero-initialised after
every scheme (BiT-HyperRule).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from medbench.errors import BackboneError
from medbench.utils import did_you_mean

if TYPE_CHECKING:
    from torch import nn

    from medbench.backbones.registry import Backbone


@dataclass
class InitContext:
    model: "nn.Module"
    backbone: "Backbone"
    #: the scheme's argument, e.g. ``3`` in ``transfusion:3``
    arg: str | None
    seed: int
    explicit_weights: Path | None
    #: filled by :meth:`pretrained_file` for provenance
    weights_path: Path | None = None
    weights_origin: str | None = None
    extra: dict = field(default_factory=dict)

    def pretrained_file(self) -> Path:
        """The pre-trained weights file (resolved once)."""
        if self.backbone.load_weights is None:
            raise BackboneError(f"{self.backbone.name} has no pre-trained weights; use --init random",
                                field="--init")
        if self.weights_path is None:
            from medbench.backbones.weights import resolve_weights_file

            self.weights_path, self.weights_origin = resolve_weights_file(self.backbone, self.explicit_weights)
        return self.weights_path

    def load_pretrained_into(self, model: "nn.Module") -> None:
        assert self.backbone.load_weights is not None
        self.backbone.load_weights(model, self.pretrained_file())


InitFn = Callable[[InitContext], None]
_SCHEMES: dict[str, tuple[InitFn, str, bool]] = {}


def register_init(name: str, help: str, *, needs_weights: bool) -> Callable[[InitFn], InitFn]:
    """Register an init scheme; ``needs_weights``: it reads the pre-trained weights (checked before any run)."""

    def deco(fn: InitFn) -> InitFn:
        _SCHEMES[name] = (fn, help, needs_weights)
        return fn

    return deco


def init_schemes() -> dict[str, str]:
    return {name: help for name, (_, help, _) in sorted(_SCHEMES.items())}


def needs_weights(name: str) -> bool:
    return _SCHEMES[name][2]


def preflight(backbone: "Backbone", init: str | None, weights: Path | None) -> tuple[str, Path | None]:
    """Check the init scheme and find the weights before any run starts: (init, weights file or None)."""
    init = init or backbone.default_init
    name, _ = parse_init(init)
    if not needs_weights(name):
        if weights is not None:
            raise BackboneError(f"--weights given with --init {init}, which does not read weights; drop one",
                                field="--weights")
        return init, None
    if backbone.load_weights is None:
        raise BackboneError(f"{backbone.name} has no pre-trained weights; use --init random", field="--init")
    from medbench.backbones.weights import resolve_weights_file

    return init, resolve_weights_file(backbone, weights)[0]


def parse_init(spec: str) -> tuple[str, str | None]:
    name, _, arg = spec.partition(":")
    if name not in _SCHEMES:
        raise BackboneError(f"unknown init scheme {name!r}{did_you_mean(name, list(_SCHEMES))}; expected one of: "
                            f"{', '.join(_SCHEMES)}", field="--init")
    return name, (arg or None)


def apply_init(ctx: InitContext, name: str) -> None:
    _SCHEMES[name][0](ctx)


@register_init("random", "the architecture's own random initialisation (seeded)", needs_weights=False)
def _random(ctx: InitContext) -> None:
    if ctx.arg is not None:
        raise BackboneError("'random' takes no argument", field="--init")


@register_init("pretrained", "pre-trained weights from --weights, the local folder or the hub", needs_weights=True)
def _pretrained(ctx: InitContext) -> None:
    if ctx.arg is not None:
        raise BackboneError("'pretrained' takes no argument", field="--init")
    ctx.load_pretrained_into(ctx.model)
