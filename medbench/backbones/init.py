"""Initialisation schemes for ``--init``: a registry of functions, one per scheme.

A scheme receives an :class:`InitContext` and sets the network's weights in
place. ``--init NAME[:ARG]`` selects one; the head is zero-initialised after
every scheme (BiT-HyperRule). Random parts are the architecture's own
initialisation drawn from the run seed, so the same seed gives the same random
tensors under every scheme.

Schemes (RZ19, Raghu et al. 2019, for ``mean-var``, ``transfusion`` and ``gabor``):

``random``
    the architecture's own initialisation.
``pretrained``
    the pre-trained weights (``--weights FILE``, the local weights folder, or the hub).
``mean-var``
    every parameter tensor outside normalisation layers and the head (a conv
    or linear weight, and separately its bias) is drawn i.i.d. from
    N(mean, var) of the same tensor of the pre-trained network (population
    variance); "layer" is one parameter tensor, because a layer's bias has
    other statistics than its weights. Normalisation layers (BatchNorm, and
    GroupNorm/LayerNorm such as BiT's) are reset to identity: scale 1, shift 0,
    running mean 0, running variance 1. The statistics come from the tensors
    as ``pretrained`` would load them, so a first conv summed to one input
    channel is matched as summed. Note for BiT: its convs standardise their
    weights per output filter (weight standardisation), which removes any
    per-layer mean and scale, so on BiT ``mean-var`` equals an i.i.d.
    Gaussian init with identity GroupNorm.
``transfusion:K``
    the tensors of the first K entries of ``Backbone.blocks`` come from the
    pre-trained network (BatchNorm running statistics included); every other
    tensor keeps the random initialisation. Which tensor belongs to which
    block (ResNet-50's ``bn1`` goes with ``conv1``) is defined in
    :mod:`medbench.backbones.blocks`. ``transfusion:0`` equals ``random`` and
    ``transfusion:<number of blocks>`` equals ``pretrained``, tensor for tensor.
``gabor``
    the first convolution (the first ``Conv2d`` in module order: CBR
    ``blocks.0.0``, ResNet-50 ``conv1``, BiT ``stem.conv``) holds a bank of
    synthetic Gabor filters (:func:`gabor_bank`); its bias, if any, is zero;
    everything else is random. Needs no weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from medbench.errors import BackboneError
from medbench.utils import did_you_mean

if TYPE_CHECKING:
    import torch
    from torch import nn

    from medbench.backbones.backbone import Backbone


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

    def pretrained_model(self) -> "nn.Module":
        """A copy of the network holding the pre-trained weights exactly as ``pretrained`` loads them
        (a first conv adapted to the task's input channels included)."""
        import copy

        source = copy.deepcopy(self.model)
        self.load_pretrained_into(source)
        return source


InitFn = Callable[[InitContext], None]
#: ``check(arg, backbone)`` raises a BackboneError for a bad scheme argument, before any run starts
ArgCheck = Callable[[str | None, "Backbone"], None]


@dataclass(frozen=True)
class _Scheme:
    fn: InitFn
    help: str
    needs_weights: bool
    check_arg: ArgCheck | None = None


_SCHEMES: dict[str, _Scheme] = {}


def register_init(name: str, help: str, *, needs_weights: bool,
                  check_arg: ArgCheck | None = None) -> Callable[[InitFn], InitFn]:
    """Register an init scheme; ``needs_weights``: it reads the pre-trained weights (checked before any run);
    ``check_arg(arg, backbone)``: validates ``NAME:ARG`` early (the scheme itself validates again)."""

    def deco(fn: InitFn) -> InitFn:
        _SCHEMES[name] = _Scheme(fn, help, needs_weights, check_arg)
        return fn

    return deco


def init_schemes() -> dict[str, str]:
    return {name: scheme.help for name, scheme in sorted(_SCHEMES.items())}


def needs_weights(name: str) -> bool:
    return _SCHEMES[name].needs_weights


def preflight(backbone: "Backbone", init: str | None, weights: Path | None,
              in_chans: tuple[int, ...] = ()) -> tuple[str, Path | None]:
    """Check the init scheme, find the weights and check them before any run starts: (init, weights file or
    None). Every tensor of the file is read and must be finite, and the file is loaded into the architecture
    on the meta device for each of ``in_chans`` (the tasks' input channels; none given: the contents only,
    ``Runner.preflight`` checks again with its tasks' channels): a broken, truncated, foreign or NaN file is
    one line naming it here, exit 2, not a failure of every run
    (:func:`medbench.backbones.weights.check_weights`)."""
    init = init or backbone.default_init
    name, arg = parse_init(init)
    if _SCHEMES[name].check_arg is not None:
        _SCHEMES[name].check_arg(arg, backbone)
    if not needs_weights(name):
        if weights is not None:
            raise BackboneError(f"--weights given with --init {init}, which does not read weights; drop one",
                                field="--weights")
        return init, None
    if backbone.load_weights is None:
        raise BackboneError(f"{backbone.name} has no pre-trained weights; use --init random", field="--init")
    from medbench.backbones.weights import check_weights, resolve_weights_file

    path = resolve_weights_file(backbone, weights)[0]
    check_weights(backbone, path, in_chans)
    return init, path


def parse_init(spec: str) -> tuple[str, str | None]:
    name, _, arg = spec.partition(":")
    if name not in _SCHEMES:
        raise BackboneError(f"unknown init scheme {name!r}{did_you_mean(name, list(_SCHEMES))}; expected one of: "
                            f"{', '.join(_SCHEMES)}", field="--init")
    return name, (arg or None)


def apply_init(ctx: InitContext, name: str) -> None:
    _SCHEMES[name].fn(ctx)


@register_init("random", "the architecture's own random initialisation (seeded)", needs_weights=False)
def _random(ctx: InitContext) -> None:
    if ctx.arg is not None:
        raise BackboneError("'random' takes no argument", field="--init")


@register_init("pretrained", "pre-trained weights from --weights, the local folder or the hub", needs_weights=True)
def _pretrained(ctx: InitContext) -> None:
    if ctx.arg is not None:
        raise BackboneError("'pretrained' takes no argument", field="--init")
    ctx.load_pretrained_into(ctx.model)


@register_init("mean-var", "each pre-trained tensor redrawn i.i.d. from N(its mean, its variance); norms reset "
               "to identity (RZ19)", needs_weights=True)
def _mean_var(ctx: InitContext) -> None:
    import torch

    from medbench.backbones.blocks import head_prefix

    if ctx.arg is not None:
        raise BackboneError("'mean-var' takes no argument", field="--init")
    source = ctx.pretrained_model().state_dict()
    head = head_prefix(ctx.model)
    norm_layers = _norm_layers()
    gen = torch.Generator().manual_seed(ctx.seed)
    with torch.no_grad():
        for name, module in ctx.model.named_modules():
            if name == head or name.startswith(head + "."):
                continue
            if isinstance(module, norm_layers):
                reset_norm_to_identity(module)
                continue
            for pname, param in module.named_parameters(recurse=False):
                src = source[f"{name}.{pname}" if name else pname].double()
                mean, std = src.mean(), src.std(correction=0)
                draw = torch.randn(param.shape, generator=gen, dtype=torch.float64) * std + mean
                param.copy_(draw.to(param.dtype))


def _norm_layers() -> tuple[type, ...]:
    from torch import nn

    return (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)


def reset_norm_to_identity(module: "nn.Module") -> None:
    """Scale 1, shift 0, and (BatchNorm) running mean 0, variance 1, no batches tracked."""
    import torch

    with torch.no_grad():
        if getattr(module, "weight", None) is not None:
            module.weight.fill_(1.0)
        if getattr(module, "bias", None) is not None:
            module.bias.zero_()
    if getattr(module, "track_running_stats", False) and getattr(module, "running_mean", None) is not None:
        module.reset_running_stats()


def _check_transfusion_arg(arg: str | None, backbone: "Backbone") -> int:
    from medbench.backbones.blocks import check_block_count

    if arg is None or not arg.strip().lstrip("-").isdigit():
        raise BackboneError(f"transfusion needs the number of blocks to copy, e.g. transfusion:2; got {arg!r}",
                            field="--init")
    k = int(arg)
    if backbone.blocks:
        check_block_count(k, tuple(backbone.blocks), backbone, "--init")
    elif k < 0:
        raise BackboneError(f"transfusion:K needs K >= 0, got {k}", field="--init")
    return k


@register_init("transfusion", "transfusion:K: pre-trained weights in the first K blocks, random init above (RZ19)",
               needs_weights=True, check_arg=_check_transfusion_arg)
def _transfusion(ctx: InitContext) -> None:
    from medbench.backbones.blocks import block_names, check_block_count, tensor_blocks

    k = _check_transfusion_arg(ctx.arg, ctx.backbone)
    names = block_names(ctx.backbone, ctx.model)
    check_block_count(k, names, ctx.backbone, "--init")
    if k == 0:
        return
    source = ctx.pretrained_model().state_dict()
    owners = tensor_blocks(ctx.model, names)
    copied = {key: source[key] for key, block in owners.items() if block is not None and block < k}
    ctx.model.load_state_dict(copied, strict=False)
    ctx.extra["transfused_tensors"] = len(copied)


def gabor_bank(out_channels: int, in_channels: int, kh: int, kw: int) -> "torch.Tensor":
    """``[out, in, kh, kw]`` Gabor filters: 8 orientations (k·22.5°) x 2 phases (even, odd) x wavelengths.

    Filter i has orientation ``i % 8``, phase ``(i // 8) % 2`` and wavelength
    ``(i // 16) % n`` of ``n = ceil(out / 16)`` wavelengths spaced
    geometrically from 3 px to the kernel size (one wavelength, half the
    kernel size but at least 3 px, when ``out <= 16``); envelope sigma = 0.56 x
    wavelength (one-octave bandwidth), aspect 0.5. Each filter is the same on
    every input channel, zero-mean, and scaled to the standard deviation of
    Kaiming-normal init, sqrt(2 / fan_in), so activations keep the scale the
    random init would give.
    """
    import math

    import torch

    n_freq = max(1, math.ceil(out_channels / 16))
    size = max(kh, kw)
    shortest = 3.0  # 2 px is the Nyquist limit, where the odd (sine) filter vanishes on the pixel grid
    wavelengths = torch.logspace(math.log10(shortest), math.log10(max(size, shortest)), n_freq,
                                 dtype=torch.float64) if n_freq > 1 else \
        torch.tensor([max(size / 2, shortest)], dtype=torch.float64)
    ys = torch.arange(kh, dtype=torch.float64) - (kh - 1) / 2
    xs = torch.arange(kw, dtype=torch.float64) - (kw - 1) / 2
    y, x = torch.meshgrid(ys, xs, indexing="ij")
    fan_in = in_channels * kh * kw
    target_std = math.sqrt(2.0 / fan_in)
    bank = torch.empty(out_channels, in_channels, kh, kw, dtype=torch.float64)
    for i in range(out_channels):
        theta = (i % 8) * math.pi / 8
        phase = ((i // 8) % 2) * math.pi / 2
        lam = float(wavelengths[(i // 16) % n_freq])
        sigma = 0.56 * lam
        xr = x * math.cos(theta) + y * math.sin(theta)
        yr = -x * math.sin(theta) + y * math.cos(theta)
        g = torch.exp(-(xr**2 + (0.5 * yr) ** 2) / (2 * sigma**2)) * torch.cos(2 * math.pi * xr / lam + phase)
        g = g - g.mean()
        std = g.std(correction=0)
        g = g / std * target_std if std > 1e-6 else torch.zeros_like(g)
        bank[i] = g.expand(in_channels, kh, kw)
    return bank


def first_conv(model: "nn.Module") -> tuple[str, "nn.Module"]:
    from torch import nn

    from medbench.backbones.blocks import head_prefix

    head = head_prefix(model)
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d) and not (name == head or name.startswith(head + ".")):
            return name, module
    raise BackboneError(f"{type(model).__name__} has no Conv2d for Gabor filters", field="--init")


@register_init("gabor", "synthetic Gabor filters in the first conv, random init elsewhere (RZ19)",
               needs_weights=False)
def _gabor(ctx: InitContext) -> None:
    import torch

    if ctx.arg is not None:
        raise BackboneError("'gabor' takes no argument", field="--init")
    _, conv = first_conv(ctx.model)
    out_c, in_c, kh, kw = conv.weight.shape
    with torch.no_grad():
        conv.weight.copy_(gabor_bank(out_c, in_c, kh, kw).to(conv.weight.dtype))
        if conv.bias is not None:
            conv.bias.zero_()
