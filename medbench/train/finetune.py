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

How a run executes is an :class:`Execution`, recorded with the run: the
channels-last memory layout and ``torch.compile`` (other kernels, so other
last bits: in the run key when on), how often the logged loss is read back
from the device and the input workers (no number changes: not in the key). The step loop keeps the loss on the device and
reads it (one host sync) every ``log_every`` steps, before an evaluation and
before a checkpoint; on CPU, where nothing runs ahead of the host, every step.
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
    #: per-device micro-batch; the HyperRule batch is reached by gradient accumulation. None: the whole
    #: per-device batch; "auto": the largest that fits the device (medbench.train.memory), resolved by the runner.
    #: As requested (N, "auto" or None) it is part of the run key; an "auto" choice is recorded in the run
    micro_batch_size: int | str | None = None


@dataclass(frozen=True)
class Execution:
    """How a run executes, recorded with the run (``result.json``, ``provenance.execution``). Channels-last and
    ``--compile`` pick other kernels (layout, fusion): they change the last bits of a run's numbers, so when on
    they enter the run key (:meth:`key_fields`; off, the key is what it was before they existed). The loss
    read-back interval and the input workers never change a number and stay out of it."""

    #: channels-last (NHWC) memory layout of weights and inputs: tensor-core convolutions on GPUs
    channels_last: bool = False
    #: ``torch.compile`` the network (in place: parameter names and checkpoints are unchanged)
    compile: bool = False
    #: read the logged loss back from the device every N steps (a host sync); None: 1 on CPU, 25 on GPUs
    log_every: int | None = None
    #: threads copying cache rows for the input path; None: the runner's share of the cores
    loader_workers: int | None = None

    @classmethod
    def default_for(cls, device: str) -> "Execution":
        """The documented defaults: channels-last on CUDA, contiguous NCHW on CPU (docs/performance.md)."""
        return cls(channels_last=device.startswith("cuda"))

    def log_interval(self, device: str) -> int:
        return self.log_every or (1 if not device.startswith("cuda") else 25)

    def as_dict(self) -> dict:
        return {"channels_last": self.channels_last, "compile": self.compile, "log_every": self.log_every,
                "loader_workers": self.loader_workers}

    def key_fields(self) -> dict:
        """The settings of the run key that can change numbers, only those that are on (empty by default, on CPU)."""
        return {k: True for k in ("channels_last", "compile") if getattr(self, k)}


def default_precision(device: str) -> str:
    """bf16 autocast on CUDA devices that support bf16 (Ampere and later), else fp32 (the CPU default)."""
    if device.startswith("cuda"):
        import torch

        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "fp32"


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
    #: the per-device micro-batch from each step on, when ``--micro-batch auto`` chose it (an out-of-memory
    #: error halves it): ``[{"from_step": 0, "micro_batch": 32}, ...]``; empty for a fixed micro-batch
    micro_batch: list[dict] = field(default_factory=list)

    def as_dict(self) -> dict:
        out = {
            "step": self.step,
            "loss": self.loss,
            "lr": self.lr,
            "val_step": self.val_step,
            "val_metric": self.val_metric,
            "seconds": self.seconds,
            "data_wait_seconds": self.data_wait_seconds,
        }
        if self.micro_batch:
            out["micro_batch"] = self.micro_batch
        return out

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


class _LossLog:
    """Per-step losses kept on the device until :meth:`flush` reads them all with one host sync (and, launched,
    one all-reduce averaging them over the ranks); a non-finite loss stops the run there, naming its step."""

    def __init__(self, history: History, on_step: Callable[[int, float], None] | None, dist: DistInfo):
        self.history = history
        self.on_step = on_step
        self.dist = dist
        self.pending: list[tuple[int, float, torch.Tensor]] = []

    def add(self, step: int, lr: float, loss: torch.Tensor) -> None:
        self.pending.append((step, lr, loss))

    def flush(self) -> None:
        if not self.pending:
            return
        from medbench.train.data_parallel import mean_over_ranks

        pending, self.pending = self.pending, []
        values = mean_over_ranks(torch.stack([p[2] for p in pending]), self.dist.world_size)
        for (step, lr, _), value in zip(pending, values):
            if not math.isfinite(value):
                if step == 0:  # before any update: the learning rate cannot be the cause
                    raise MedbenchError(f"loss is {value} at step 0, before any update: the initial network or the "
                                        "images give non-finite outputs; check the weights (--weights / --init) and "
                                        "the input", field="--init")
                raise MedbenchError(f"training diverged at step {step}: loss is {value}", field="hyperrule.base_lr")
            self.history.step.append(step)
            self.history.loss.append(value)
            self.history.lr.append(lr)
            if self.on_step:
                self.on_step(step, value)


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
    if cfg.micro_batch_size == "auto":  # resolved per device by the runner; any divisor of per_rank works
        return per_rank, 1
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
                 seed: int, execution: Execution | None = None):
        self.plan = plan
        self.task_type = task_type
        self.cfg = engine_cfg
        self.dist = dist
        self.seed = seed
        self.execution = execution or Execution()
        if engine_cfg.micro_batch_size == "auto":
            raise ValueError("resolve --micro-batch auto (medbench.train.memory.choose_micro_batch) before training")
        self.micro, self.gas = check_engine(plan, engine_cfg, dist)
        self.memory_format = torch.channels_last if self.execution.channels_last else torch.contiguous_format
        if self.execution.channels_last and engine_cfg.engine == "deepspeed" and engine_cfg.zero_stage > 0:
            raise MedbenchError("channels-last needs ZeRO stage 0 (ZeRO keeps the parameters as views of flat "
                                "buffers); use --no-channels-last or --zero-stage 0", field="--channels-last")
        if self.execution.compile:
            model.compile()  # in place: the module, its parameter names and state dict stay as they are
        self._log: _LossLog | None = None
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
        if self.execution.channels_last:
            # after DeepSpeed's set-up, which views every parameter as bytes (contiguous only); the parameters
            # keep their identity (their data is replaced), so the optimiser holds them as before
            self.engine.module.to(memory_format=torch.channels_last)

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
        from medbench.train.data_parallel import RunningStats

        history = history or History()
        device = self.dist.device
        running_stats = RunningStats(self.module, self.dist.world_size)  # BatchNorm buffers as one process's
        log = self._log = _LossLog(history, on_step, self.dist)
        log_every = self.execution.log_interval(device)
        self.engine.train()
        t0 = time.perf_counter()
        wait = 0.0
        t_wait = time.perf_counter()
        try:
            for step, x, y in batches:
                wait += time.perf_counter() - t_wait
                lr = self.plan.lr_at(step)
                self._set_lr(lr)
                if self.plan.mixup_alpha > 0 and not premixed:
                    x, y = mixup(x, y, self.plan.mixup_alpha,
                                 np.random.default_rng([self.seed, 3, step, self.dist.rank]))
                x = x.to(device, non_blocking=True)
                y = y.to(device, non_blocking=True)
                # the step's loss stays on the device (float64, summed as the host summed it before): no sync here
                total = torch.zeros((), dtype=torch.float64, device=device)
                running_stats.begin()
                for xm, ym in zip(x.split(self.micro), y.split(self.micro)):
                    loss = task_loss(self.task_type, self.engine.forward(xm.contiguous(memory_format=self.memory_format)), ym)
                    self.engine.backward(loss)
                    if self.plan.agc_clip is not None and self.engine.is_gradient_accumulation_boundary():
                        _agc(self.module, self.plan.agc_clip)
                    self.engine.step()
                    total = total + loss.detach().double() / self.gas
                running_stats.end()
                log.add(step, lr, total)
                if (step + 1) % log_every == 0:
                    log.flush()
                if evaluate is not None and eval_every and (step + 1) % eval_every == 0 \
                        and step + 1 < self.plan.total_steps:
                    log.flush()
                    self._record_eval(history, step + 1, evaluate)
                if after_step:
                    after_step(step)
                t_wait = time.perf_counter()
            log.flush()
        finally:
            self._log = None
        done = history.step[-1] + 1 if history.step else None
        if evaluate is not None and done is not None and (not history.val_step or history.val_step[-1] != done):
            self._record_eval(history, done, evaluate)  # the final evaluation (also when resumed at the end)
        history.seconds += time.perf_counter() - t0
        history.data_wait_seconds += wait
        return history

    def sync(self) -> None:
        """Read the losses of the steps trained so far into the history (one host sync; on every rank at the
        same step when launched: the ranks average them). Called before a checkpoint; raises when training
        diverged."""
        if self._log is not None:
            self._log.flush()

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
    # a network trained channels-last (Execution.channels_last) gets channels-last inputs
    channels_last = any(p.dim() == 4 and not p.is_contiguous() and p.is_contiguous(memory_format=torch.channels_last)
                        for p in model.parameters())
    for x in inputs:  # device tensors from medbench.data.loader.eval_batches (others are moved)
        x = x.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16, enabled=use_autocast):
            out = model(x)
        outs.append(out.float())  # kept on the device: one copy to the host at the end, no sync per batch
    model.train(was_training)
    if not outs:
        return np.zeros((0, 0), dtype=np.float32)
    return torch.cat(outs).cpu().numpy()
