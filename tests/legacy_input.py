"""The input path as it was before issue 19 (medbench 5b8c65f), kept verbatim as the oracle of
tests/test_input_path.py and the "before" of benchmarks/test_input_path_bench.py and
benchmarks/test_cache_build_bench.py: batches assembled on the CPU by one thread, float32 normalisation and
MixUp on the CPU, a per-sample crop loop (``medbench/data/loader.py``); one image prepared for the cache from
a full-size decode, 16-bit scaling in float32 (``medbench/data/cache.py::prepare``,
``medbench/data/image_io.py::to_uint8``). Not used by medbench itself."""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch


@dataclass
class Normalization:
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def for_channels(self, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
        mean = torch.tensor(self.mean, dtype=torch.float32)
        std = torch.tensor(self.std, dtype=torch.float32)
        if channels == 1 and mean.numel() == 3:
            mean, std = mean.mean().reshape(1), std.mean().reshape(1)
        # scale folds the /255 of uint8 inputs: x = (u8 / 255 - mean) / std
        return (mean * 255.0).view(1, -1, 1, 1), (std * 255.0).view(1, -1, 1, 1)


def to_model_input(u8: np.ndarray, norm: Normalization) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(u8)).float()
    mean, std = norm.for_channels(x.shape[1])
    return (x - mean) / std


class TrainStream:
    """Seeded, resumable training batches: ``batch(step)`` is deterministic."""

    def __init__(
        self,
        pixels: np.ndarray,
        labels: np.ndarray,
        rows: np.ndarray,
        *,
        batch_size: int,
        crop: int,
        hflip: bool,
        norm: Normalization,
        seed: int,
        balanced: bool = False,
        rank: int = 0,
        world_size: int = 1,
        mixup_alpha: float = 0.0,
    ):
        if len(rows) == 0:
            raise ValueError("no training rows")
        if batch_size % world_size:
            raise ValueError(f"batch size {batch_size} is not divisible by world size {world_size}")
        self.pixels = pixels
        self.labels = labels
        self.rows = np.asarray(rows, dtype=np.int64)
        self.batch_size = batch_size
        self.crop = crop
        self.hflip = hflip
        self.norm = norm
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        #: BiT MixUp over the *global* batch (see :meth:`batch`); 0: off
        self.mixup_alpha = mixup_alpha
        self.size = int(pixels.shape[-1])
        self._weights = self._balanced_weights() if balanced else None

    def _balanced_weights(self) -> np.ndarray:
        """Sampling weights that give every class the same expected share (minority oversampling)."""
        y = np.nan_to_num(self.labels[self.rows], nan=0.0)
        if y.shape[1] == 1:
            y = np.concatenate([1 - y, y], axis=1)
        cls = y.argmax(1)
        counts = np.bincount(cls, minlength=y.shape[1]).astype(np.float64)
        w = 1.0 / counts[cls]
        return w / w.sum()

    def _global_indices(self, step: int) -> np.ndarray:
        n = len(self.rows)
        b = self.batch_size
        if self._weights is not None:
            rng = np.random.default_rng([self.seed, 1, step])
            return rng.choice(n, size=b, replace=True, p=self._weights)
        start = step * b
        out = np.empty(b, dtype=np.int64)
        filled = 0
        while filled < b:
            epoch, offset = divmod(start + filled, n)
            perm = np.random.default_rng([self.seed, 0, epoch]).permutation(n)
            take = min(b - filled, n - offset)
            out[filled : filled + take] = perm[offset : offset + take]
            filled += take
        return out

    def sample_ids(self, step: int) -> np.ndarray:
        """Cache rows of the whole global batch of ``step`` (all ranks)."""
        return self.rows[self._global_indices(step)]

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's slice of the global batch of ``step`` (MixUp applied when ``mixup_alpha`` > 0).

        MixUp is BiT's over the global batch: one lambda and one permutation per step, drawn from
        (seed, step) alone, so each sample's partner is the same whatever the world size; a rank
        assembles the partners of its slice itself. The numbers equal
        :func:`medbench.train.finetune.mixup` on the whole batch with ``rng([seed, 3, step, 0])``.
        """
        rows = self.sample_ids(step)
        b = self.batch_size
        rng = np.random.default_rng([self.seed, 2, step])
        max_off = self.size - self.crop
        offsets = rng.integers(0, max_off + 1, size=(b, 2))
        flips = rng.random(b) < 0.5 if self.hflip else np.zeros(b, dtype=bool)
        per = b // self.world_size
        lo, hi = self.rank * per, (self.rank + 1) * per
        x = to_model_input(self._crops(rows[lo:hi], offsets[lo:hi], flips[lo:hi]), self.norm)
        y = torch.from_numpy(self.labels[rows[lo:hi]])
        if self.mixup_alpha > 0:
            mix = np.random.default_rng([self.seed, 3, step, 0])
            lam = float(mix.beta(self.mixup_alpha, self.mixup_alpha))
            perm = mix.permutation(b)
            if self.world_size == 1:
                x_partner, y_partner = x[torch.from_numpy(perm)], y[torch.from_numpy(perm)]
            else:
                partner = perm[lo:hi]
                x_partner = to_model_input(self._crops(rows[partner], offsets[partner], flips[partner]), self.norm)
                y_partner = torch.from_numpy(self.labels[rows[partner]])
            x = lam * x + (1 - lam) * x_partner
            y = lam * y + (1 - lam) * y_partner  # NaN + anything = NaN: missing stays missing
        return x, y

    def _crops(self, rows: np.ndarray, offsets: np.ndarray, flips: np.ndarray) -> np.ndarray:
        order = np.argsort(rows, kind="stable")  # sequential reads from the memory map
        gathered = np.empty((len(rows), *self.pixels.shape[1:]), dtype=np.uint8)
        gathered[order] = self.pixels[rows[order]]
        c = self.crop
        out = np.empty((len(rows), gathered.shape[1], c, c), dtype=np.uint8)
        for i, ((oy, ox), flip) in enumerate(zip(offsets, flips)):
            patch = gathered[i, :, oy : oy + c, ox : ox + c]
            out[i] = patch[:, :, ::-1] if flip else patch
        return out

    def iterate(self, start: int, stop: int, prefetch: int = 2) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """Batches of steps ``start`` .. ``stop - 1``, assembled ahead in a background thread."""
        if prefetch <= 0:
            for step in range(start, stop):
                yield (step, *self.batch(step))
            return
        q: queue.Queue = queue.Queue(maxsize=prefetch)
        stop_flag = threading.Event()

        def work() -> None:
            try:
                for step in range(start, stop):
                    if stop_flag.is_set():
                        return
                    q.put((step, *self.batch(step)))
            except BaseException as err:  # surfaced in the consumer
                q.put(err)
                return
            q.put(None)

        t = threading.Thread(target=work, daemon=True, name="medbench-prefetch")
        t.start()
        try:
            while True:
                item = q.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop_flag.set()
            while t.is_alive():
                try:
                    q.get_nowait()
                except queue.Empty:
                    t.join(0.05)


def eval_batches(pixels: np.ndarray, rows: np.ndarray, *, crop: int, norm: Normalization,
                 batch_size: int) -> Iterator[torch.Tensor]:
    """Evaluation inputs: the cached image resized to the crop size (BiT: resize to crop)."""
    import torch.nn.functional as F

    size = int(pixels.shape[-1])
    for s in range(0, len(rows), batch_size):
        chunk = np.asarray(rows[s : s + batch_size])
        x = to_model_input(pixels[np.sort(chunk)][np.argsort(np.argsort(chunk))], norm)
        if size != crop:
            x = F.interpolate(x, size=(crop, crop), mode="bilinear", antialias=True, align_corners=False)
        yield x


# --------------------------------------------------------------------------- one image into the cache (before)

def to_uint8(arr: np.ndarray) -> np.ndarray:
    """Scale any image to uint8: 8-bit passes through, wider types are min-max scaled per image."""
    if arr.dtype == np.uint8:
        return arr
    a = arr.astype(np.float32)
    lo, hi = float(a.min()), float(a.max())
    if hi <= lo:
        return np.zeros(arr.shape, dtype=np.uint8)
    return np.round((a - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def prepare(img: np.ndarray, size: int, channels: int) -> np.ndarray:
    """One decoded image -> uint8 ``[C, size, size]``."""
    from PIL import Image

    img = to_uint8(img)
    if img.ndim == 3 and img.shape[-1] == 4:
        img = img[..., :3]
    if img.ndim == 3 and img.shape[-1] == 1:
        img = img[..., 0]
    if channels == 1 and img.ndim == 3:
        img = np.asarray(Image.fromarray(img).convert("L"))
    if img.shape[0] != size or img.shape[1] != size:
        img = np.asarray(Image.fromarray(img).resize((size, size), Image.BILINEAR))
    if img.ndim == 2:
        img = np.repeat(img[None], channels, axis=0)
    else:
        img = np.transpose(img, (2, 0, 1))
    return np.ascontiguousarray(img, dtype=np.uint8)


def prepare_file(path, size: int, channels: int) -> np.ndarray:
    """What the cache build did per file: a full-size decode, then :func:`prepare`."""
    from medbench.data.image_io import read_image

    return prepare(read_image(path), size, channels)
