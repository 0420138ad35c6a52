"""Fine-tuning one network under DeepSpeed (default) or, only when asked, a plain PyTorch loop.

The loop is BiT-HyperRule's: SGD with momentum, the lr set per step by the
plan, MixUp by the plan, optional adaptive gradient clipping, a fixed number
of steps, no early stopping. ``engine="torch"`` is an explicit option for
comparison and debugging, never a fallback.

DeepSpeed settings made explicit (their defaults would change the maths):
``gradient_clipping: 0`` (DeepSpeed's default is 1.0), ZeRO stage 0 by
default (stages 1/2 need ``zero_allow_untested_optimizer`` for SGD), bf16 via
``torch_autocast`` (BatchNorm buffers stay fp32). With these, fp32 DeepSpeed
steps equal the plain loop's bit for bit.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medbench.errors import MedbenchError
from medbench.train.distributed import DistInfo
from medbench.train.hyperrule import TrainPlan

EngineName = Literal["deepspeed", "torch"]
Precision = Literal["fp32", "bf16", "fp16"]


@dataclass(frozen=True)
class EngineConfig:
    engine: EngineName = "deepspeed"
    zero_stage: int = 0
    precision: Precision = "fp32"
    #: per-device micro-batch; the HyperRule batch is reached by gradient accumulation
    micro_batch_size: int | None = None


@dataclass
class History:
    step: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    #: validation headline metric during training (convergence axis)
    val_step: list[int] = field(default_factory=list)
    val_metric: list[float | None] = field(default_factory=list)
    seconds: float = 0.0
    data_wait_seconds: float = 0.0

    def as_dict(self) -> dict:
        return {
            "step": self.step,
            "loss": self.loss,
            "lr": self.lr,
            "val_step": self.val_step,
            "val_metric": self.val_metric,
            "seconds": self.seconds,
            "data_wait_seconds": self.data_wait_seconds,
        }


def task_loss(task_type: str, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Loss for a batch; NaN targets (missing / U-Ignore) are masked out."""
    if task_type == "multiclass":
        return -(target * F.log_softmax(logits.float(), dim=1)).sum(1).mean()
    mask = ~torch.isnan(target)
    per = F.binary_cross_entropy_with_logits(logits.float(), torch.nan_to_num(target), reduction="none")
    return (per * mask).sum() / mask.sum().clamp(min=1)


def mixup(x: torch.Tensor, y: torch.Tensor, alpha: float, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """BiT's MixUp: one lambda per batch, pairs by a random permutation; a missing label stays missing."""
    lam = float(rng.beta(alpha, alpha))
    perm = torch.from_numpy(rng.permutation(x.shape[0]))
    x = lam * x + (1 - lam) * x[perm]
    y = lam * y + (1 - lam) * y[perm]  # NaN + anything = NaN: missing stays missing
    return x, y


def _agc(model: nn.Module, clip: float) -> None:
    from timm.utils.agc import adaptive_clip_grad

    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    head_ids = {id(p) for p in head.parameters()} if isinstance(head, nn.Module) else set()
    params = [p for p in model.parameters() if p.grad is not None and id(p) not in head_ids]
    adaptive_clip_grad(params, clip_factor=clip)


class _TorchEngine:
    """The plain PyTorch loop (explicit option only)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, gas: int, device: str):
        self.module = model.to(device)
        self.optimizer = optimizer
        self.gas = gas
        self._micro = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.gas).backward()

    def is_gradient_accumulation_boundary(self) -> bool:
        return (self._micro + 1) % self.gas == 0

    def step(self) -> None:
        if self.is_gradient_accumulation_boundary():
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self._micro += 1

    def train(self) -> None:
        self.module.train()

    def eval(self) -> None:
        self.module.eval()


def _deepspeed_config(plan: TrainPlan, cfg: EngineConfig, dist: DistInfo, micro: int, gas: int) -> dict:
    ds: dict = {
        "train_batch_size": plan.batch_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": gas,
        "gradient_clipping": 0.0,
        "zero_optimization": {"stage": cfg.zero_stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**12,
        "wall_clock_breakdown": False,
    }
    if cfg.precision == "bf16":
        ds["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    elif cfg.precision == "fp16":
        if not dist.device.startswith("cuda"):
            raise MedbenchError("fp16 needs a CUDA device; use --precision bf16 or fp32 on CPU", field="--precision")
        ds["fp16"] = {"enabled": True, "initial_scale_power": 16}
    return ds


def micro_batching(plan: TrainPlan, cfg: EngineConfig, dist: DistInfo) -> tuple[int, int]:
    """(micro-batch per device, gradient-accumulation steps) giving the plan's global batch."""
    if plan.batch_size % dist.world_size:
        raise MedbenchError(f"batch size {plan.batch_size} is not divisible by the world size {dist.world_size}",
                            field="hyperrule.batch_size")
    per_rank = plan.batch_size // dist.world_size
    micro = min(cfg.micro_batch_size or per_rank, per_rank)
    if per_rank % micro:
        raise MedbenchError(f"micro-batch {micro} does not divide the per-device batch {per_rank}",
                            field="--micro-batch")
    return micro, per_rank // micro


class Finetuner:
    """Wraps a network in the chosen engine and runs the plan's steps."""

    def __init__(self, model: nn.Module, plan: TrainPlan, task_type: str, engine_cfg: EngineConfig, dist: DistInfo,
                 seed: int):
        self.plan = plan
        self.task_type = task_type
        self.cfg = engine_cfg
        self.dist = dist
        self.seed = seed
        self.micro, self.gas = micro_batching(plan, engine_cfg, dist)
        if plan.agc_clip is not None and engine_cfg.zero_stage > 0:
            raise MedbenchError("adaptive gradient clipping (agc_clip) needs ZeRO stage 0", field="--zero-stage")
        trainable = [p for p in model.parameters() if p.requires_grad]  # frozen ones (--freeze) stay out
        if not trainable:
            raise MedbenchError("every parameter is frozen; nothing to train", field="--freeze")
        optimizer = torch.optim.SGD(trainable, lr=plan.lr, momentum=plan.momentum,
                                    weight_decay=plan.weight_decay)
        if engine_cfg.engine == "deepspeed":
            from medbench.train.distributed import init_process_group

            init_process_group(dist)
            import deepspeed

            engine, opt, _, _ = deepspeed.initialize(
                model=model, optimizer=optimizer,
                config=_deepspeed_config(plan, engine_cfg, dist, self.micro, self.gas),
            )
            self.engine = engine
            self.optimizer = opt
        elif engine_cfg.engine == "torch":
            if dist.world_size > 1:
                raise MedbenchError("the plain PyTorch engine runs a single process; use --engine deepspeed",
                                    field="--engine")
            self.engine = _TorchEngine(model, optimizer, self.gas, dist.device)
            self.optimizer = optimizer
        else:
            raise MedbenchError(f"unknown engine {engine_cfg.engine!r}; expected deepspeed or torch", field="--engine")

    @property
    def module(self) -> nn.Module:
        return self.engine.module

    def _set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def fit(
        self,
        batches: Iterable[tuple[int, torch.Tensor, torch.Tensor]],
        *,
        history: History | None = None,
        evaluate: Callable[[], float | None] | None = None,
        eval_every: int | None = None,
        on_step: Callable[[int, float], None] | None = None,
        after_step: Callable[[int], None] | None = None,
    ) -> History:
        """Run the steps ``batches`` yields; ``after_step(step)`` runs after each optimiser step
        (checkpoints); ``evaluate`` every ``eval_every`` steps and at the end."""
        history = history or History()
        device = self.dist.device
        self.engine.train()
        t0 = time.perf_counter()
        wait = 0.0
        t_wait = time.perf_counter()
        last_step = None
        for step, x, y in batches:
            wait += time.perf_counter() - t_wait
            lr = self.plan.lr_at(step)
            self._set_lr(lr)
            if self.plan.mixup_alpha > 0:
                x, y = mixup(x, y, self.plan.mixup_alpha, np.random.default_rng([self.seed, 3, step, self.dist.rank]))
            x = x.to(device, non_blocking=True)
            y = y.to(device, non_blocking=True)
            total = 0.0
            for xm, ym in zip(x.split(self.micro), y.split(self.micro)):
                loss = task_loss(self.task_type, self.engine.forward(xm), ym)
                if not math.isfinite(loss.item()):
                    raise MedbenchError(f"training diverged at step {step}: loss is {loss.item()}",
                                        field="hyperrule.base_lr")
                self.engine.backward(loss)
                if self.plan.agc_clip is not None and self.engine.is_gradient_accumulation_boundary():
                    _agc(self.module, self.plan.agc_clip)
                self.engine.step()
                total += loss.item() / self.gas
            history.step.append(step)
            history.loss.append(total)
            history.lr.append(lr)
            if on_step:
                on_step(step, total)
            last_step = step
            if evaluate is not None and eval_every and (step + 1) % eval_every == 0 and step + 1 < self.plan.total_steps:
                self._record_eval(history, step + 1, evaluate)
            if after_step:
                after_step(step)
            t_wait = time.perf_counter()
        if evaluate is not None and last_step is not None:
            self._record_eval(history, last_step + 1, evaluate)
        history.seconds += time.perf_counter() - t0
        history.data_wait_seconds += wait
        return history

    def _record_eval(self, history: History, step: int, evaluate: Callable[[], float | None]) -> None:
        self.engine.eval()
        with torch.no_grad():
            value = evaluate()
        self.engine.train()
        history.val_step.append(step)
        history.val_metric.append(value)


@torch.no_grad()
def predict_logits(model: nn.Module, inputs: Iterable[torch.Tensor], device: str,
                   precision: Precision = "fp32") -> np.ndarray:
    """Logits for every input batch, in order, as float32 ``[N, K]``."""
    was_training = model.training
    model.eval()
    outs = []
    use_autocast = precision == "bf16"
    for x in inputs:
        x = x.to(device, non_blocking=True)
        with torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16, enabled=use_autocast):
            out = model(x)
        outs.append(out.float().cpu())
    model.train(was_training)
    if not outs:
        return np.zeros((0, 0), dtype=np.float32)
    return torch.cat(outs).numpy()


def logits_to_probs(task_type: str, logits: np.ndarray) -> np.ndarray:
    t = torch.from_numpy(logits)
    return (torch.softmax(t, dim=1) if task_type == "multiclass" else torch.sigmoid(t)).numpy()
