"""Batches from the preprocessing cache, for training and evaluation, as uint8 up to the device.

The training stream is a pure function of (seed, step): which samples form the
global batch of a step, each sample's crop and flip, and the MixUp lambda and
partners are derived from the seed and the step alone. So a run resumed from a
checkpoint at step t sees exactly the batches an uninterrupted run sees, and
with data parallelism each rank takes its slice of the same global batch,
whatever the world size.

A batch is made in two stages:

* **host** (:meth:`TrainStream.host_batch`): the distinct cache rows a rank
  needs for a step (its slice of the global batch and, with MixUp, the
  partners of its slice) are copied out of the memory map, in ascending row
  order, into one uint8 buffer (pinned when the device is a GPU), together with
  the small index tensors of the step (which row each crop reads, the crop
  offsets, the flips, the MixUp partners) and the labels (MixUp applied). The
  copies run in background worker threads (numpy releases the GIL while
  copying), ahead of the training loop, in step order (:meth:`TrainStream.iterate`).
* **device** (:meth:`TrainStream.to_device`): the buffer crosses to the device
  as uint8 (a non-blocking copy on a side stream on CUDA, overlapping the
  previous step), and crop, flip, uint8 -> float, normalisation, the expansion
  of a 1-channel cache to the network's 3 channels and MixUp run there as
  batched tensor operations. On CPU the same code runs with the CPU as the
  device.

The numbers are those of the earlier single-threaded CPU path bit for bit on
CPU (tests/test_input_path.py holds that path as the oracle): the same crops
and flips, the same normalisation arithmetic ``(u8 - 255 mean) / (255 std)``
in float32, MixUp as ``lam * x + (1 - lam) * x[partner]`` after normalisation.
Grey images cached with one channel give the values a 3-channel cache of the
same images gives (the channels of a grey image are equal; the per-channel
normalisation broadcasts).

Evaluation (:func:`eval_batches`) takes the same path: rows read in background
threads, uint8 to the device, normalised and resized there (antialiased
bilinear, as before), yielding device tensors ready for a network.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch


@dataclass
class Normalization:
    mean: tuple[float, ...]
    std: tuple[float, ...]
    #: per (channels, device): made once, so no batch copies constants to a GPU (a copy from pageable memory
    #: would wait for the device's queued work)
    _made: dict = field(default_factory=dict, repr=False, compare=False)

    def for_channels(self, channels: int, device: Any = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """(255 mean, 255 std) as float32 ``[1, channels, 1, 1]`` on ``device``."""
        key = (channels, str(torch.device(device)))
        if key not in self._made:
            mean = torch.tensor(self.mean, dtype=torch.float32)
            std = torch.tensor(self.std, dtype=torch.float32)
            if channels == 1 and mean.numel() == 3:
                mean, std = mean.mean().reshape(1), std.mean().reshape(1)
            # scale folds the /255 of uint8 inputs: x = (u8 / 255 - mean) / std
            self._made[key] = ((mean * 255.0).view(1, -1, 1, 1).to(device),
                               (std * 255.0).view(1, -1, 1, 1).to(device))
        return self._made[key]


def normalize(u8: torch.Tensor, norm: Normalization, channels: int | None = None) -> torch.Tensor:
    """uint8 ``[N, c, H, W]`` (c = 1 or channels) -> float32 ``[N, channels, H, W]`` on the same device:
    ``(u8 - 255 mean) / (255 std)``.

    A 1-channel input is broadcast to ``channels`` (a grey cache feeding a 3-channel network): the result
    equals normalising the 3 identical channels of the grey image.
    """
    channels = channels or int(u8.shape[1])
    if u8.shape[1] not in (1, channels):
        raise ValueError(f"{u8.shape[1]} cached channels cannot feed a {channels}-channel network")
    mean, std = norm.for_channels(channels, u8.device)
    x = u8.float()
    x = x.sub_(mean) if x.shape[1] == channels else x - mean  # in place where the shapes allow: same numbers
    return x.div_(std)


def crop_flip(u8: torch.Tensor, slot: torch.Tensor | None, offsets: torch.Tensor, flips: torch.Tensor,
              crop: int) -> torch.Tensor:
    """Per-sample crops of uint8 images: ``[R, C, S, S]`` -> ``[P, C, crop, crop]``.

    Crop ``i`` reads image ``slot[i]`` (``slot`` None: image ``i``) at rows ``offsets[i, 0] ..`` and columns
    ``offsets[i, 1] ..``, mirrored left-right when ``flips[i]``. On a GPU two gathers (one kernel each,
    :func:`_crop_flip_gather`); on the CPU a copy per sample, which is faster there (memory copies instead of
    per-element index arithmetic) and gives the same bytes (tests/test_input_path.py runs both on CPU).
    """
    if u8.device.type != "cpu":
        return _crop_flip_gather(u8, slot, offsets, flips, crop)
    src = u8.numpy()
    out = torch.empty((len(offsets), u8.shape[1], crop, crop), dtype=torch.uint8)
    dst = out.numpy()
    rows = range(len(offsets)) if slot is None else slot.tolist()
    for i, (r, (oy, ox), flip) in enumerate(zip(rows, offsets.tolist(), flips.tolist())):
        patch = src[r, :, oy:oy + crop, ox:ox + crop]
        dst[i] = patch[:, :, ::-1] if flip else patch
    return out


def _crop_flip_gather(u8: torch.Tensor, slot: torch.Tensor | None, offsets: torch.Tensor, flips: torch.Tensor,
                      crop: int) -> torch.Tensor:
    """:func:`crop_flip` as two batched gathers (rows, then columns, the flip folded into the column index)."""
    if slot is not None:
        u8 = u8.index_select(0, slot)
    p, c, s = u8.shape[0], u8.shape[1], u8.shape[-1]
    ar = torch.arange(crop, device=u8.device)
    ys = offsets[:, :1] + ar
    xs = torch.where(flips[:, None], offsets[:, 1:] + (crop - 1) - ar, offsets[:, 1:] + ar)
    rows = torch.gather(u8, 2, ys[:, None, :, None].expand(p, c, crop, s))
    return torch.gather(rows, 3, xs[:, None, None, :].expand(p, c, crop, crop))


# --------------------------------------------------------------------------- reading the memory map

def _base_rows(pixels: Any, rows: np.ndarray) -> tuple[Any, np.ndarray]:
    """The array to read and its row numbers: a :class:`~medbench.data.cache.RowMap` resolves to its base."""
    from medbench.data.cache import RowMap

    rows = np.asarray(rows, dtype=np.int64)
    if isinstance(pixels, RowMap):
        return pixels.base, pixels.rows[rows]
    return pixels, rows


class RowReader:
    """Copies cache rows into a uint8 buffer, split over ``workers`` threads (numpy releases the GIL while
    copying, page faults of the memory map included). Reads go in ascending row order (sequential on disk).

    Buffers given back with :meth:`release` are reused (a fresh 100 MB buffer costs more in page faults than
    the copy into it); pinned buffers are not: the CUDA caching host allocator recycles them once their
    copies to the device have completed.
    """

    def __init__(self, workers: int = 1):
        self.workers = max(1, int(workers))
        self._pool: ThreadPoolExecutor | None = None
        self._free: list[torch.Tensor] = []
        self._lock = threading.Lock()

    def __enter__(self) -> "RowReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self._free.clear()

    def _buffer(self, rows: int, shape: tuple[int, ...], pin: bool) -> torch.Tensor:
        if not pin:
            with self._lock:
                for i, buf in enumerate(self._free):
                    if buf.shape[1:] == shape and buf.shape[0] >= rows:
                        return self._free.pop(i)[:rows]
        return torch.empty((rows, *shape), dtype=torch.uint8, pin_memory=pin)

    def release(self, t: torch.Tensor) -> None:
        """``t`` (a :meth:`read` result) is no longer used: its buffer may take the next rows."""
        if t.device.type != "cpu" or t.is_pinned():
            return
        base = t._base if t._base is not None else t
        with self._lock:
            if len(self._free) < 4:
                self._free.append(base)

    def read(self, pixels: Any, rows: np.ndarray, *, pin: bool = False) -> torch.Tensor:
        """uint8 ``[len(rows), C, S, S]``: row ``i`` of the result is cache row ``rows[i]`` (repeats allowed)."""
        base, src = _base_rows(pixels, rows)
        out = self._buffer(len(src), tuple(base.shape[1:]), pin)
        dst = out.numpy()
        order = np.argsort(src, kind="stable")

        def copy(part: np.ndarray) -> None:
            for i in part:
                dst[i] = base[src[i]]

        if self.workers == 1 or len(order) < 2 * self.workers:
            copy(order)
        else:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="medbench-rows")
            for f in [self._pool.submit(copy, part) for part in np.array_split(order, self.workers)]:
                f.result()
        return out


def _background(make: Callable[[Any], Any], items: Iterable, prefetch: int) -> Iterator[Any]:
    """``make(item)`` for each item, in order, computed up to ``prefetch`` items ahead in a background thread
    (``prefetch`` 0: in the caller's thread). An exception in the thread is raised in the caller."""
    if prefetch <= 0:
        for item in items:
            yield make(item)
        return
    q: queue.Queue = queue.Queue(maxsize=prefetch)
    stop_flag = threading.Event()

    def work() -> None:
        try:
            for item in items:
                if stop_flag.is_set():
                    return
                q.put((make(item),))
        except BaseException as err:  # surfaced in the consumer
            q.put(err)
            return
        q.put(None)

    t = threading.Thread(target=work, daemon=True, name="medbench-prefetch")
    t.start()
    try:
        while True:
            got = q.get()
            if got is None:
                return
            if isinstance(got, BaseException):
                raise got
            yield got[0]
    finally:
        stop_flag.set()
        while t.is_alive():
            try:
                q.get_nowait()
            except queue.Empty:
                t.join(0.05)


# --------------------------------------------------------------------------- moving to the device

@dataclass
class HostBatch:
    """One rank's inputs of one step as they leave the host: uint8 images and small index tensors."""

    step: int
    #: the distinct cache rows the step reads, in order of first use, uint8 ``[R, C, S, S]``
    pixels: torch.Tensor
    #: per crop (this rank's samples first, then MixUp partners from other ranks' slices): which image;
    #: None when crop i reads image i
    slot: torch.Tensor | None
    #: per crop: top-left corner (row, column)
    offsets: torch.Tensor
    #: per crop: mirrored left-right
    flips: torch.Tensor
    #: this rank's labels, MixUp applied (float32 ``[n, L]``, NaN missing)
    labels: torch.Tensor
    #: per sample: which crop is its MixUp partner; None without MixUp
    partner: torch.Tensor | None = None
    lam: float = 1.0

    @property
    def nbytes(self) -> int:
        """Bytes that cross to the device for this step."""
        return sum(t.numel() * t.element_size() for t in self._tensors())

    def _tensors(self) -> list[torch.Tensor]:
        return [getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)]

    def pinned(self) -> "HostBatch":
        """Every tensor in pinned memory (the pixels are read into pinned memory directly)."""
        return replace(self, **{f.name: getattr(self, f.name).pin_memory() for f in fields(self)
                                if isinstance(getattr(self, f.name), torch.Tensor)
                                and not getattr(self, f.name).is_pinned()})

    def to(self, device: torch.device, non_blocking: bool = False) -> "HostBatch":
        moved = {f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
                 for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)}
        return replace(self, **moved)


class _DeviceStage:
    """Host -> device copies. CUDA: from pinned memory, non-blocking, on a side stream, so the copy of the next
    batch overlaps the current step; the consuming stream waits for it (:meth:`ready`). CPU: nothing to do."""

    def __init__(self, device: Any):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self._stream = None

    def stage(self, item: Any) -> Any:
        if not self.cuda:
            return item if self.device.type == "cpu" else item.to(self.device)
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.device)
        with torch.cuda.stream(self._stream):
            return item.to(self.device, non_blocking=True)

    def ready(self, item: Any) -> Any:
        """``item`` (as :meth:`stage` returned it) usable on the current stream."""
        if self.cuda and self._stream is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_stream(self._stream)
            for t in (item._tensors() if isinstance(item, HostBatch) else [item]):
                t.record_stream(current)  # the caching allocator must not reuse it before the current stream is done
        return item


def _staged(stage: _DeviceStage, items: Iterator[Any]) -> Iterator[Any]:
    """Items moved to the device one ahead of the consumer (so a GPU copies the next while it computes)."""
    pending = None
    for item in items:
        nxt = stage.stage(item)
        if pending is not None:
            yield stage.ready(pending)
        pending = nxt
    if pending is not None:
        yield stage.ready(pending)


# --------------------------------------------------------------------------- training batches

class TrainStream:
    """Seeded, resumable training batches: ``batch(step)`` is deterministic.

    ``pixels``: the cache, uint8 ``[N, C, S, S]`` (a memory map, an array or a RowMap); ``channels``: what
    the network takes (default: the cache's; a 1-channel cache feeds a 3-channel network by broadcasting).
    """

    def __init__(
        self,
        pixels: Any,
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
        channels: int | None = None,
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
        #: BiT MixUp over the *global* batch (see :meth:`host_batch`); 0: off
        self.mixup_alpha = mixup_alpha
        self.size = int(pixels.shape[-1])
        self.channels = channels or int(pixels.shape[1])
        if int(pixels.shape[1]) not in (1, self.channels):
            raise ValueError(f"a {pixels.shape[1]}-channel cache cannot feed a {self.channels}-channel network")
        if crop > self.size:
            raise ValueError(f"crop {crop} is larger than the cached images ({self.size} px)")
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

    def draws(self, step: int) -> dict:
        """The global batch of ``step``: cache rows, crop offsets ``[b, 2]``, flips, and with MixUp its
        lambda and partner permutation (BiT's: one lambda and one permutation per step, over the global batch).
        Each a function of (seed, step) alone."""
        b = self.batch_size
        rows = self.sample_ids(step)
        rng = np.random.default_rng([self.seed, 2, step])
        offsets = rng.integers(0, self.size - self.crop + 1, size=(b, 2))
        flips = rng.random(b) < 0.5 if self.hflip else np.zeros(b, dtype=bool)
        out = {"rows": rows, "offsets": offsets, "flips": flips, "lam": None, "perm": None}
        if self.mixup_alpha > 0:
            mix = np.random.default_rng([self.seed, 3, step, 0])
            out["lam"] = float(mix.beta(self.mixup_alpha, self.mixup_alpha))
            out["perm"] = mix.permutation(b)
        return out

    def host_batch(self, step: int, *, reader: RowReader | None = None, pin: bool = False) -> HostBatch:
        """This rank's inputs of ``step`` on the host: the distinct rows it reads (its slice of the global
        batch and, with MixUp, its slice's partners, which may sit in other ranks' slices), uint8."""
        d = self.draws(step)
        b = self.batch_size
        per = b // self.world_size
        lo, hi = self.rank * per, (self.rank + 1) * per
        own = np.arange(lo, hi)
        labels = torch.from_numpy(np.ascontiguousarray(self.labels[d["rows"][own]]))
        partner = None
        positions = own
        if d["perm"] is not None:
            partners = d["perm"][lo:hi]
            positions = np.concatenate([own, np.setdiff1d(partners, own)])
            where = np.full(b, -1, dtype=np.int64)
            where[positions] = np.arange(len(positions))
            partner = torch.from_numpy(where[partners])
            lam = d["lam"]
            y_partner = torch.from_numpy(np.ascontiguousarray(self.labels[d["rows"][partners]]))
            labels = lam * labels + (1 - lam) * y_partner  # NaN + anything = NaN: missing stays missing
        # the distinct rows in order of first use: without repeats, crop i reads image i (no index on the device)
        uniq, first, inverse = np.unique(d["rows"][positions], return_index=True, return_inverse=True)
        order = np.argsort(first, kind="stable")
        rank_of = np.empty(len(uniq), dtype=np.int64)
        rank_of[order] = np.arange(len(uniq))
        slot = rank_of[inverse.reshape(-1)]
        pixels = (reader or RowReader()).read(self.pixels, uniq[order], pin=pin)
        identity = len(uniq) == len(slot)
        hb = HostBatch(step=step, pixels=pixels, slot=None if identity else torch.from_numpy(slot),
                       offsets=torch.from_numpy(d["offsets"][positions]),
                       flips=torch.from_numpy(d["flips"][positions]), labels=labels, partner=partner,
                       lam=d["lam"] if d["lam"] is not None else 1.0)
        return hb.pinned() if pin else hb

    def to_device(self, hb: HostBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Model inputs and targets from a host batch already on its device (:meth:`HostBatch.to`): crop, flip,
        normalise (and broadcast a 1-channel cache to the network's channels), MixUp."""
        n = len(hb.labels)
        x = normalize(crop_flip(hb.pixels, hb.slot, hb.offsets, hb.flips, self.crop), self.norm, self.channels)
        if hb.partner is not None:  # lam * x + (1 - lam) * x[partner], in place: the same numbers, less memory
            partner = x[hb.partner].mul_(1 - hb.lam)
            x = x[:n].mul_(hb.lam).add_(partner)
        return x, hb.labels

    def batch(self, step: int, device: Any = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's slice of the global batch of ``step`` on ``device`` (MixUp applied when ``mixup_alpha``
        > 0): each sample's partner is the same whatever the world size."""
        stage = _DeviceStage(device)
        return self.to_device(stage.ready(stage.stage(self.host_batch(step, pin=stage.cuda))))

    def iterate(self, start: int, stop: int, prefetch: int = 2, *, device: Any = "cpu",
                workers: int = 1) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """Batches of steps ``start`` .. ``stop - 1`` on ``device``: host batches assembled ``prefetch`` steps
        ahead in a background thread (their rows copied by ``workers`` threads), moved one step ahead."""
        stage = _DeviceStage(device)
        with RowReader(workers) as reader:
            hosts = _background(lambda step: self.host_batch(step, reader=reader, pin=stage.cuda),
                                range(start, stop), prefetch)
            for hb in _staged(stage, hosts):
                x, y = self.to_device(hb)
                reader.release(hb.pixels)  # x holds its own copy: the buffer takes a later step's rows
                yield hb.step, x, y


# --------------------------------------------------------------------------- evaluation batches

def eval_batches(pixels: Any, rows: np.ndarray, *, crop: int, norm: Normalization, batch_size: int,
                 device: Any = "cpu", channels: int | None = None, workers: int = 1,
                 prefetch: int = 2) -> Iterator[torch.Tensor]:
    """Evaluation inputs on ``device``, in the order of ``rows``: the cached image resized to the crop size
    (BiT: resize to crop), float32 ``[n, channels, crop, crop]`` ready for a network. Rows are read ahead in a
    background thread; normalisation and the antialiased bilinear resize run on the device."""
    import torch.nn.functional as F

    rows = np.asarray(rows, dtype=np.int64)
    size = int(pixels.shape[-1])
    channels = channels or int(pixels.shape[1])
    stage = _DeviceStage(device)
    with RowReader(workers) as reader:
        chunks = (rows[s : s + batch_size] for s in range(0, len(rows), batch_size))
        hosts = _background(lambda chunk: reader.read(pixels, chunk, pin=stage.cuda), chunks, prefetch)
        for u8 in _staged(stage, hosts):
            x = normalize(u8, norm, channels)
            reader.release(u8)
            if size != crop:
                x = F.interpolate(x, size=(crop, crop), mode="bilinear", antialias=True, align_corners=False)
            yield x
