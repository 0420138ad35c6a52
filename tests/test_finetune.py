"""The fine-tuning loop: DeepSpeed equals a plain loop, losses mask missing labels, MixUp."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medbench.backbones import create_model
from medbench.spec import HyperRuleSpec
from medbench.train.distributed import prepare_environment
from medbench.train.finetune import EngineConfig, Finetuner, mixup, task_loss
from medbench.train.hyperrule import make_plan


def batches(n_steps: int, batch: int = 8, missing: bool = True):
    g = torch.Generator().manual_seed(0)
    for step in range(n_steps):
        x = torch.randn(batch, 1, 16, 16, generator=g)
        y = (torch.rand(batch, 3, generator=g) < 0.4).float()
        if missing:
            y[0, 1] = float("nan")
        yield step, x, y


class GroupNormNet(torch.nn.Module):
    """Batch-independent normalisation, so micro-batching must not change the maths."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3), torch.nn.GroupNorm(2, 8), torch.nn.ReLU(),
                                        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
        self.fc = torch.nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x))

    def get_classifier(self) -> torch.nn.Module:
        return self.fc


def train(engine: str, micro: int | None = None, model: torch.nn.Module | None = None,
          missing: bool = True) -> torch.nn.Module:
    model = model or create_model("cbr-tiny", num_outputs=3, in_chans=1, seed=0).model
    plan = make_plan(100, HyperRuleSpec(batch_size=8, base_lr=5.0, schedule=[2, 3, 4, 5, 6]))
    tuner = Finetuner(model, plan, "multilabel", EngineConfig(engine=engine, micro_batch_size=micro),
                      prepare_environment(), seed=0)
    tuner.fit(batches(plan.total_steps, missing=missing))
    return tuner.module


def test_deepspeed_fp32_equals_plain_torch_bit_for_bit() -> None:
    ds, plain = train("deepspeed"), train("torch")
    for (name, a), (_, b) in zip(ds.state_dict().items(), plain.state_dict().items()):
        assert torch.equal(a, b), name
    assert torch.count_nonzero(ds.fc.weight) > 0  # it trained


def test_gradient_accumulation_matches_full_batch() -> None:
    full = train("deepspeed", model=GroupNormNet(), missing=False)
    accumulated = train("deepspeed", micro=4, model=GroupNormNet(), missing=False)
    for (name, a), (_, b) in zip(full.state_dict().items(), accumulated.state_dict().items()):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5), name
    assert not torch.allclose(full.fc.weight, GroupNormNet().fc.weight)


def test_loss_masks_missing_labels() -> None:
    logits = torch.tensor([[0.0, 2.0], [1.0, -1.0]])
    y = torch.tensor([[1.0, float("nan")], [0.0, 1.0]])
    got = task_loss("multilabel", logits, y)
    present = torch.nn.functional.binary_cross_entropy_with_logits(
        torch.tensor([0.0, 1.0, -1.0]), torch.tensor([1.0, 0.0, 1.0]))
    assert torch.allclose(got, present)
    mc = task_loss("multiclass", torch.tensor([[2.0, 0.0, 0.0]]), torch.tensor([[1.0, 0.0, 0.0]]))
    assert torch.allclose(mc, torch.nn.functional.cross_entropy(torch.tensor([[2.0, 0.0, 0.0]]), torch.tensor([0])))


def test_mixup_keeps_missing_labels_missing() -> None:
    x = torch.arange(4.0).view(4, 1)
    y = torch.tensor([[1.0], [float("nan")], [0.0], [1.0]])
    mx, my = mixup(x, y, 0.2, np.random.default_rng(0))
    assert torch.isnan(my).sum() >= 1
    assert torch.all((my[~torch.isnan(my)] >= 0) & (my[~torch.isnan(my)] <= 1))
    assert not torch.equal(mx, x)


def test_agc_requires_zero_stage_0() -> None:
    from medbench.errors import MedbenchError

    model = create_model("cbr-tiny", num_outputs=1, in_chans=1).model
    plan = make_plan(100, HyperRuleSpec(batch_size=4, agc_clip=0.01))
    with pytest.raises(MedbenchError, match="ZeRO stage 0"):
        Finetuner(model, plan, "binary", EngineConfig(zero_stage=1), prepare_environment(), seed=0)


def test_single_cpu_process_builds_no_deepspeed_comm_op(tmp_path) -> None:
    """One CPU process starts DeepSpeed's communication backend without compiling the shared-memory all-reduce op
    (a C++ build of about a minute on a fresh machine, used only between ranks): nothing is written to an empty
    TORCH_EXTENSIONS_DIR and the backend holds no such op."""
    import os
    import subprocess
    import sys

    code = ("from medbench.train.distributed import init_process_group, prepare_environment; "
            "init_process_group(prepare_environment()); import deepspeed.comm.comm as c; "
            "print('op', c.cdb.shm_comm_op)")
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["TORCH_EXTENSIONS_DIR"] = str(tmp_path / "extensions")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "op None" in proc.stdout
    assert not (tmp_path / "extensions").exists() or not any((tmp_path / "extensions").rglob("*.so"))
