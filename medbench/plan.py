"""``--dry-run``: what a run would do and roughly cost, without needing the data.

For each task: where its dataset is expected and whether it is there (with how
to get it), the training-set size (counted when the label files are present,
else the task's ``expected_train_size``), the HyperRule schedule that size
implies, the input resolution, and a compute estimate: training FLOPs =
steps x batch x 3 x forward FLOPs per image (counted by torch's FLOP counter
on the meta device, so no memory is used), plus evaluation. Time is that
divided by an assumed sustained rate (``--assume-tflops``; default 100, a
fair figure for one A100 in bf16 on convolutional nets).
"""

from __future__ import annotations

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


def _count_train(task: ResolvedTask, locations: DataLocations) -> int | None:
    from medbench.data.task_data import load_task_data

    data = load_task_data(task, locations)
    return int((data.index.table["split"] == "train").sum())


def plan_task(task: ResolvedTask, backbone: str, seeds: int, locations: DataLocations, *,
              max_steps: int | None, assume_tflops: float) -> TaskPlan:
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
    return TaskPlan(task=task.name, dataset=spec.dataset.name, data_status=status,
                    data_path=str(path) if path else None,
                    how_to_get=adapter.how_to_get if status in ("missing", "incomplete") else None,
                    n_train=n_train, n_train_source=source, steps=steps, batch_size=spec.hyperrule.batch_size,
                    resize=resize, crop=crop, seeds=seeds, gflops_per_image=gflops, train_pflops_per_run=pflops,
                    hours_per_run=hours)


def plan_runs(catalog: Catalog, tasks: list[str], backbone: str, seeds: int | None, locations: DataLocations, *,
              max_steps: int | None = None, assume_tflops: float = 100.0) -> list[TaskPlan]:
    from medbench.backbones.registry import get_backbone

    get_backbone(backbone)  # unknown names fail before any planning
    out = []
    for name in tasks:
        task = catalog.task(name)
        out.append(plan_task(task, backbone, seeds or task.spec.default_seeds, locations, max_steps=max_steps,
                             assume_tflops=assume_tflops))
    return out
