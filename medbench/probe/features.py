"""Frozen features: a network's pooled vector of each cached image, for the probes.

:func:`embed_rows` is the one place probes read pixels: the evaluation batches of
:func:`medbench.data.loader.eval_batches` (uint8 rows read ahead and moved to the device, resized to the
crop, normalised with the backbone's mean and std and a grey 1-channel cache broadcast to the network's
channels there: exactly what fine-tuned runs are evaluated on), through the network in eval mode without
gradients, pooled by :func:`medbench.backbones.pooling.pooled_features`, kept on the device until the end,
as float32.

:func:`extractor_identity` is what fixes the features of an image besides the image itself: backbone,
init, weights (by content hash), the seed when the init draws random tensors, the pooling, the
precision. With the task data (dataset fingerprint, split rows, input geometry) it keys the feature
cache (:mod:`medbench.store.features`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from torch import nn

    from medbench.data.loader import Normalization

#: inits whose network does not depend on the run seed (every tensor but the head comes from the weights):
#: their features are shared by every seed
SEED_FREE_INITS = ("pretrained",)
VERSION = 1


def seed_free(init: str) -> bool:
    return init in SEED_FREE_INITS


def extractor_identity(*, backbone: str, init: str, weights_sha256: str | None, seed: int, pooling: str,
                       precision: str, mean: tuple, std: tuple) -> dict:
    """What fixes a network's features of an image (the seed only when the init draws random tensors)."""
    return {"version": VERSION, "backbone": backbone, "init": init, "weights_sha256": weights_sha256,
            "seed": None if seed_free(init) else seed, "pooling": pooling, "precision": precision,
            "normalisation": {"mean": list(mean), "std": list(std)}}


def embed_rows(model: "nn.Module", pixels: np.ndarray, rows: np.ndarray, *, crop: int, norm: "Normalization",
               pooling: str | None, device: str, precision: str = "fp32", batch_size: int = 128,
               channels: int | None = None, workers: int = 1) -> np.ndarray:
    """``[len(rows), D]`` float32 pooled features of the cached images ``rows``; ``channels``: the network's
    input channels (default the cache's), ``workers``: threads reading cache rows."""
    import torch

    from medbench.backbones.pooling import pooled_features
    from medbench.data.loader import eval_batches

    was_training = model.training
    model.eval()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    out = []
    try:
        with torch.no_grad():
            for x in eval_batches(pixels, rows, crop=crop, norm=norm, batch_size=batch_size, device=device,
                                  channels=channels, workers=workers):
                with torch.autocast(device_type=device.split(":")[0], dtype=dtype or torch.float32,
                                    enabled=dtype is not None):
                    f = pooled_features(model, x, pooling)
                out.append(f.float())  # on the device: no host sync per batch
    finally:
        model.train(was_training)
    if not out:
        return np.zeros((0, 0), dtype=np.float32)
    return torch.cat(out).cpu().numpy().astype(np.float32, copy=False)
