"""Per-layer representation similarity between two networks (RZ19 Sec. 5; M21's feature reuse).

The two networks are the run's *initial* network (after its init scheme,
before fine-tuning: the pre-trained network for ``--init pretrained``) and the
*fine-tuned* one. A layer is an entry of ``Backbone.blocks`` (see
:mod:`medbench.backbones.blocks`); its representation is the block module's
output on a fixed sample of test images.

* **Linear CKA** (Kornblith et al. 2019), the default. Each image's block
  output is average-pooled to at most ``spatial`` x ``spatial`` positions
  (4 x 4 by default; smaller maps are kept as they are) and flattened, giving
  X [n, C·h·w]; CKA(X, Y) = <K̃, L̃>_F / (‖K̃‖_F ‖L̃‖_F) with K = XXᵀ, L = YYᵀ
  and K̃ = HKH the centred Gram matrices. It is 1 for identical
  representations and invariant to orthogonal transforms and isotropic
  scaling of either side (both leave the centred Gram matrix unchanged up to
  scale), but not to arbitrary invertible linear maps.
* **SVCCA** (Raghu et al. 2017; RZ19 used CCA), an option. As for conv layers
  in those papers, channels are the neurons and every (image, position) of the
  pooled map is a data point: X [n·h·w, C]. Each side is centred and reduced
  by SVD to the top directions holding 99 % of its variance, capped at a
  tenth of the data points (CCA with d dimensions on few more than d points
  finds high correlations even between unrelated representations),
  and the similarity is the mean of the min(d_x, d_y) canonical correlations.

The sample is the same for every run of a task (``SAMPLE_SEED``), so inits
and backbones are compared on the same images. Undefined values (a layer with
zero variance, e.g. all ReLUs dead) are stored as ``None``.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable

import numpy as np

from medbench.utils import atomic_write_bytes

if TYPE_CHECKING:
    import torch
    from torch import nn

METHODS = ("cka", "svcca")
SAMPLE_IMAGES = 256
SAMPLE_SEED = 0
SPATIAL = 4
SVCCA_VARIANCE = 0.99
SIMILARITY_JSON = "similarity.json"
SIMILARITY_PNG = "similarity.png"


def parse_methods(spec: str | None) -> tuple[str, ...]:
    """``"cka"``, ``"svcca"`` or ``"cka,svcca"`` -> methods in canonical order; ``()`` for None."""
    from medbench.errors import UsageError

    if not spec:
        return ()
    names = [s.strip().lower() for s in spec.split(",") if s.strip()]
    bad = [n for n in names if n not in METHODS]
    if bad or not names:
        raise UsageError(f"unknown similarity method {bad[0] if bad else spec!r}; expected cka, svcca or cka,svcca",
                         field="--similarity")
    return tuple(m for m in METHODS if m in names)


def _center_gram(x: "torch.Tensor") -> "torch.Tensor":
    x = x - x.mean(0, keepdim=True)
    return x @ x.T


def linear_cka(x: "torch.Tensor | np.ndarray", y: "torch.Tensor | np.ndarray") -> float | None:
    """Linear CKA of two representations of the same n examples, ``[n, d1]`` and ``[n, d2]``."""
    import torch

    x = torch.as_tensor(x).reshape(len(x), -1).double()
    y = torch.as_tensor(y).reshape(len(y), -1).double()
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"CKA needs the same examples on both sides: {x.shape[0]} vs {y.shape[0]}")
    k, l_ = _center_gram(x), _center_gram(y)
    denom = torch.linalg.matrix_norm(k) * torch.linalg.matrix_norm(l_)
    if not torch.isfinite(denom) or denom <= 0:
        return None
    return float((k * l_).sum() / denom)


def _top_directions(x: "torch.Tensor", variance: float, max_dims: int) -> "torch.Tensor | None":
    """Orthonormal basis ``[points, d]`` of the top principal directions of ``x`` holding ``variance`` of its
    variance (at most ``max_dims``), from the eigendecomposition of the smaller Gram matrix."""
    import torch

    x = x - x.mean(0, keepdim=True)
    points, neurons = x.shape
    if points <= neurons:
        energy, vecs = torch.linalg.eigh(x @ x.T)  # left singular vectors directly
    else:
        energy, vecs = torch.linalg.eigh(x.T @ x)  # right singular vectors; left ones = x v / s
    energy, vecs = energy.flip(0).clamp(min=0), vecs.flip(1)
    total = energy.sum()
    if total <= 0:
        return None
    keep = int(torch.searchsorted(torch.cumsum(energy, 0) / total, torch.tensor(variance, dtype=energy.dtype))) + 1
    keep = max(1, min(keep, max_dims, int((energy > energy[0] * 1e-12).sum())))
    if points <= neurons:
        return vecs[:, :keep]
    u = x @ vecs[:, :keep] / energy[:keep].sqrt()
    return torch.linalg.qr(u).Q  # re-orthonormalise against round-off


def svcca(x: "torch.Tensor | np.ndarray", y: "torch.Tensor | np.ndarray", *, variance: float = SVCCA_VARIANCE,
          max_dims: int | None = None) -> tuple[float | None, tuple[int, int]]:
    """SVCCA of ``[points, neurons]`` representations: (mean canonical correlation, kept dims per side)."""
    import torch

    x = torch.as_tensor(x).double()
    y = torch.as_tensor(y).double()
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"SVCCA needs the same data points on both sides: {x.shape[0]} vs {y.shape[0]}")
    cap = max_dims if max_dims is not None else max(1, x.shape[0] // 10)
    ux, uy = _top_directions(x, variance, cap), _top_directions(y, variance, cap)
    if ux is None or uy is None:
        return None, (0, 0)
    corr = torch.linalg.svdvals(ux.T @ uy).clamp(0.0, 1.0)
    return float(corr[: min(ux.shape[1], uy.shape[1])].mean()), (ux.shape[1], uy.shape[1])


def sample_rows(rows: np.ndarray, n: int = SAMPLE_IMAGES, seed: int = SAMPLE_SEED) -> np.ndarray:
    """At most ``n`` of ``rows``, the same for every run of a task (sorted)."""
    rows = np.asarray(rows)
    if len(rows) <= n:
        return np.sort(rows)
    return np.sort(np.random.default_rng(seed).choice(rows, size=n, replace=False))


def _first_tensor(out):
    import torch

    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        for item in out:
            if isinstance(item, torch.Tensor):
                return item
    raise TypeError(f"block output of type {type(out).__name__} holds no tensor")


def block_outputs(model: "nn.Module", layers: tuple[str, ...], inputs: Iterable["torch.Tensor"], device: str,
                  spatial: int = SPATIAL) -> dict[str, "torch.Tensor"]:
    """Each layer's output on ``inputs``, pooled to at most ``spatial`` x ``spatial``: name -> [n, C, h, w]
    (or [n, ...] for non-spatial outputs), float64 on the CPU."""
    import torch
    import torch.nn.functional as F

    modules = dict(model.named_modules())
    captured: dict[str, list] = {name: [] for name in layers}

    def hook(name: str):
        def fn(module, args, out):
            t = _first_tensor(out).detach().float()
            if t.ndim == 4:
                t = F.adaptive_avg_pool2d(t, (min(t.shape[2], spatial), min(t.shape[3], spatial)))
            captured[name].append(t.cpu().double())
        return fn

    handles = [modules[name].register_forward_hook(hook(name)) for name in layers]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for x in inputs:
                model(x.to(device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {name: torch.cat(parts) for name, parts in captured.items()}


def _as_points(t: "torch.Tensor") -> "torch.Tensor":
    """[n, C, h, w] -> [n·h·w, C] (positions as data points); [n, d] stays."""
    if t.ndim == 4:
        return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])
    return t.reshape(t.shape[0], -1)


def compare_models(reference: "nn.Module", tuned: "nn.Module", layers: tuple[str, ...],
                   inputs: Callable[[], Iterable["torch.Tensor"]], *, methods: tuple[str, ...] = ("cka",),
                   device: str = "cpu", spatial: int = SPATIAL) -> list[dict]:
    """Per-layer similarity of ``reference`` and ``tuned`` on the images ``inputs()`` yields."""
    ref = block_outputs(reference, layers, inputs(), device, spatial)
    new = block_outputs(tuned, layers, inputs(), device, spatial)
    out = []
    for name in layers:
        a, b = ref[name], new[name]
        rec: dict = {"name": name, "shape": list(a.shape[1:])}
        if "cka" in methods:
            rec["cka"] = linear_cka(a, b)
        if "svcca" in methods:
            value, dims = svcca(_as_points(a), _as_points(b))
            rec["svcca"] = value
            rec["svcca_dims"] = list(dims)
        out.append(rec)
    return out


def similarity_record(layers: list[dict], methods: tuple[str, ...], n_images: int,
                      spatial: int = SPATIAL) -> dict:
    return {
        "reference": "initial network (after the init scheme, before fine-tuning)",
        "compared": "fine-tuned network",
        "methods": list(methods),
        "n_images": int(n_images),
        "sample_seed": SAMPLE_SEED,
        "spatial": spatial,
        "svcca_variance": SVCCA_VARIANCE if "svcca" in methods else None,
        "layers": layers,
    }


def line_colors(labels: list[str]) -> dict[str, tuple]:
    """One colour per label, the same in every panel of a figure."""
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if len(labels) <= 10 else "tab20"]
    return {label: cmap(i % cmap.N) for i, label in enumerate(labels)}


def plot_layers(panels: list[dict], path: Path, *, title: str, ncols: int | None = None) -> None:
    """One PNG of similarity per layer: ``panels`` = ``[{"title", "layers", "lines": {label: values}}]``
    (values may be None); a label keeps its colour across panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncols = ncols or max(1, len(panels))
    nrows = max(1, -(-len(panels) // ncols))
    colors = line_colors(list(dict.fromkeys(label for p in panels for label in p["lines"])))
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.4 * nrows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, panel in zip(axes.flat, panels):
        x = np.arange(len(panel["layers"]))
        for label, values in panel["lines"].items():
            y = np.array([np.nan if v is None else v for v in values], dtype=float)
            ax.plot(x, y, marker="o", markersize=3, color=colors[label], label=label)
        ax.set_xticks(x, panel["layers"], rotation=30, ha="right", fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel(panel.get("ylabel", "similarity"), fontsize=8)
        ax.set_title(panel["title"], fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, loc="lower left")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(Path(path), buf.getvalue())


def write_run_similarity(run_path: Path, record: dict, *, title: str) -> None:
    """``similarity.json`` and ``similarity.png`` of one run."""
    from medbench.utils import atomic_write_json

    atomic_write_json(Path(run_path) / SIMILARITY_JSON, record)
    panel = {"title": title, "layers": [r["name"] for r in record["layers"]],
             "lines": {m: [r.get(m) for r in record["layers"]] for m in record["methods"]},
             "ylabel": "initial vs fine-tuned"}
    plot_layers([panel], Path(run_path) / SIMILARITY_PNG, title="per-layer similarity")
