"""Process-group setup for DeepSpeed: launched (deepspeed/torchrun) or a single process.

A launcher sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT and the
process group rendezvous over TCP (``env://``). A single process (no launcher,
or ``WORLD_SIZE=1``) needs no rendezvous: its process group uses an in-memory
store, so no port is opened and concurrent runs on one machine cannot collide.
On a machine without CUDA, DeepSpeed's CPU accelerator (``DS_ACCELERATOR=cpu``)
and the gloo backend are used; with CUDA, NCCL. The environment must be set
before deepspeed is imported.

Launch commands (docs/scaling.md): ``torchrun --nproc_per_node N -m medbench.cli run ...`` or
``deepspeed --num_gpus N --no_local_rank --module medbench.cli run ...`` (``--hostfile`` for several
nodes); a submitit job with several tasks sets the same variables (:mod:`medbench.run.dispatch`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from medbench.utils import usable_cores


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: str  # "cpu" | "cuda:N"
    backend: str  # "gloo" | "nccl"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def prepare_environment() -> DistInfo:
    """Set the variables DeepSpeed reads; idempotent."""
    if os.environ.get("WORLD_SIZE", "1") == "1":
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    os.environ.setdefault("LOCAL_RANK", "0")
    cuda = _cuda_available()
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    rank = int(os.environ["RANK"])
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ["LOCAL_RANK"])
    device = f"cuda:{local}" if cuda else "cpu"
    return DistInfo(rank=rank, world_size=world, local_rank=local, device=device, backend="nccl" if cuda else "gloo")


def init_process_group(info: DistInfo) -> None:
    """Initialise torch.distributed (and DeepSpeed's view of it) once per process."""
    import logging

    import torch.distributed as dist

    if info.device.startswith("cuda"):
        import torch

        torch.cuda.set_device(info.local_rank)
    if not dist.is_initialized() and info.world_size == 1:
        dist.init_process_group(backend=info.backend, store=dist.HashStore(), rank=0, world_size=1)
    import deepspeed

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    deepspeed.utils.logger.setLevel(logging.WARNING)
    if info.world_size == 1 and info.device == "cpu":
        _without_shm_comm_op()
    deepspeed.init_distributed(dist_backend=info.backend, verbose=False)  # wraps an existing group
    if info.world_size > 1:
        side_group()  # on every rank at its first initialisation, so the collective creation lines up


def _without_shm_comm_op() -> None:
    """A single CPU process does not build DeepSpeed's shared-memory all-reduce op. The CPU accelerator compiles
    it (a C++ build with the system compiler: about a minute of CPU, on the first run on a machine) whenever its
    communication backend starts, yet it serves only collectives between ranks (in one process DeepSpeed's
    ``inference_all_reduce`` returns the tensor as it is, and medbench skips the gradient all-reduce), so it is
    marked unavailable here, as DeepSpeed marks an op it cannot build. Launched ranks build and use it."""
    import deepspeed.ops

    compatible = getattr(deepspeed.ops, "__compatible_ops__", None)
    if isinstance(compatible, dict):
        compatible["deepspeed_shm_comm"] = False


#: hours a rank waits in :func:`side_group` collectives: the other ranks may be decoding a whole dataset into
#: the preprocessing cache, or rank 0 scoring a run with bootstrap intervals
SIDE_GROUP_TIMEOUT_HOURS = 24
_side_group = None


def side_group():
    """A gloo group over all ranks with a long timeout, beside the training group (NCCL on GPUs, whose
    collectives time out after minutes): for waiting on one rank's long work and for gathering evaluation
    outputs as CPU tensors. Created once per process, collectively (by :func:`init_process_group`)."""
    global _side_group
    if _side_group is None:
        from datetime import timedelta

        import torch.distributed as dist

        _side_group = dist.new_group(backend="gloo", timeout=timedelta(hours=SIDE_GROUP_TIMEOUT_HOURS))
    return _side_group


def cores_per_rank() -> int:
    """CPU cores this process may use: the cores it is allowed to run on (CPU affinity: taskset, cgroups) shared
    with the other ranks of its node (LOCAL_WORLD_SIZE from torchrun and medbench's SLURM jobs, LOCAL_SIZE from
    the deepspeed launcher); under SLURM at most ``SLURM_CPUS_PER_TASK``. Sets torch's threads (``--threads``
    overrides) and the input path's workers, so launched ranks do not each start a thread per core of the node."""
    allowed = usable_cores()
    per_task = os.environ.get("SLURM_CPUS_PER_TASK")
    if per_task and per_task.isdigit():
        return max(1, min(allowed, int(per_task)))
    local = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)
    return max(1, allowed // max(1, local))


def describe_device(info: DistInfo) -> dict:
    """What ran the job, for provenance."""
    import platform

    import torch

    out = {"device": info.device.split(":")[0], "world_size": info.world_size, "torch_threads": torch.get_num_threads()}
    if info.device.startswith("cuda"):
        out["gpu"] = torch.cuda.get_device_name(info.local_rank)
        out["gpu_count"] = torch.cuda.device_count()
    else:
        out["cpu"] = _cpu_name() or platform.processor() or platform.machine()
        out["cpu_count"] = os.cpu_count()
    return out


def _cpu_name() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None
