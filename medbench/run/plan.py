"""``--dry-run``: what a run would do and roughly cost, without needing the data.

For each task: where its dataset is expected and whether it is there (with how
to get it), the same for the datasets of its OOD targets (a target without
data is skipped and recorded at run time, not an error), the training-set
size (counted when the label files are present, else the task's
``expected_train_size``), the HyperRule schedule that size implies, the input
resolution, and a compute estimate per run:

* training FLOPs = steps x batch x 3 x forward FLOPs per image (counted by
  torch's FLOP counter on the meta device, so no memory is used);
* evaluation FLOPs = forward FLOPs per image x the images evaluated: the
  validation split at every evaluation during training (every
  ``total_steps // 10`` steps and at the end, as the runner does), then the
  validation and test splits once for the saved predictions, then the test
  split of every OOD target whose data is there. Counted when the split sizes
  are (the task's data is present); otherwise unknown and left out of the
  time, which says so.

Time is their sum divided by an assumed sustained rate (``--assume-tflops``;
default 100, a fair figure for one A100 in bf16 on convolutional nets).

Memory per device (:func:`medbench.train.memory.memory_estimate`, the model
``--micro-batch auto`` starts from): parameters, gradients, optimiser state by
ZeRO stage, and the activations measured on the meta device at the micro-batch
and crop size (an fp32 upper bound for bf16/fp16). Shown at the requested
micro-batch (default: the whole per-device batch) and, for ``--micro-batch
auto``, the micro-batch the model chooses for a device with ``--assume-memory``
GB free (default 80: one A100/H100; on a machine with a GPU, its free memory).
The run itself confirms the choice by a trial step (medbench.train.memory).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from medbench.backbones import Backbone
from medbench.data.base import get_adapter
from medbench.data.locate import DataLocations
from medbench.errors import MedbenchError
from medbench.spec import ResolvedTask
from medbench.spec.catalog import Catalog
from medbench.train.hyperrule import TrainPlan, make_plan, rule_resolution
from medbench.train.memory import (  # the memory model lives with training (--micro-batch auto uses it)
    largest_fitting,
    memo_backbone,
    memory_estimate,
)


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
    #: training plus evaluation when the evaluation is known, else training only
    hours_per_run: float | None
    #: bytes per device: params, grads, optimizer, activations, total (see memory_estimate)
    memory: dict | None = None
    #: counted split sizes (None when the data is absent)
    n_val: int | None = None
    n_test: int | None = None
    #: validation passes during training (the runner's ``eval_every`` rule)
    val_evaluations: int | None = None
    #: images evaluated per run (val during training, val + test predictions, OOD tests); None: unknown
    eval_images: int | None = None
    eval_pflops_per_run: float | None = None
    #: one per OOD target: name, task, dataset, data_status, data_path, how_to_get, n_test
    ood: list[dict] | None = None
    #: the learning rate the run trains at: base_lr x batch_size / 512 (None when the size is unknown)
    lr: float | None = None

    @property
    def pflops_per_run(self) -> float | None:
        """Training plus evaluation (training only when the evaluation is unknown)."""
        if self.train_pflops_per_run is None:
            return None
        return self.train_pflops_per_run + (self.eval_pflops_per_run or 0.0)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@memo_backbone
def forward_gflops(bb: Backbone, num_outputs: int, channels: int, size: int) -> float:
    """Forward GFLOPs (2 per multiply-add) of one image, counted on the meta device."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = bb.build(num_classes=num_outputs, in_chans=channels)
        x = torch.empty(1, channels, size, size)
        with FlopCounterMode(display=False) as counter:
            model(x)
    return counter.get_total_flops() / 1e9


def _count_splits(task: ResolvedTask, locations: DataLocations) -> dict[str, int]:
    from medbench.data.task_data import load_task_data

    split = load_task_data(task, locations).index.table["split"]
    return {name: int((split == name).sum()) for name in ("train", "val", "test")}


def _locate(task: ResolvedTask, locations: DataLocations):
    """(status, folder, adapter, split sizes): status ``found`` / ``missing`` / ``incomplete`` (the folder is there
    but the label files do not load) / ``embedded`` (no folder needed); sizes when they could be counted."""
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
    counts = None
    if status in ("found", "embedded"):
        try:
            counts = _count_splits(task, locations)
        except MedbenchError:
            status = "incomplete" if status == "found" else status
    return status, path, adapter, counts


def validation_passes(plan: TrainPlan) -> int:
    """Validation evaluations of a run: every ``plan.eval_every`` steps before the end, and one after the
    last step (``Finetuner.fit``), whose predictions are also the run's saved validation predictions."""
    return (plan.total_steps - 1) // plan.eval_every + 1


def _ood_plans(task: ResolvedTask, catalog: Catalog | None, locations: DataLocations, located: dict) -> list[dict]:
    out = []
    for target in task.spec.ood:
        if catalog is None:
            break
        tgt = catalog.task(target.task)  # an unknown target fails here, as in the run's preflight
        if tgt.name not in located:
            located[tgt.name] = _locate(tgt, locations)
        status, path, adapter, counts = located[tgt.name]
        out.append({"name": target.display_name, "task": tgt.name, "dataset": tgt.spec.dataset.name,
                    "data_status": status, "data_path": str(path) if path else None,
                    "how_to_get": adapter.how_to_get if status in ("missing", "incomplete") else None,
                    "n_test": counts["test"] if counts else None})
    return out


def plan_task(task: ResolvedTask, backbone: Backbone, seeds: int, locations: DataLocations, *,
              max_steps: int | None, assume_tflops: float, engine: dict | None = None,
              catalog: Catalog | None = None, located: dict | None = None) -> TaskPlan:
    """The plan of one task; ``catalog`` resolves its OOD targets (without one they are not planned);
    ``located``: task name -> :func:`_locate` result, shared between the tasks of one plan (a dataset's
    label files are read once)."""
    spec = task.spec
    located = {} if located is None else located
    if task.name not in located:
        located[task.name] = _locate(task, locations)
    status, path, adapter, counts = located[task.name]
    n_train, source = None, "unknown"
    if counts is not None:
        n_train, source = counts["train"], "counted"
    if n_train is None and spec.expected_train_size:
        n_train, source = spec.expected_train_size, "expected"
    train_plan = make_plan(n_train, spec.hyperrule, max_steps=max_steps) if n_train else None
    steps = train_plan.total_steps if train_plan else None
    resize, crop = spec.input.resize, spec.input.crop
    if crop is None:  # the rule by native size; chest X-rays and the like are large images
        resize, crop = resize or rule_resolution(1024, 1024)[0], rule_resolution(1024, 1024)[1]
    gflops = forward_gflops(backbone, spec.num_outputs, spec.input.channels, crop)
    ood = _ood_plans(task, catalog, locations, located)
    pflops = hours = eval_pflops = eval_images = val_passes = None
    if steps:
        pflops = steps * spec.hyperrule.batch_size * 3 * gflops / 1e6
        val_passes = validation_passes(train_plan)
        if counts is not None:  # absent OOD data is skipped at run time: nothing evaluated
            eval_images = (counts["val"] * val_passes + counts["test"]
                           + sum(o["n_test"] or 0 for o in ood if o["data_status"] in ("found", "embedded")))
            eval_pflops = eval_images * gflops / 1e6
        hours = (pflops + (eval_pflops or 0.0)) * 1e15 / (assume_tflops * 1e12) / 3600
    engine = engine or {}
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    per_device = max(1, spec.hyperrule.batch_size // world)
    precision, zero_stage = engine.get("precision") or "fp32", engine.get("zero_stage", 0)
    assumed = engine.get("assume_memory_gb", 80.0) * 1e9
    auto = largest_fitting(backbone, per_device_batch=per_device, num_outputs=spec.num_outputs,
                           channels=spec.input.channels, crop=crop, available=assumed, precision=precision,
                           zero_stage=zero_stage, world_size=world)
    requested = engine.get("micro_batch")
    micro = (auto or 1) if requested == "auto" else min(requested or per_device, per_device)
    memory = memory_estimate(backbone, spec.num_outputs, spec.input.channels, crop, micro,
                             zero_stage=zero_stage, precision=precision, world_size=world)
    # what --micro-batch auto starts from on a device with that much free memory (None: not even 1 image fits)
    memory.update(auto_micro_batch=auto, per_device_batch=per_device, assumed_free_bytes=assumed)
    return TaskPlan(task=task.name, dataset=spec.dataset.name, data_status=status,
                    data_path=str(path) if path else None,
                    how_to_get=adapter.how_to_get if status in ("missing", "incomplete") else None,
                    n_train=n_train, n_train_source=source, steps=steps, batch_size=spec.hyperrule.batch_size,
                    resize=resize, crop=crop, seeds=seeds, gflops_per_image=gflops, train_pflops_per_run=pflops,
                    hours_per_run=hours, memory=memory, n_val=counts["val"] if counts else None,
                    n_test=counts["test"] if counts else None, val_evaluations=val_passes, eval_images=eval_images,
                    eval_pflops_per_run=eval_pflops, ood=ood, lr=train_plan.lr if train_plan else None)


def matmul_tflops(size: int = 2048, repeats: int = 3) -> float:
    """This machine's float32 matrix-multiply rate on CPU in TFLOP/s (best of ``repeats``, torch's current
    thread count): the ceiling a CPU run approaches. docs/performance.md measures training at a third to a
    half of it."""
    import time

    import torch

    a = torch.randn(size, size)
    b = torch.randn(size, size)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best / 1e12


def gpu_visible() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def plan_runs(catalog: Catalog, tasks: list[str], backbone: Backbone, seeds: int | None, locations: DataLocations,
              *, max_steps: int | None = None, assume_tflops: float = 100.0, engine: dict | None = None
              ) -> list[TaskPlan]:
    """The plan of every task for the resolved ``backbone`` (the command line resolves its name once)."""
    out = []
    located: dict = {}
    for name in tasks:
        task = catalog.task(name)
        out.append(plan_task(task, backbone, seeds or task.spec.default_seeds, locations, max_steps=max_steps,
                             assume_tflops=assume_tflops, engine=engine, catalog=catalog, located=located))
    return out
