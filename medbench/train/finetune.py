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
    #: stage 0 by default, chosen by benchmarks/test_train_step_bench.py (docs/performance.md): in one
    #: process stages 1 and 2 only add copies of flat fp32 weights and gradients per step; they pay off
    #: when the optimizer state must be partitioned over several devices
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

    @classmethod
    def from_dict(cls, d: dict) -> "History":
        """The inverse of :meth:`as_dict` (a resumed run continues its history)."""
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


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


def check_engine(plan: TrainPlan, cfg: EngineConfig, dist: DistInfo) -> tuple[int, int]:
    """Refuse engine settings that cannot run this plan (before any run starts); (micro-batch, accumulation)."""
    micro, gas = micro_batching(plan, cfg, dist)
    if plan.agc_clip is not None and cfg.zero_stage > 0:
        raise MedbenchError("adaptive gradient clipping (agc_clip) needs ZeRO stage 0", field="--zero-stage")
    if cfg.precision == "fp16" and not dist.device.startswith("cuda"):
        raise MedbenchError("fp16 needs a CUDA device; use --precision bf16 or fp32 on CPU", field="--precision")
    if cfg.engine == "torch" and dist.world_size > 1:
        raise MedbenchError("the plain PyTorch engine runs a single process; use --engine deepspeed", field="--engine")
    return micro, gas


class Finetuner:
    """Wraps a network in the chosen engine and runs the plan's steps."""

    def __init__(self, model: nn.Module, plan: TrainPlan, task_type: str, engine_cfg: EngineConfig, dist: DistInfo,
                 seed: int):
        self.plan = plan
        self.task_type = task_type
        self.cfg = engine_cfg
        self.dist = dist
        self.seed = seed
        self.micro, self.gas = check_engine(plan, engine_cfg, dist)
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
            if dist.world_size == 1 and engine_cfg.zero_stage == 0:
                # one process: DeepSpeed would still flatten every gradient, all-reduce it with itself, scale
                # it by 1/1 and copy it back each step; skipping that changes no bit (docs/performance.md)
                engine.enable_backward_allreduce = False
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
        premixed: bool = False,
    ) -> History:
        """Run the steps ``batches`` yields; ``after_step(step)`` runs after each optimiser step
        (checkpoints); ``evaluate`` every ``eval_every`` steps and at the end. ``premixed``: the batches
        already carry the plan's MixUp (``TrainStream(mixup_alpha=...)``, the same for any world size)."""
        from medbench.train.data_parallel import RunningStats, mean_over_ranks

        history = history or History()
        device = self.dist.device
        running_stats = RunningStats(self.module, self.dist.world_size)  # BatchNorm buffers as one process's
        self.engine.train()
        t0 = time.perf_counter()
        wait = 0.0
        t_wait = time.perf_counter()
        for step, x, y in batches:
            wait += time.perf_counter() - t_wait
            lr = self.plan.lr_at(step)
            self._set_lr(lr)
            if self.plan.mixup_alpha > 0 and not premixed:
                x, y = mixup(x, y, self.plan.mixup_alpha, np.random.default_rng([self.seed, 3, step, self.dist.rank]))
            x = x.to(device, non_blocking=True)
            y = y.to(device, non_blocking=True)
            total = 0.0
            running_stats.begin()
            for xm, ym in zip(x.split(self.micro), y.split(self.micro)):
                loss = task_loss(self.task_type, self.engine.forward(xm), ym)
                if not math.isfinite(loss.item()):
                    if step == 0:  # before any update: the learning rate cannot be the cause
                        raise MedbenchError(f"loss is {loss.item()} at step 0, before any update: the initial "
                                            "network or the images give non-finite outputs; check the weights "
                                            "(--weights / --init) and the input", field="--init")
                    raise MedbenchError(f"training diverged at step {step}: loss is {loss.item()}",
                                        field="hyperrule.base_lr")
                self.engine.backward(loss)
                if self.plan.agc_clip is not None and self.engine.is_gradient_accumulation_boundary():
                    _agc(self.module, self.plan.agc_clip)
                self.engine.step()
                total += loss.item() / self.gas
            running_stats.end()
            total = mean_over_ranks(total, self.dist.world_size, device)
            history.step.append(step)
            history.loss.append(total)
            history.lr.append(lr)
            if on_step:
                on_step(step, total)
            if evaluate is not None and eval_every and (step + 1) % eval_every == 0 and step + 1 < self.plan.total_steps:
                self._record_eval(history, step + 1, evaluate)
            if after_step:
                after_step(step)
            t_wait = time.perf_counter()
        done = history.step[-1] + 1 if history.step else None
        if evaluate is not None and done is not None and (not history.val_step or history.val_step[-1] != done):
            self._record_eval(history, done, evaluate)  # the final evaluation (also when resumed at the end)
        history.seconds += time.perf_counter() - t0
        history.data_wait_seconds += wait
        return history

    # ------------------------------------------------------------------ checkpoints
    @property
    def supports_checkpoints(self) -> bool:
        """fp16 (CUDA) keeps a dynamic loss scale and fp32 master copies inside DeepSpeed's optimiser
        wrapper; medbench does not save those, so fp16 runs restart from step 0 when interrupted."""
        return self.cfg.precision != "fp16"

    def _zero_optimizer(self):
        return self.optimizer if self.cfg.engine == "deepspeed" and self.cfg.zero_stage > 0 else None

    def training_state(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(shared, local) tensors that, with the step, continue training exactly (see
        :mod:`medbench.train.checkpoint`).

        shared: ``model/<name>`` (state dict: weights and buffers) and, with ZeRO stage 0,
        ``optim/<param name>/<key>`` (SGD: ``momentum_buffer``). local (this rank):
        ``rng/torch`` (+ ``rng/cuda``) and, with ZeRO stages 1/2, this rank's partition of each
        parameter group: ``zero/<group>/fp32`` (master weights) and ``zero/<group>/<key>``.
        """
        shared = {f"model/{k}": v for k, v in self.module.state_dict().items()}
        local = {"rng/torch": torch.get_rng_state()}
        if self.dist.device.startswith("cuda"):
            local["rng/cuda"] = torch.cuda.get_rng_state(self.dist.device)
        zero = self._zero_optimizer()
        if zero is None:
            for name, p in self.module.named_parameters():
                for key, value in self.optimizer.state.get(p, {}).items():
                    if torch.is_tensor(value):
                        shared[f"optim/{name}/{key}"] = value
        else:
            base = zero.optimizer
            for i, flat in enumerate(zero.single_partition_of_fp32_groups):
                local[f"zero/{i}/fp32"] = flat.data
                for key, value in base.state.get(flat, {}).items():
                    if torch.is_tensor(value):
                        local[f"zero/{i}/{key}"] = value
        return shared, local

    def load_training_state(self, step: int, shared: dict[str, torch.Tensor], local: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`training_state` saved after ``step`` optimiser steps; a mismatch raises ValueError."""
        model_sd = {k.removeprefix("model/"): v for k, v in shared.items() if k.startswith("model/")}
        own = self.module.state_dict()
        if set(model_sd) != set(own):
            raise ValueError("the checkpoint's tensors do not match the network")
        bad = [k for k, v in own.items() if v.shape != model_sd[k].shape]
        if bad:
            raise ValueError(f"tensor {bad[0]!r} has another shape in the checkpoint")
        self.module.load_state_dict(model_sd, strict=True)
        zero = self._zero_optimizer()
        device = next(self.module.parameters()).device
        if zero is None:
            params = dict(self.module.named_parameters())
            for key, value in shared.items():
                if not key.startswith("optim/"):
                    continue
                name, _, state_key = key.removeprefix("optim/").rpartition("/")
                if name not in params:
                    raise ValueError(f"optimiser state for unknown parameter {name!r}")
                self.optimizer.state[params[name]][state_key] = value.to(device)
        else:
            base = zero.optimizer
            for i, flat in enumerate(zero.single_partition_of_fp32_groups):
                saved = local.get(f"zero/{i}/fp32")
                if saved is None or saved.shape != flat.shape:
                    raise ValueError(f"ZeRO partition {i} does not match the checkpoint")
                flat.data.copy_(saved)
                prefix = f"zero/{i}/"
                for key, value in local.items():
                    if key.startswith(prefix) and key != prefix + "fp32":
                        base.state[flat][key.removeprefix(prefix)] = value.to(flat.device)
        if "rng/torch" in local:
            torch.set_rng_state(local["rng/torch"])
        if "rng/cuda" in local and self.dist.device.startswith("cuda"):
            torch.cuda.set_rng_state(local["rng/cuda"], self.dist.device)
        if hasattr(self.engine, "global_steps"):  # DeepSpeed's counters, as after ``step`` steps
            self.engine.global_steps = step
            self.engine.global_samples = step * self.plan.batch_size
            self.engine.micro_steps = step * self.gas
        else:
            self.engine._micro = step * self.gas

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
