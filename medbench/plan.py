"""``--dry-run``: what a run would do and roughly cost, without needing the data.

For each task: where its dataset is expected and whether it is there (with how
to get it), the training-set size (counted when the label files are present,
else the task's ``expected_train_size``), the HyperRule schedule that size
implies, the input resolution, and a compute estimate: training FLOPs =
steps x batch x 3 x forward FLOPs per image (counted by torch's FLOP counter
on the meta device, so no memory is used), plus evaluation. Time is that
divided by an assumed sustained rate (``--assume-tflops``; default 100, a
fair figure for one A100 in bf16 on convolutional nets).

Memory per device (:func:`memory_estimate`): parameters, gradients and SGD
momentum from the parameter count (4 bytes each in fp32/bf16-autocast; ZeRO
stage 1 partitions the optimiser state and keeps a partitioned fp32 master
copy, stage 2 partitions the gradients too), plus the activations autograd
keeps for the backward pass, *measured*: one training forward at the
micro-batch and crop size on the meta device, counting the storage of every
tensor saved for backward once (parameters excluded). No memory is allocated.
For bf16/fp16 the fp32 measurement is shown as an upper bound (autocast keeps
part of the activations in 16 bits). Not counted: DeepSpeed's communication
buckets, the CUDA context (~0.5-1 GB) and allocator fragmentation.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache

from medbench.catalog import Catalog
from medbench.data.base import get_adapter
from medbench.data.locate import DataLocations
from medbench.errors import MedbenchError
from medbench.specs import ResolvedTask
from medbench.train.hyperrule import make_plan, rule_resolution


@dataclass
class TaskPlan:
    task: str
    dataset: str
    data_status: str  # "found" | "missing" | "embedded"
    data_path: str | None
    how_to_get: str | None
    n_train: int | None
    n_train_source: str  # "counted" | "expected" | "unknown"
    steps: int | None
    batch_size: int
    resize: int | None
    crop: int | None
    seeds: int
    gflops_per_image: float | None
    train_pflops_per_run: float | None
    hours_per_run: float | None
    #: bytes per device: params, grads, optimizer, activations, total (see memory_estimate)
    memory: dict | None = None

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@lru_cache(maxsize=64)
def forward_gflops(backbone: str, num_outputs: int, channels: int, size: int) -> float:
    """Forward GFLOPs (2 per multiply-add) of one image, counted on the meta device."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from medbench.backbones.registry import get_backbone

    bb = get_backbone(backbone)
    with torch.device("meta"):
        model = bb.build(num_classes=num_outputs, in_chans=channels)
        x = torch.empty(1, channels, size, size)
        with FlopCounterMode(display=False) as counter:
            model(x)
    return counter.get_total_flops() / 1e9


@lru_cache(maxsize=64)
def activation_bytes(backbone: str, num_outputs: int, channels: int, size: int, batch: int) -> int:
    """Bytes autograd keeps for backward after one training forward of ``batch`` images of ``size``²:
    the storages of the tensors saved for backward, each counted once, parameters excluded. Measured on
    the meta device (shapes and dtypes only, nothing allocated)."""
    import torch

    from medbench.backbones.registry import get_backbone

    bb = get_backbone(backbone)
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


@lru_cache(maxsize=64)
def parameter_count(backbone: str, num_outputs: int, channels: int) -> int:
    import torch

    from medbench.backbones.registry import get_backbone

    with torch.device("meta"):
        model = get_backbone(backbone).build(num_classes=num_outputs, in_chans=channels)
    return sum(p.numel() for p in model.parameters())


def memory_estimate(backbone: str, num_outputs: int, channels: int, crop: int, micro_batch: int, *,
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


def _count_train(task: ResolvedTask, locations: DataLocations) -> int | None:
    from medbench.data.task_data import load_task_data

    data = load_task_data(task, locations)
    return int((data.index.table["split"] == "train").sum())


def plan_task(task: ResolvedTask, backbone: str, seeds: int, locations: DataLocations, *,
              max_steps: int | None, assume_tflops: float, engine: dict | None = None) -> TaskPlan:
    spec = task.spec
    adapter = get_adapter(spec.dataset.adapter, where=str(task.path))
    needs_root = getattr(adapter, "needs_root", True)
    path, _ = locations.resolve(spec.dataset.name) if needs_root else (None, "")
    if not needs_root:
        status = "embedded"
    elif path is not None and path.is_dir():
        status = "found"
    else:
        status = "missing"
    n_train, source = None, "unknown"
    if status in ("found", "embedded"):
        try:
            n_train, source = _count_train(task, locations), "counted"
        except MedbenchError:
            status = "incomplete" if status == "found" else status
    if n_train is None and spec.expected_train_size:
        n_train, source = spec.expected_train_size, "expected"
    steps = make_plan(n_train, spec.hyperrule, max_steps=max_steps).total_steps if n_train else None
    resize, crop = spec.input.resize, spec.input.crop
    if crop is None:  # the rule by native size; chest X-rays and the like are large images
        resize, crop = resize or rule_resolution(1024, 1024)[0], rule_resolution(1024, 1024)[1]
    gflops = forward_gflops(backbone, spec.num_outputs, spec.input.channels, crop)
    pflops = hours = None
    if steps:
        pflops = steps * spec.hyperrule.batch_size * 3 * gflops / 1e6
        hours = pflops * 1e15 / (assume_tflops * 1e12) / 3600
    engine = engine or {}
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    per_device = max(1, spec.hyperrule.batch_size // world)
    micro = min(engine.get("micro_batch") or per_device, per_device)
    memory = memory_estimate(backbone, spec.num_outputs, spec.input.channels, crop, micro,
                             zero_stage=engine.get("zero_stage", 0), precision=engine.get("precision", "fp32"),
                             world_size=world)
    return TaskPlan(task=task.name, dataset=spec.dataset.name, data_status=status,
                    data_path=str(path) if path else None,
                    how_to_get=adapter.how_to_get if status in ("missing", "incomplete") else None,
                    n_train=n_train, n_train_source=source, steps=steps, batch_size=spec.hyperrule.batch_size,
                    resize=resize, crop=crop, seeds=seeds, gflops_per_image=gflops, train_pflops_per_run=pflops,
                    hours_per_run=hours, memory=memory)


def plan_runs(catalog: Catalog, tasks: list[str], backbone: str, seeds: int | None, locations: DataLocations, *,
              max_steps: int | None = None, assume_tflops: float = 100.0, engine: dict | None = None) -> list[TaskPlan]:
    from medbench.backbones.registry import get_backbone

    get_backbone(backbone)  # unknown names fail before any planning
    out = []
    for name in tasks:
        task = catalog.task(name)
        out.append(plan_task(task, backbone, seeds or task.spec.default_seeds, locations, max_steps=max_steps,
                             assume_tflops=assume_tflops, engine=engine))
    return out
