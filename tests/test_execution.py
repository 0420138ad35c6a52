"""How a run executes (medbench.train.finetune.Execution): the loss read back every N steps, channels-last under
DeepSpeed with exact resume, evaluation outputs kept on the device; the per-rank share of the cores."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medbench.backbones import create_model
from medbench.errors import MedbenchError
from medbench.spec import HyperRuleSpec
from medbench.train.checkpoint import CheckpointStore
from medbench.train.distributed import cores_per_rank, prepare_environment
from medbench.train.finetune import EngineConfig, Execution, Finetuner, History, predict_logits
from medbench.train.hyperrule import make_plan

PLAN = make_plan(100, HyperRuleSpec(batch_size=8, base_lr=0.5, schedule=[2, 4, 6, 7, 8]))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def batches(start: int, stop: int, poison: int | None = None):
    for step in range(start, stop):
        g = torch.Generator().manual_seed(step)
        x = torch.randn(8, 1, 16, 16, generator=g)
        if step == poison:
            x[0, 0, 0, 0] = float("nan")
        yield step, x, (torch.rand(8, 3, generator=g) < 0.4).float()


def tuner(execution: Execution | None = None, **engine) -> Finetuner:
    model = create_model("cbr-tiny", num_outputs=3, in_chans=1, seed=0).model
    return Finetuner(model, PLAN, "multilabel", EngineConfig(**engine), prepare_environment(), seed=0,
                     execution=execution)


def test_reading_the_loss_every_n_steps_changes_nothing_but_when() -> None:
    every, lazy = tuner(Execution(log_every=1)), tuner(Execution(log_every=5))
    calls: list[int] = []
    h1 = every.fit(batches(0, PLAN.total_steps))
    h5 = lazy.fit(batches(0, PLAN.total_steps), on_step=lambda step, loss: calls.append(step))
    assert h1.loss == h5.loss and h1.step == h5.step == list(range(PLAN.total_steps)) and h1.lr == h5.lr
    assert calls == list(range(PLAN.total_steps))  # every step reported, in order, in bursts
    for a, b in zip(every.module.parameters(), lazy.module.parameters()):
        assert torch.equal(a, b)
    # a diverged loss is still caught, naming its step, also when read later
    with pytest.raises(MedbenchError, match="training diverged at step 2: loss is nan"):
        tuner(Execution(log_every=5)).fit(batches(0, PLAN.total_steps, poison=2))


def test_channels_last_trains_the_same_network_and_resumes_exactly(tmp_path) -> None:
    eager = tuner()
    eager.fit(batches(0, PLAN.total_steps))
    cl = tuner(Execution(channels_last=True))
    convs = [m.weight for m in cl.module.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous() for w in convs
               if w.shape[1] > 1 and w.shape[-1] > 1)
    history = History()
    store = CheckpointStore(tmp_path)

    def save_at_3(step: int) -> None:
        if step + 1 == 3:
            cl.sync()
            store.save(3, *cl.training_state(), key="k", meta={"history": history.as_dict()})

    cl.fit(batches(0, PLAN.total_steps), history=history, after_step=save_at_3)
    for (name, a), (_, b) in zip(eager.module.state_dict().items(), cl.module.state_dict().items()):
        assert torch.allclose(a.float(), b.float(), atol=1e-5, rtol=1e-4), name  # other kernels: last bits
    resumed = tuner(Execution(channels_last=True))
    ckpt = store.load(key="k")
    resumed.load_training_state(ckpt.step, ckpt.shared, ckpt.local)
    resumed.fit(batches(ckpt.step, PLAN.total_steps), history=History.from_dict(ckpt.meta["history"]))
    for (name, a), (_, b) in zip(cl.module.state_dict().items(), resumed.module.state_dict().items()):
        assert torch.equal(a, b), name
    # evaluation of a channels-last network: channels-last inputs, the eager network's logits up to the last bits
    x = [torch.randn(5, 1, 16, 16, generator=torch.Generator().manual_seed(9))]
    np.testing.assert_allclose(predict_logits(cl.module, x, "cpu"), predict_logits(eager.module, x, "cpu"),
                               atol=1e-4, rtol=1e-4)
    with pytest.raises(MedbenchError, match="channels-last needs ZeRO stage 0"):
        tuner(Execution(channels_last=True), zero_stage=1)


def test_ranks_of_a_node_share_its_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    allowed = len(os.sched_getaffinity(0))
    for var in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "SLURM_CPUS_PER_TASK"):
        monkeypatch.delenv(var, raising=False)
    assert cores_per_rank() == allowed
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert cores_per_rank() == max(1, allowed // 2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(4 * allowed))
    assert cores_per_rank() == 1
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")
    assert cores_per_rank() == 1


def test_bf16_autocast_keeps_batchnorm_in_fp32() -> None:
    """The GPU default precision, run on CPU: convolutions in bf16, BatchNorm weights and running statistics
    fp32 (DeepSpeed's torch_autocast; PyTorch's mixed-precision batch norm accumulates in fp32)."""
    bf16 = tuner(precision="bf16")
    before = {n: b.clone() for n, b in bf16.module.named_buffers() if "running" in n}
    bf16.fit(batches(0, 3))
    norms = [m for m in bf16.module.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(m.weight.dtype == m.running_mean.dtype == m.running_var.dtype == torch.float32
                         for m in norms)
    assert all(torch.isfinite(b).all() for b in before.values())
    assert any(not torch.equal(before[n], b) for n, b in bf16.module.named_buffers() if n in before)
    fp32 = tuner()
    fp32.fit(batches(0, 3))
    a, b = (next(t.module.parameters()) for t in (bf16, fp32))
    assert a.dtype == torch.float32 and not torch.equal(a, b)  # bf16 arithmetic changed the numbers
