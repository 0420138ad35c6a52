"""What data parallelism needs beyond DeepSpeed's gradient all-reduce to keep a run independent of world size.

With W processes, each rank takes its slice of the same global batch
(:class:`medbench.data.loader.TrainStream`) and DeepSpeed averages the
gradients, so the weights follow the single-process run with the same
per-device micro-batch (``--micro-batch``: one process accumulates the W
slices' micro-batches, W processes compute them side by side). Two things
are per rank and are made global here, after every optimiser step:

* **BatchNorm running statistics.** Each rank updates its buffers from its own
  micro-batches only, so the ranks' running means/variances drift apart (and
  rank 0, which evaluates, would have seen only its slice). :class:`RunningStats`
  all-gathers every rank's buffers and replays the updates as one process
  would have applied them, micro-batch after micro-batch in rank order: with
  momentum ``a`` a rank's ``k`` updates map ``m0`` to ``(1-a)^k m0 + c_r``,
  so the sequential result is ``m = (1-a)^k_r m + c_r`` over ranks in order
  (for ``momentum=None``, the cumulative average, the sums are added). The
  *batch* statistics used in each forward pass stay per micro-batch, exactly
  as in the single-process run with the same micro-batch; a different
  micro-batch changes them (that is the math, not the parallelism).
* **The logged loss** (``history.json``) is averaged over ranks (:func:`mean_over_ranks`), for all the steps
  since the last read at once.

Evaluation (validation during training, test and OOD predictions) is split
too: each rank predicts a contiguous shard of the rows (:func:`shard`) and
:func:`gather_shards` puts the shards together in row order on every rank, so
W devices share the inference and every rank sees the same validation metric.
"""

from __future__ import annotations

import torch
from torch import nn


def _tracked_batchnorms(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in module.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
            and m.running_mean is not None]


class RunningStats:
    """BatchNorm running statistics of W ranks merged as one process's (call ``begin`` before a step's
    micro-batches and ``end`` after the optimiser step, on every rank)."""

    def __init__(self, module: nn.Module, world_size: int):
        self.world_size = world_size
        self.norms = _tracked_batchnorms(module)
        self._start: list[tuple[torch.Tensor, torch.Tensor, int]] = []

    @property
    def active(self) -> bool:
        return self.world_size > 1 and bool(self.norms)

    def begin(self) -> None:
        if self.active:
            self._start = [(bn.running_mean.detach().double().clone(), bn.running_var.detach().double().clone(),
                            bn.num_batches_tracked.detach().double().clone()) for bn in self.norms]

    @torch.no_grad()
    def end(self) -> None:
        """Merge the ranks' updates of this step; on the device, without reading anything back to the host."""
        if not self.active:
            return
        import torch.distributed as dist

        device = self.norms[0].running_mean.device
        own = torch.cat([torch.cat([bn.running_mean.double(), bn.running_var.double(),
                                    bn.num_batches_tracked.double().reshape(1)]) for bn in self.norms]).to(device)
        gathered = [torch.empty_like(own) for _ in range(self.world_size)]
        dist.all_gather(gathered, own)
        offset = 0
        for bn, (m0, v0, n0) in zip(self.norms, self._start):
            c = bn.running_mean.numel()
            ranks = [(g[offset:offset + c], g[offset + c:offset + 2 * c], g[offset + 2 * c].round()) for g in gathered]
            offset += 2 * c + 1
            mean, var, n = m0, v0, n0
            for m_r, v_r, n_r in ranks:
                k = n_r - n0  # updates this rank made (0 when the layer is frozen / in eval mode)
                made = k > 0
                if bn.momentum is None:  # cumulative average: add the rank's sums
                    denom = torch.where(made, n + k, torch.ones_like(n))
                    new_mean = (mean * n + (m_r * n_r - m0 * n0)) / denom
                    new_var = (var * n + (v_r * n_r - v0 * n0)) / denom
                else:
                    decay = torch.pow(1.0 - bn.momentum, k)
                    new_mean = decay * mean + (m_r - decay * m0)
                    new_var = decay * var + (v_r - decay * v0)
                mean = torch.where(made, new_mean, mean)
                var = torch.where(made, new_var, var)
                n = torch.where(made, n + k, n)
            bn.running_mean.copy_(mean.to(bn.running_mean.dtype))
            bn.running_var.copy_(var.to(bn.running_var.dtype))
            bn.num_batches_tracked.copy_(n.to(bn.num_batches_tracked.dtype))


def shard(n: int, world_size: int, rank: int) -> slice:
    """The contiguous part of ``n`` rows that ``rank`` evaluates (the sizes of ``numpy.array_split``)."""
    size, extra = divmod(n, world_size)
    start = rank * size + min(rank, extra)
    return slice(start, start + size + (rank < extra))


def gather_shards(part, n: int, world_size: int):
    """Every rank's :func:`shard` of an ``[n, K]`` float32 array, concatenated in rank order, on every rank
    (``part`` itself in a single process). Gathered over the long-timeout gloo side group as CPU tensors."""
    import numpy as np

    if world_size == 1:
        return part
    import torch.distributed as dist

    from medbench.train.distributed import side_group

    sizes = [shard(n, world_size, r).stop - shard(n, world_size, r).start for r in range(world_size)]
    width = part.shape[1]
    padded = torch.zeros((max(sizes), width), dtype=torch.float32)
    padded[: len(part)] = torch.from_numpy(np.ascontiguousarray(part, dtype=np.float32))
    gathered = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(gathered, padded, group=side_group())
    return torch.cat([g[:k] for g, k in zip(gathered, sizes)]).numpy()


def wait_for_all(world_size: int) -> None:
    """A barrier on the long-timeout side group (nothing in a single process): the other ranks wait here
    while rank 0 writes and scores a run, instead of in the next run's first collective (minutes on NCCL)."""
    if world_size > 1:
        import torch.distributed as dist

        from medbench.train.distributed import side_group

        dist.barrier(group=side_group())


def mean_over_ranks(values: torch.Tensor, world_size: int) -> list[float]:
    """Per-rank numbers (a 1-d tensor, e.g. the losses of some steps) averaged over all ranks, as floats:
    one all-reduce and one read back to the host for all of them (the numbers themselves in a single process)."""
    if world_size == 1:
        return values.double().cpu().tolist()
    import torch.distributed as dist

    t = values.double().clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return [v / world_size for v in t.cpu().tolist()]
