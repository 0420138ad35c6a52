"""The run store: keys, completion, checkpoints and exact resume, failure records, locks."""

from __future__ import annotations

import json
import os
import signal
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch
from tiny_tasks import write_tiny_tasks

from medbench.backbones import create_model
from medbench.data.locate import DataLocations
from medbench.errors import RunFailed
from medbench.run.failures import StopRequested
from medbench.run.request import RunRequest, run_key
from medbench.run.runner import Runner
from medbench.spec import HyperRuleSpec
from medbench.spec.catalog import Catalog
from medbench.store import RunDir, RunStore, find_run_dirs
from medbench.train.checkpoint import CheckpointPolicy, CheckpointStore
from medbench.train.distributed import prepare_environment
from medbench.train.finetune import EngineConfig, Finetuner, History
from medbench.train.hyperrule import make_plan
from medbench.utils import atomic_path, atomic_write_text


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------ exact resume at the engine level

PLAN = make_plan(100, HyperRuleSpec(batch_size=8, base_lr=0.5, schedule=[2, 4, 6, 7, 8], mixup_alpha=0.2))


def batches(start: int, stop: int):
    for step in range(start, stop):  # like TrainStream: a pure function of the step
        g = torch.Generator().manual_seed(step)
        yield step, torch.randn(8, 1, 16, 16, generator=g), (torch.rand(8, 3, generator=g) < 0.4).float()


def tuner(engine: str, stage: int) -> Finetuner:
    model = create_model("cbr-tiny", num_outputs=3, in_chans=1, seed=0).model
    return Finetuner(model, PLAN, "multilabel", EngineConfig(engine=engine, zero_stage=stage), prepare_environment(),
                     seed=0)


@pytest.mark.parametrize(("engine", "stage"), [("torch", 0), ("deepspeed", 0), ("deepspeed", 1), ("deepspeed", 2)])
def test_resumed_training_equals_uninterrupted_bit_for_bit(engine: str, stage: int, tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    full = tuner(engine, stage)
    history = History()

    def save_at_3(step: int) -> None:  # the uninterrupted run writes the checkpoint a killed run would have
        if step + 1 == 3:
            store.save(3, *full.training_state(), key="k", meta={"history": history.as_dict()})

    full.fit(batches(0, PLAN.total_steps), history=history, after_step=save_at_3)

    resumed = tuner(engine, stage)  # a new process: fresh network, fresh optimiser
    ckpt = store.load(key="k")
    assert ckpt is not None and ckpt.step == 3
    resumed.load_training_state(ckpt.step, ckpt.shared, ckpt.local)
    resumed_history = resumed.fit(batches(ckpt.step, PLAN.total_steps),
                                  history=History.from_dict(ckpt.meta["history"]))
    for (name, a), (_, b) in zip(full.module.state_dict().items(), resumed.module.state_dict().items()):
        assert torch.equal(a, b), name
    assert resumed_history.loss == history.loss and len(history.loss) == PLAN.total_steps
    if engine == "deepspeed" and stage == 0:  # control: without the momentum buffers the numbers differ
        partial = tuner(engine, stage)
        partial.load_training_state(ckpt.step, {k: v for k, v in ckpt.shared.items() if k.startswith("model/")},
                                    ckpt.local)
        partial.fit(batches(ckpt.step, PLAN.total_steps))
        assert any(not torch.equal(a, b) for a, b in zip(partial.module.parameters(), full.module.parameters()))


def test_checkpoint_store_refuses_damaged_or_foreign_checkpoints(tmp_path: Path) -> None:
    from medbench.train.checkpoint import CheckpointUnusable

    store = CheckpointStore(tmp_path)
    store.save(5, {"model/w": torch.ones(3)}, {"rng/torch": torch.get_rng_state()}, key="k", meta={})
    store.save(7, {"model/w": torch.full((3,), 2.0)}, {"rng/torch": torch.get_rng_state()}, key="k", meta={})
    assert sorted(p.name for p in tmp_path.iterdir()) == [  # older steps pruned, the index written last
        "checkpoint.json", "step-00000007-rank0.safetensors", "step-00000007-shared.safetensors"]
    assert torch.equal(store.load(key="k").shared["model/w"], torch.full((3,), 2.0))
    with pytest.raises(CheckpointUnusable, match="another run configuration"):
        store.load(key="other")
    shared = tmp_path / "step-00000007-shared.safetensors"
    shared.write_bytes(shared.read_bytes()[:-4])
    with pytest.raises(CheckpointUnusable, match="bytes, expected"):
        store.load(key="k")
    assert CheckpointStore(tmp_path / "none").load(key="k") is None


def test_checkpoint_policy_parsing() -> None:
    assert CheckpointPolicy.parse([]) == CheckpointPolicy(None, 600.0)
    assert CheckpointPolicy.parse(["500"]) == CheckpointPolicy(500, None)
    assert CheckpointPolicy.parse(["250steps", "15m"]) == CheckpointPolicy(250, 900.0)
    assert CheckpointPolicy.parse(["2h"]) == CheckpointPolicy(None, 7200.0)
    assert not CheckpointPolicy.parse(["off"]).enabled


# ------------------------------------------------------------------ the run key

@dataclass(frozen=True)
class _LaterRequest(RunRequest):
    label_smoothing: float | None = None  # a field another stage adds later


def test_run_key_covers_what_fixes_the_numbers(tmp_path: Path) -> None:
    task = Catalog([write_tiny_tasks(tmp_path)]).task("tiny-tb")
    req = RunRequest(task="tiny-tb", backbone="cbr-tiny", seed=0, init="random")
    base = dict(plan={"total_steps": 12}, input_geometry={"crop": 12}, ood=[], world_size=1)
    key = run_key(req, task, "fp", None, **base)
    assert key == run_key(req, task, "fp", None, **base)
    variants = [
        run_key(replace(req, seed=1), task, "fp", None, **base),
        run_key(replace(req, init="pretrained"), task, "fp", None, **base),
        run_key(replace(req, max_steps=5), task, "fp", None, **base),
        run_key(replace(req, engine=EngineConfig(micro_batch_size=4)), task, "fp", None, **base),
        run_key(req, task, "other-data", None, **base),
        run_key(req, task, "fp", "weights-sha", **base),
        run_key(req, task, "fp", None, **{**base, "plan": {"total_steps": 13}}),
        run_key(req, task, "fp", None, **{**base, "input_geometry": {"crop": 16}}),
        run_key(req, task, "fp", None, **{**base, "ood": [["b", "h", "f"]]}),
        run_key(req, task, "fp", None, **{**base, "world_size": 2}),
        run_key(_LaterRequest(**vars(req), label_smoothing=0.1), task, "fp", None, **base),
    ]
    assert len({key, *variants}) == len(variants) + 1
    # a field added later, left at None, keeps the keys of earlier runs
    assert run_key(_LaterRequest(**vars(req)), task, "fp", None, **base) == key
    # the weights enter by content: another path to the same file is the same run
    assert run_key(replace(req, weights=Path("/a/w.pth")), task, "fp", "sha", **base) == \
        run_key(replace(req, weights=Path("/b/w.pth")), task, "fp", "sha", **base)



def test_execution_options_that_change_numbers_enter_the_key_only_when_on(tmp_path: Path) -> None:
    from medbench.train.finetune import Execution

    task = Catalog([write_tiny_tasks(tmp_path)]).task("tiny-tb")
    req = RunRequest(task="tiny-tb", backbone="cbr-tiny", seed=0, init="random")
    base = dict(plan={"total_steps": 12}, input_geometry={"crop": 12}, ood=[], world_size=1)
    key = run_key(req, task, "fp", None, **base)
    # the CPU default and the options that never change a number keep the key runs had before the options
    for same in (Execution.default_for("cpu"), Execution(log_every=5, loader_workers=3)):
        assert run_key(req, task, "fp", None, **base, execution=same.key_fields()) == key
    # channels-last (the GPU default) and --compile pick other kernels: other runs
    changed = {run_key(req, task, "fp", None, **base, execution=e.key_fields())
               for e in (Execution.default_for("cuda:0"), Execution(compile=True),
                         Execution(channels_last=True, compile=True))}
    assert len(changed) == 3 and key not in changed

# ------------------------------------------------------------------ completion markers

def test_only_an_ok_result_marks_a_run_complete(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "runs" / "t" / "b" / "r")
    (run.path / "predictions").mkdir(parents=True)
    (run.path / "predictions" / "test.parquet").write_bytes(b"partial")
    assert not run.complete and run.status is None
    (run.path / "result.json").write_text('{"status": "ok", "ta')  # a torn write (never by medbench)
    assert not run.complete
    run.write_failure({"status": "failed", "error": "x"})
    assert run.status == "failed" and not run.complete and run.result()["attempt"] == 1
    run.write_failure({"status": "failed", "error": "y"})
    assert run.result()["attempt"] == 2
    assert find_run_dirs([tmp_path]) == [] and RunStore(tmp_path).failed() == [run]
    run.write_result({"status": "ok"})
    assert run.complete and find_run_dirs([tmp_path]) == [run]


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "result.json"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half of the new")
            raise RuntimeError("killed mid-write")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]
    assert oct(target.stat().st_mode & 0o777) != oct(0o600)  # readable by others as open() would make it


_KILLED_WRITER = """
import os, signal, sys
from pathlib import Path
from medbench.utils import atomic_path
with atomic_path(Path(sys.argv[1])) as tmp:
    tmp.write_text("half of the new")
    print(tmp.name, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_claiming_a_run_removes_temporary_files_of_killed_writers_only(tmp_path: Path) -> None:
    import subprocess
    import sys
    import time

    from medbench.store.rundir import STALE_TEMP_SECONDS
    from medbench.utils import writer_gone, writer_tag

    run = RunDir(tmp_path / "runs" / "t" / "b" / "r")
    (run.path / "predictions").mkdir(parents=True)
    # a writer SIGKILLed inside atomic_path leaves its temporary file (the old file stays whole)
    atomic_write_text(run.path / "history.json", "old")
    killed = subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(run.path / "history.json")],
                            capture_output=True, text=True, check=False)
    assert killed.returncode == -signal.SIGKILL
    left = run.path / killed.stdout.strip()
    assert left.is_file() and left.name.startswith(".history.json.") and writer_gone(left.name) is True
    host = writer_tag().split("@")[1]
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    old = time.time() - STALE_TEMP_SECONDS - 60
    files = {
        "predictions/.test.parquet.abc12345.{dead}@{host}.tmp": (None, True),  # exited writer, this host
        ".metrics.json.abc12345.{alive}@{host}.tmp": (None, False),  # a live writer's file is never touched
        ".config.json.abc12345.{me}@{host}.tmp": (None, False),  # nor this process's own
        ".config.json.def67890.{dead}@other-node.tmp": (None, False),  # another host's, written just now
        ".config.json.0a1b2c3d.{dead}@other-node.tmp": (old, True),  # another host's, unwritten for long
        ".splits.parquet.k2j3h4g5.tmp": (old, True),  # untagged (older medbench), unwritten for long
        ".splits.parquet.z9y8x7w6.tmp": (None, False),  # untagged, recent
        "predictions/test.parquet": (old, False),  # not a temporary file
    }
    try:
        paths = {}
        for rel, (mtime, _) in files.items():
            path = run.path / rel.format(dead=dead, alive=alive.pid, me=os.getpid(), host=host)
            path.write_text("x")
            if mtime is not None:
                os.utime(path, (mtime, mtime))
            paths[rel] = path
        with run.claim() as mine:
            assert mine
            assert not left.exists() and (run.path / "history.json").read_text() == "old"
            for rel, (_, removed) in files.items():
                assert paths[rel].exists() != removed, rel
            assert (run.path / ".lock").is_file()
            alive.kill()  # the live writer ends while the run is trained ...
            alive.wait()
    finally:
        alive.kill()
        alive.wait()
    # ... and before the lock is released the folder is checked again
    assert not paths[".metrics.json.abc12345.{alive}@{host}.tmp"].exists()
    assert paths[".config.json.abc12345.{me}@{host}.tmp"].exists()


def test_atomic_writes_name_their_writer(tmp_path: Path) -> None:
    from medbench.utils import writer_gone, writer_tag

    with atomic_path(tmp_path / "result.json") as tmp:
        assert tmp.name.startswith(".result.json.") and tmp.name.endswith(f".{writer_tag()}.tmp")
        assert writer_gone(tmp.name) is False
        tmp.write_text("{}")
    assert writer_gone(".result.json.x.1@elsewhere.tmp") is None and writer_gone(".result.json.x.tmp") is None


# ------------------------------------------------------------------ the runner: resume, failures, locks

@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_tasks(tmp_path_factory.mktemp("tiny-tasks"))


class Messages:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self.on_step = None

    def run_started(self, *a) -> None:
        pass

    def step(self, step: int, loss: float) -> None:
        if self.on_step:
            self.on_step(step)

    def run_finished(self, outcome) -> None:
        pass

    def message(self, text: str) -> None:
        self.lines.append(text)


def make_runner(tasks: Path, out: Path, **kw) -> tuple[Runner, Messages]:
    messages = Messages()
    runner = Runner(Catalog([tasks]), DataLocations(), RunStore(out), reporter=messages,
                    checkpoints=kw.pop("checkpoints", CheckpointPolicy(every_steps=4, every_seconds=None)), **kw)
    return runner, messages


REQ = RunRequest(task="tiny-covidx", backbone="cbr-tiny", seed=0, init="random")


@pytest.fixture(scope="module")
def reference(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One uninterrupted run (with its OOD target), the numbers every resumed run must equal."""
    runner, _ = make_runner(tiny, tmp_path_factory.mktemp("reference"))
    (outcome,) = runner.run_all([REQ])
    assert outcome.status == "ok" and outcome.result["training"]["resumed_from_step"] == 0
    return {"metrics": outcome.result["metrics"], "history": outcome.run_dir.read_json("history.json"),
            "rel": outcome.run_dir.path.relative_to(runner.store.out)}


def test_signal_stops_at_a_step_with_a_checkpoint_and_the_rerun_resumes_exactly(
        tiny: Path, tmp_path: Path, reference: dict) -> None:
    runner, _ = make_runner(tiny, tmp_path)
    before = signal.getsignal(signal.SIGINT)  # the default handler, or SIG_IGN in a worker process that ignores it
    # Ctrl-C during step 6: the runner finishes the step, checkpoints, and stops
    runner.reporter.on_step = lambda step: step == 5 and os.kill(os.getpid(), signal.SIGINT)
    with pytest.raises(StopRequested, match="at step 6/12, checkpoint saved"):
        runner.run_all([REQ])
    run = RunDir(tmp_path / reference["rel"])
    assert run.status is None  # not complete, and not recorded as failed
    assert json.loads((run.checkpoint_dir / "checkpoint.json").read_text())["step"] == 6
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored

    again, messages = make_runner(tiny, tmp_path)
    (outcome,) = again.run_all([REQ])
    assert outcome.status == "ok" and outcome.result["training"]["resumed_from_step"] == 6
    assert any("resuming at step 6" in m for m in messages.lines)
    assert outcome.result["metrics"] == reference["metrics"]
    history = run.read_json("history.json")
    assert {k: history[k] for k in ("step", "loss", "lr", "val_step", "val_metric")} == \
        {k: reference["history"][k] for k in ("step", "loss", "lr", "val_step", "val_metric")}
    assert not run.checkpoint_dir.exists()
    (third,) = make_runner(tiny, tmp_path)[0].run_all([REQ])
    assert third.status == "skipped"


def test_damaged_or_pickled_checkpoint_is_ignored_never_unpickled(tiny: Path, tmp_path: Path, reference: dict) -> None:
    runner, _ = make_runner(tiny, tmp_path)
    runner.reporter.on_step = lambda step: step == 8 and os.kill(os.getpid(), signal.SIGINT)
    with pytest.raises(StopRequested):
        runner.run_all([REQ])
    run = RunDir(tmp_path / reference["rel"])
    marker = tmp_path / "unpickled"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    shared = next(run.checkpoint_dir.glob("*-shared.safetensors"))
    size = shared.stat().st_size
    torch.save({"model": Payload()}, shared)  # a pickle where a safetensors file belongs
    with open(shared, "ab") as f:  # same size as recorded, so only the format check can catch it
        f.write(b"\0" * max(0, size - shared.stat().st_size))
    again, messages = make_runner(tiny, tmp_path)
    (outcome,) = again.run_all([REQ])
    assert not marker.exists()
    assert any("checkpoint not used" in m and "damaged" in m for m in messages.lines), messages.lines
    assert outcome.status == "ok" and outcome.result["training"]["resumed_from_step"] == 0
    assert outcome.result["metrics"] == reference["metrics"]


def _broken_backbone(name: str, error: BaseException, after_calls: int) -> None:
    from medbench.backbones.registry import get_backbone, register_backbone

    tiny_bb = get_backbone("cbr-tiny")

    def build(**kw):
        net = tiny_bb.build(**kw)
        forward = net.forward
        calls = {"n": 0}

        def failing_forward(x):  # the (after_calls + 1)-th training forward fails
            if net.training:
                calls["n"] += 1
                if calls["n"] > after_calls:
                    raise error
            return forward(x)

        net.forward = failing_forward
        return net

    register_backbone(replace(tiny_bb, name=name, build=build), overwrite=True)


def test_failed_runs_are_recorded_and_the_suite_goes_on(tiny: Path, tmp_path: Path) -> None:
    _broken_backbone("oom-net", torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), 3)
    _broken_backbone("buggy-net", ValueError("shapes do not match"), 0)
    requests = [replace(REQ, task="tiny-tb", backbone="oom-net"), replace(REQ, task="tiny-tb", backbone="buggy-net"),
                replace(REQ, task="tiny-tb")]
    runner, _ = make_runner(tiny, tmp_path)
    oom, bug, ok = runner.run_all(requests)
    assert (oom.status, bug.status, ok.status) == ("failed", "failed", "ok")
    record = oom.run_dir.result()
    assert record["status"] == "failed" and record["kind"] == "out-of-memory" and "--micro-batch" in record["hint"]
    assert record["error"] == "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"
    assert "Traceback" in record["traceback"] and record["steps_done"] == 3 and record["checkpoint_step"] is None
    assert bug.run_dir.result()["kind"] == "crash" and bug.run_dir.result()["steps_done"] == 0
    assert [r.path for r in runner.store.completed()] == [ok.run_dir.path]
    # a rerun retries the failed runs (and counts the attempts), never the completed one
    again, _ = make_runner(tiny, tmp_path)
    outcomes = again.run_all(requests)
    assert [o.status for o in outcomes] == ["failed", "failed", "skipped"]
    assert oom.run_dir.result()["attempt"] == 2


def test_fail_fast_stops_after_recording_the_failure(tiny: Path, tmp_path: Path) -> None:
    _broken_backbone("buggy-net", ValueError("shapes do not match"), 0)
    runner, _ = make_runner(tiny, tmp_path, fail_fast=True)
    with pytest.raises(RunFailed, match=r"tiny-tb seed 0 failed: ValueError: shapes do not match \(record: "):
        runner.run_all([replace(REQ, task="tiny-tb", backbone="buggy-net"), replace(REQ, task="tiny-tb")])
    assert len(runner.store.failed()) == 1 and runner.store.completed() == []


def test_a_run_another_process_trains_is_left_alone(tiny: Path, tmp_path: Path, reference: dict) -> None:
    run = RunDir(tmp_path / reference["rel"])
    with run.claim() as mine:
        assert mine
        runner, _ = make_runner(tiny, tmp_path)
        (outcome,) = runner.run_all([REQ])
    assert outcome.status == "busy" and not run.complete and not (run.path / "result.json").exists()


def test_seed_fixes_the_initialisation() -> None:
    """Data order and augmentation are functions of (seed, step) (tests/test_loader.py); init is the seed's too."""
    a, b, c = (create_model("cbr-tiny", num_outputs=2, in_chans=1, seed=s).model for s in (3, 3, 4))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert any(not torch.equal(x, y) for x, y in zip(a.state_dict().values(), c.state_dict().values()))


@pytest.mark.parametrize(("error", "kind"), [
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB"), "out-of-memory"),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"), "out-of-memory"),
    (MemoryError(), "out-of-memory"),
    (RuntimeError("CUDA error: an illegal memory access was encountered"), "device"),
    (RuntimeError("NCCL communicator was aborted on rank 1"), "device"),
    (RunFailed("x", field="--fail-fast"), "input"),
    (KeyError("conv1.weight"), "crash"),
])
def test_failures_are_classified_with_what_to_do(error: BaseException, kind: str) -> None:
    from medbench.run.failures import failure_record

    record = failure_record(error, task="t")
    assert record["kind"] == kind and record["status"] == "failed" and record["task"] == "t"
    assert "\n" not in record["error"] and record["hint"]
