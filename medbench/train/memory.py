"""Memory per device: the model behind ``--dry-run``, and the choice of ``--micro-batch auto``.

**The memory model** (:func:`memory_estimate`): parameters, gradients and SGD
momentum from the parameter count (4 bytes each in fp32/bf16-autocast; ZeRO
stage 1 partitions the optimiser state and keeps a partitioned fp32 master
copy, stage 2 partitions the gradients too), plus the activations autograd
keeps for the backward pass, *measured*: one training forward at the
micro-batch and crop size on the meta device, counting the storage of every
tensor saved for backward once (parameters excluded). No memory is allocated.
For bf16/fp16 the fp32 measurement is an upper bound (autocast keeps part of
the activations in 16 bits). Not counted: DeepSpeed's communication buckets,
the CUDA context and allocator fragmentation.

**``--micro-batch auto``** (:func:`choose_micro_batch`): the largest
micro-batch that divides the per-device batch and fits the device. The memory
model proposes the largest one whose estimate fits the device's free memory
less a margin (:data:`MARGIN`); a trial step (one forward and backward at
that micro-batch on zeros, in the run's precision and layout; BatchNorm
buffers, gradients and the random state restored afterwards) confirms it:
its measured peak plus the optimiser state must fit with the margin, and an
out-of-memory error or a miss steps down to the largest divisor at most half
as large. When the measured peak shows room the model did not see (bf16
activations), the next size the measurement predicts to fit is tried too. The
HyperRule batch is kept by gradient accumulation. The runner makes the choice
once per (task, backbone, resolution, device type, precision, ZeRO stage,
world size, freezing) and stores it in the run store; an out-of-memory error
during a run halves it (:func:`halved`) and the run resumes from its last
checkpoint (docs/performance.md, "Micro-batch").

The device is a :class:`DeviceMemory`: CUDA (free memory and the caching
allocator's peak), the CPU (available RAM; no peak measurement: the trial only
has to run), or one a test injects (tests/test_micro_batch_auto.py simulates a
device that raises ``torch.OutOfMemoryError`` above N samples).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from medbench.backbones import Backbone

#: share of the device's free memory the choice leaves unused: allocator fragmentation, DeepSpeed's buffers,
#: evaluation batches, the input path's buffers
MARGIN = 0.10


def memo_backbone(fn):
    """Cache a function of a resolved :class:`Backbone` (not hashable: it holds a dict) and plain
    arguments, keyed on the backbone's name and source."""
    cache: dict = {}

    def wrapper(bb: Backbone, *args):
        key = (bb.name, bb.source, *args)
        if key not in cache:
            cache[key] = fn(bb, *args)
        return cache[key]

    wrapper.__doc__ = fn.__doc__
    wrapper.__name__ = fn.__name__
    return wrapper




@memo_backbone
def activation_bytes(bb: Backbone, num_outputs: int, channels: int, size: int, batch: int) -> int:
    """Bytes autograd keeps for backward after one training forward of ``batch`` images of ``size``²:
    the storages of the tensors saved for backward, each counted once, parameters excluded. Measured on
    the meta device (shapes and dtypes only, nothing allocated)."""
    import torch

    with torch.device("meta"):
        model = bb.build(num_classes=num_outputs, in_chans=channels)
        x = torch.empty(batch, channels, size, size)
    model.train()
    param_storages = {p.untyped_storage()._cdata for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: "torch.Tensor") -> "torch.Tensor":
        storage = t.untyped_storage()
        if storage._cdata not in param_storages:
            saved[storage._cdata] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return sum(saved.values())


@memo_backbone
def parameter_count(bb: Backbone, num_outputs: int, channels: int) -> int:
    import torch

    with torch.device("meta"):
        model = bb.build(num_classes=num_outputs, in_chans=channels)
    return sum(p.numel() for p in model.parameters())


def memory_estimate(backbone: Backbone, num_outputs: int, channels: int, crop: int, micro_batch: int, *,
                    zero_stage: int = 0, precision: str = "fp32", world_size: int = 1) -> dict:
    """Training memory per device in bytes (see the module docstring for what is counted)."""
    n = parameter_count(backbone, num_outputs, channels)
    shard = max(world_size, 1)
    if precision == "fp16":  # fp16 weights and grads, fp32 master copy held by the optimiser wrapper
        params, grads, master = 2 * n, 2 * n, 4 * n
    else:  # fp32, or bf16 through autocast: weights and grads stay fp32
        params, grads, master = 4 * n, 4 * n, 0
    momentum = 4 * n
    if zero_stage >= 1:
        master = 4 * n // shard  # the partitioned fp32 copy DeepSpeed's ZeRO optimiser steps on
        momentum //= shard
    if zero_stage >= 2:
        grads //= shard
    activations = activation_bytes(backbone, num_outputs, channels, crop, micro_batch)
    optimizer = momentum + master
    return {"params": params, "grads": grads, "optimizer": optimizer, "activations": activations,
            "activations_upper_bound": precision != "fp32", "micro_batch": micro_batch,
            "total": params + grads + optimizer + activations}


# --------------------------------------------------------------------------- devices

class DeviceMemory(Protocol):
    """What the micro-batch choice needs to know about a device."""

    def describe(self) -> str:
        """The device type, part of the key the choice is stored under (e.g. ``cuda NVIDIA H100 80GB HBM3``)."""

    def available(self) -> int | None:
        """Bytes free for training now; None when unknown (then the memory model cannot narrow the choice)."""

    def measure(self, fn: Callable[[], None]) -> int | None:
        """Run ``fn``; the peak bytes it allocated beyond what was allocated before (None: not measurable)."""

    def attach(self, model: Any) -> None:
        """Called with the network before the choice and before training (a simulated device hooks in here)."""


class CudaMemory:
    def __init__(self, device: str):
        import torch

        self.device = torch.device(device)

    def describe(self) -> str:
        import torch

        return f"cuda {torch.cuda.get_device_name(self.device)}"

    def available(self) -> int:
        import torch

        torch.cuda.empty_cache()
        free, _total = torch.cuda.mem_get_info(self.device)
        return int(free)

    def measure(self, fn: Callable[[], None]) -> int:
        import torch

        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        base = torch.cuda.memory_allocated(self.device)
        fn()
        torch.cuda.synchronize(self.device)
        return int(torch.cuda.max_memory_allocated(self.device) - base)

    def attach(self, model: Any) -> None:
        pass


class HostMemory:
    """The CPU as a device: its available RAM; the trial step only has to run."""

    def describe(self) -> str:
        return "cpu"

    def available(self) -> int | None:
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            return None
        return None

    def measure(self, fn: Callable[[], None]) -> None:
        fn()
        return None

    def attach(self, model: Any) -> None:
        pass


def device_memory(device: str) -> DeviceMemory:
    return CudaMemory(device) if device.startswith("cuda") else HostMemory()


def is_out_of_memory(err: BaseException) -> bool:
    """An allocation failure on the device (torch's OutOfMemoryError, or an older torch's RuntimeError)."""
    import torch

    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    if oom is not None and isinstance(err, oom):
        return True
    return isinstance(err, RuntimeError) and "out of memory" in str(err).lower()


# --------------------------------------------------------------------------- the choice

def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def halved(micro: int, per_device: int) -> int | None:
    """The largest micro-batch dividing ``per_device`` that is at most half of ``micro`` (None below 1)."""
    smaller = [d for d in divisors(per_device) if d <= micro // 2]
    return smaller[-1] if smaller else None


@dataclass
class MicroBatchChoice:
    micro_batch: int
    per_device_batch: int
    device: str
    available_bytes: int | None
    #: the memory model at the chosen micro-batch (bytes per part, see :func:`memory_estimate`)
    estimate: dict
    #: every trial step: micro_batch, peak_bytes (None: not measurable), need_bytes, fits, error
    trials: list[dict] = field(default_factory=list)
    margin: float = MARGIN

    @property
    def accumulation(self) -> int:
        return self.per_device_batch // self.micro_batch

    def as_dict(self) -> dict:
        return {"micro_batch": self.micro_batch, "per_device_batch": self.per_device_batch,
                "accumulation": self.accumulation, "device": self.device, "available_bytes": self.available_bytes,
                "margin": self.margin, "estimate": self.estimate, "trials": self.trials}


def largest_fitting(backbone: Backbone, *, per_device_batch: int, num_outputs: int, channels: int, crop: int,
                    available: float, precision: str = "fp32", zero_stage: int = 0, world_size: int = 1,
                    margin: float = MARGIN) -> int | None:
    """The largest micro-batch dividing ``per_device_batch`` whose :func:`memory_estimate` fits ``available``
    bytes less the margin (None: not even 1). Binary search: the estimate grows with the micro-batch."""
    cands = divisors(per_device_batch)
    budget = available * (1.0 - margin)

    def fits(m: int) -> bool:
        return memory_estimate(backbone, num_outputs, channels, crop, m, zero_stage=zero_stage, precision=precision,
                               world_size=world_size)["total"] <= budget

    if not fits(1):
        return None
    lo, hi = 0, len(cands) - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(cands[mid]):
            lo = mid
        else:
            hi = mid - 1
    return cands[lo]


def trial_step(model: Any, micro: int, *, channels: int, crop: int, num_outputs: int, task_type: str, device: str,
               precision: str, channels_last: bool = False) -> None:
    """One training forward and backward of ``micro`` zero images, leaving the network as it was: BatchNorm
    buffers restored, gradients dropped, the random state forked (dropout and the like)."""
    import torch

    from medbench.train.finetune import task_loss

    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    was_training = model.training
    dev = torch.device(device)
    cuda = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=cuda):
            model.train()
            fmt = torch.channels_last if channels_last else torch.contiguous_format
            x = torch.zeros(micro, channels, crop, crop, device=dev).contiguous(memory_format=fmt)
            y = torch.zeros(micro, num_outputs, device=dev)
            if task_type == "multiclass":
                y[:, 0] = 1.0
            dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
            with torch.autocast(device_type=dev.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                out = model(x)
            task_loss(task_type, out, y).backward()
            del x, y, out
    finally:
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(buffers[name])
        for p in model.parameters():
            p.grad = None
        model.train(was_training)


def choose_micro_batch(model: Any, backbone: Backbone, *, per_device_batch: int, num_outputs: int, channels: int,
                       crop: int, task_type: str, device: str, precision: str, zero_stage: int = 0,
                       world_size: int = 1, memory: DeviceMemory | None = None, channels_last: bool = False,
                       margin: float = MARGIN) -> MicroBatchChoice:
    """The largest micro-batch dividing ``per_device_batch`` that fits (module docstring); moves ``model`` to
    ``device``. Raises :class:`~medbench.errors.MedbenchError` when not even one image fits."""
    from medbench.errors import MedbenchError

    memory = memory or device_memory(device)
    cands = divisors(per_device_batch)

    def estimate(m: int) -> dict:
        return memory_estimate(backbone, num_outputs, channels, crop, m, zero_stage=zero_stage,
                               precision=precision, world_size=world_size)

    available = memory.available()
    budget = None if available is None else available * (1.0 - margin)
    i = len(cands) - 1
    if available is not None:
        i = cands.index(largest_fitting(backbone, per_device_batch=per_device_batch, num_outputs=num_outputs,
                                        channels=channels, crop=crop, available=available, precision=precision,
                                        zero_stage=zero_stage, world_size=world_size, margin=margin) or 1)
    model.to(device)
    memory.attach(model)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    trials: list[dict] = []

    def attempt(m: int) -> tuple[bool, int | None]:
        est = estimate(m)
        try:
            peak = memory.measure(lambda: trial_step(model, m, channels=channels, crop=crop, num_outputs=num_outputs,
                                                     task_type=task_type, device=device, precision=precision,
                                                     channels_last=channels_last))
        except Exception as err:
            if not is_out_of_memory(err):
                raise
            del err
            _release(device)
            trials.append({"micro_batch": m, "peak_bytes": None, "need_bytes": None, "fits": False,
                           "error": "out of memory"})
            return False, None
        need = None if peak is None else param_bytes + peak + est["optimizer"]
        fits = need is None or budget is None or need <= budget
        trials.append({"micro_batch": m, "peak_bytes": peak, "need_bytes": need, "fits": fits, "error": None})
        return fits, need

    while True:
        fits, need = attempt(cands[i])
        if fits:
            break
        smaller = halved(cands[i], per_device_batch)
        if smaller is None:
            raise MedbenchError(f"not even a micro-batch of 1 fits the device ({memory.describe()}, "
                                f"{(available or 0) / 1e9:.1f} GB free): use a smaller input, a smaller backbone, "
                                "--zero-stage 2 with several devices, or --precision bf16", field="--micro-batch")
        i = cands.index(smaller)
    chosen = cands[i]
    if need is not None and budget is not None and len(trials) == 1 and i + 1 < len(cands):
        # the trial measured less than the model predicted (bf16 activations): try the size the measurement
        # predicts to fit, keeping the confirmed one if it does not
        fixed = param_bytes + estimate(chosen)["grads"] + estimate(chosen)["optimizer"]
        per_sample = max(need - fixed, 1) / chosen
        bigger = [m for m in cands[i + 1:] if fixed + per_sample * m <= budget]
        if bigger and attempt(bigger[-1])[0]:
            chosen = bigger[-1]
    return MicroBatchChoice(micro_batch=chosen, per_device_batch=per_device_batch, device=memory.describe(),
                            available_bytes=available, estimate=estimate(chosen), trials=trials, margin=margin)


def _release(device: str) -> None:
    import gc

    import torch

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
