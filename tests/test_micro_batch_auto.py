"""``--micro-batch auto`` on CPU with a simulated device: the memory model proposes, a trial step confirms (or
steps down), the choice is stored once per setting and device type, and an out-of-memory error during a run
halves it and resumes from the last checkpoint with the numbers of an uninterrupted run."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from tiny_tasks import write_tiny_tasks

from medbench.backbones import get_backbone
from medbench.backbones.registry import register_backbone
from medbench.data.locate import DataLocations
from medbench.errors import MedbenchError
from medbench.run.request import RunRequest
from medbench.run.runner import Runner
from medbench.spec.catalog import Catalog
from medbench.store import RunStore
from medbench.train.checkpoint import CheckpointPolicy
from medbench.train.finetune import EngineConfig
from medbench.train.memory import MARGIN, choose_micro_batch, divisors, halved, memory_estimate, trial_step


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class SimulatedDevice:
    """A device whose allocator fails (``torch.OutOfMemoryError``) when a training forward gets more than
    ``limit`` images; after ``drop_after`` training forwards the limit becomes ``later_limit`` (fragmentation,
    another process). ``available`` bytes are what the memory model is told."""

    def __init__(self, available: float, limit: int, drop_after: int | None = None, later_limit: int | None = None):
        self.available_bytes = int(available)
        self.limit, self.drop_after, self.later_limit = limit, drop_after, later_limit
        self.forwards: list[int] = []  # images per training forward, in order
        self.failed: list[int] = []  # forward numbers (1-based) that raised

    def describe(self) -> str:
        return "simulated"

    def available(self) -> int:
        return self.available_bytes

    def measure(self, fn) -> None:
        fn()
        return None

    def current_limit(self) -> int:
        dropped = self.drop_after is not None and len(self.forwards) > self.drop_after
        return self.later_limit if dropped else self.limit

    def attach(self, model: torch.nn.Module) -> None:
        def hook(module, args):
            if module.training:
                self.forwards.append(int(args[0].shape[0]))
                if args[0].shape[0] > self.current_limit():
                    self.failed.append(len(self.forwards))
                    raise torch.OutOfMemoryError(f"simulated: {args[0].shape[0]} images > {self.current_limit()}")

        model.register_forward_pre_hook(hook)


class GroupNormNet(torch.nn.Module):
    """No batch statistics: any micro-batch gives the same numbers up to float summation order."""

    def __init__(self, num_classes: int, in_chans: int) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Conv2d(in_chans, 8, 3), torch.nn.GroupNorm(2, 8), torch.nn.ReLU(),
                                        torch.nn.Conv2d(8, 8, 3), torch.nn.GroupNorm(2, 8), torch.nn.ReLU(),
                                        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
        self.fc = torch.nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x))

    def get_classifier(self) -> torch.nn.Module:
        return self.fc


@pytest.fixture(scope="module")
def gn_tiny():
    bb = replace(get_backbone("cbr-tiny"), name="gn-tiny",
                 build=lambda *, num_classes, in_chans: GroupNormNet(num_classes, in_chans), params=None)
    register_backbone(bb, overwrite=True)
    return bb


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_tasks(tmp_path_factory.mktemp("tiny-tasks"))


def _available_for(bb, micro: int) -> float:
    """Free bytes with which the memory model allows exactly ``micro`` (tiny-tb: 1 output, 1 channel, 12 px)."""
    return memory_estimate(bb, 1, 1, 12, micro)["total"] / (1.0 - MARGIN) + 1


def _runner(tiny: Path, out: Path, device=None) -> Runner:
    return Runner(Catalog([tiny]), DataLocations(), RunStore(out), memory=device,
                  checkpoints=CheckpointPolicy(every_steps=4, every_seconds=None))


def test_divisors_and_halving_by_brute_force() -> None:
    for n in (1, 8, 12, 96, 512):
        assert divisors(n) == [d for d in range(1, n + 1) if n % d == 0]
        for m in divisors(n):
            expect = max((d for d in divisors(n) if d <= m / 2), default=None)
            assert halved(m, n) == expect


def test_memory_model_proposes_and_the_trial_confirms(gn_tiny) -> None:
    # the model allows 4 of 8; the device holds 8: no trial fails
    device = SimulatedDevice(_available_for(gn_tiny, 4), limit=8)
    choice = choose_micro_batch(GroupNormNet(1, 1), gn_tiny, per_device_batch=8, num_outputs=1, channels=1, crop=12,
                                task_type="binary", device="cpu", precision="fp32", memory=device)
    assert choice.micro_batch == 4 and choice.accumulation == 2
    assert [(t["micro_batch"], t["fits"]) for t in choice.trials] == [(4, True)] and device.forwards == [4]
    # brute force: the largest divisor whose estimate fits the free memory less the margin
    budget = device.available_bytes * (1 - MARGIN)
    assert choice.micro_batch == max(m for m in divisors(8) if memory_estimate(gn_tiny, 1, 1, 12, m)["total"] <= budget)
    # the model allows all 8, the device only 3: the trials step down 8 -> 4 -> 2
    device = SimulatedDevice(_available_for(gn_tiny, 8), limit=3)
    choice = choose_micro_batch(GroupNormNet(1, 1), gn_tiny, per_device_batch=8, num_outputs=1, channels=1, crop=12,
                                task_type="binary", device="cpu", precision="fp32", memory=device)
    assert choice.micro_batch == 2
    assert [(t["micro_batch"], t["fits"], t["error"]) for t in choice.trials] == \
        [(8, False, "out of memory"), (4, False, "out of memory"), (2, True, None)]
    with pytest.raises(MedbenchError, match="not even a micro-batch of 1"):
        choose_micro_batch(GroupNormNet(1, 1), gn_tiny, per_device_batch=8, num_outputs=1, channels=1, crop=12,
                           task_type="binary", device="cpu", precision="fp32", memory=SimulatedDevice(8e9, limit=0))


def test_the_trial_step_leaves_the_network_as_it_was() -> None:
    from medbench.backbones import create_model

    model = create_model("cbr-tiny", num_outputs=3, in_chans=1, seed=0).model  # BatchNorm: buffers move in train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    model.eval()
    trial_step(model, 4, channels=1, crop=16, num_outputs=3, task_type="multilabel", device="cpu", precision="fp32")
    assert not model.training and torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_out_of_memory_during_a_run_halves_and_resumes_with_the_uninterrupted_numbers(tiny: Path, tmp_path: Path,
                                                                                      gn_tiny) -> None:
    req = RunRequest(task="tiny-tb", backbone="gn-tiny", seed=0, init="random")
    (ref,) = _runner(tiny, tmp_path / "ref").run_all([req])  # the whole batch of 8 per step
    assert ref.status == "ok"

    # trials: 8 fails, 4 fits (forwards 1, 2); then 2 forwards of 4 per step: forward 17 is the first of the 8th
    # step, where the limit has dropped to 2 (after 16 forwards); the last checkpoint was after step 4
    device = SimulatedDevice(_available_for(gn_tiny, 8), limit=4, drop_after=16, later_limit=2)
    auto = replace(req, engine=EngineConfig(micro_batch_size="auto"))
    runner = _runner(tiny, tmp_path / "auto", device)
    messages: list[str] = []
    runner.reporter.message = messages.append
    (out,) = runner.run_all([auto])
    assert out.status == "ok", out.error
    assert device.failed == [1, 17]  # the trial at 8, then the 8th step at 4
    assert all(n <= 2 for n in device.forwards[17:])  # after the halving nothing larger was tried
    training = out.result["training"]
    assert training["resumed_from_step"] == 4, messages  # the checkpoint before the failure (every 4 steps)
    assert training["micro_batch"]["steps"] == [{"from_step": 0, "micro_batch": 4}, {"from_step": 4, "micro_batch": 2}]
    assert training["micro_batch"]["per_device"] == 2 and training["micro_batch"]["accumulation"] == 4
    assert any("halved to 2, resuming from the last checkpoint" in m for m in messages)

    (record_file,) = (tmp_path / "auto" / "micro-batch").glob("*.json")
    record = json.loads(record_file.read_text())
    assert record["micro_batch"] == 2 and record["setting"]["device"] == "simulated"
    assert [(t["micro_batch"], t["fits"]) for t in record["chosen"]["trials"]] == [(8, False), (4, True)]
    assert [(h["from"], h["to"], h["at"]) for h in record["halved"]] == [(4, 2, "step 8")]

    # the numbers of the uninterrupted run with the whole batch (GroupNorm: micro-batching only reorders sums)
    history, ref_history = (json.loads((o.run_dir.path / "history.json").read_text()) for o in (out, ref))
    assert history["step"] == list(range(12))
    np.testing.assert_allclose(history["loss"], ref_history["loss"], rtol=1e-5, atol=1e-6)
    for split in ("val", "test"):
        a, b = (pl.read_parquet(o.run_dir.path / "predictions" / f"{split}.parquet") for o in (out, ref))
        probs = [c for c in a.columns if c.startswith("prob:")]
        np.testing.assert_allclose(a.select(probs).to_numpy(), b.select(probs).to_numpy(), atol=1e-5)
    # the run key holds the request ("auto"), not the resolved micro-batch: a rerun reuses the run
    assert out.run_dir.path.name != ref.run_dir.path.name
    (again,) = _runner(tiny, tmp_path / "auto", device).run_all([auto])
    assert again.status == "skipped"

    # the next seed uses the stored (halved) choice: no trial step
    seen = len(device.forwards)
    (seed1,) = runner.run_all([replace(auto, seed=1)])
    assert seed1.status == "ok" and set(device.forwards[seen:]) == {2}
    assert seed1.result["training"]["micro_batch"]["steps"] == [{"from_step": 0, "micro_batch": 2}]


def test_a_fixed_micro_batch_is_never_changed(tiny: Path, tmp_path: Path, gn_tiny) -> None:
    device = SimulatedDevice(_available_for(gn_tiny, 8), limit=2)
    req = RunRequest(task="tiny-tb", backbone="gn-tiny", seed=0, init="random", engine=EngineConfig(micro_batch_size=4))
    (out,) = _runner(tiny, tmp_path, device).run_all([req])
    assert out.status == "failed" and out.result["kind"] == "out-of-memory"
    assert not (tmp_path / "micro-batch").exists()


def test_cli_micro_batch_option_and_dry_run(capsys: pytest.CaptureFixture) -> None:
    from medbench.cli import main
    from medbench.limits import MAX_BATCH

    with pytest.raises(SystemExit) as exc:
        main(["run", "--backbone", "cbr-small", "--task", "smoke-tb", "--dry-run", "--micro-batch", "zero"])
    assert exc.value.code == 2
    assert f"--micro-batch: expected a number from 1 to {MAX_BATCH} or 'auto', got 'zero'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:  # bounded like every number of the command line
        main(["run", "--backbone", "cbr-small", "--task", "smoke-tb", "--dry-run", "--micro-batch", str(MAX_BATCH + 1)])
    assert exc.value.code == 2 and f"got '{MAX_BATCH + 1}'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["run", "--backbone", "bit-m-r101x3", "--task", "smoke-tb", "--dry-run", "--micro-batch", "auto",
              "--assume-memory", "8"])
    out = capsys.readouterr().out
    assert exc.value.code == 0
    line = next(li for li in out.splitlines() if li.startswith("--micro-batch auto"))
    bb = get_backbone("bit-m-r101x3")
    from medbench.spec.catalog import Catalog as C

    spec = C().task("smoke-tb").spec
    expect = max(m for m in divisors(spec.hyperrule.batch_size)
                 if memory_estimate(bb, spec.num_outputs, 1, spec.input.crop, m)["total"] <= 8e9 * (1 - MARGIN))
    assert f"micro-batch {expect} x {spec.hyperrule.batch_size // expect} accumulation steps" in line
