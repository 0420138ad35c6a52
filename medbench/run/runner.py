"""Running a benchmark: tasks x seeds for one backbone, each run through every stage.

task spec -> dataset (+ splits, preprocessing cache) -> backbone -> fine-tune
-> per-sample predictions -> scores -> run folder; then the leaderboard.

This module only orchestrates; each stage lives in its own module.
"""

from __future__ import annotations

import contextlib
import io
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Protocol

import numpy as np
import polars as pl

from medbench.data.locate import DataLocations
from medbench.data.task_data import missing_dataset
from medbench.errors import DataError, OutputError, RunFailed
from medbench.predictions import Predictions
from medbench.run.failures import (
    GracefulStop,
    StopRequested,
    failure_record,
    one_line,
    release_memory,
)
from medbench.run.prepare import PreparedData, prepare_data
from medbench.run.request import RunRequest, _canonical_variant, run_key
from medbench.spec import ResolvedTask
from medbench.spec.catalog import Catalog
from medbench.store import CONFIG, HISTORY, METRICS, RunDir, RunStore
from medbench.train.checkpoint import CheckpointPolicy
from medbench.train.hyperrule import make_plan
from medbench.utils import atomic_write_bytes, undefined_numbers_reported

EVAL_BATCH = 128
CANONICAL_META = ["sample_id", "patient_id", "split", "sex", "age", "view", "site"]


@dataclass
class RunOutcome:
    request: RunRequest
    run_dir: RunDir | None
    status: str  # "ok" | "skipped" (already complete) | "failed" | "busy" (another process trains it)
    result: dict | None = None
    error: str | None = None


class Reporter(Protocol):
    def run_started(self, index: int, total: int, request: RunRequest, steps: int) -> None: ...
    def step(self, step: int, loss: float) -> None: ...
    def run_finished(self, outcome: RunOutcome) -> None: ...
    def message(self, text: str) -> None: ...


class SilentReporter:
    def run_started(self, index: int, total: int, request: RunRequest, steps: int) -> None:
        pass

    def step(self, step: int, loss: float) -> None:
        pass

    def run_finished(self, outcome: RunOutcome) -> None:
        pass

    def message(self, text: str) -> None:
        pass


def _ood_label_pairs(task: ResolvedTask, target: ResolvedTask, label_map: dict[str, str]) -> list[tuple[str, str]]:
    if label_map:
        pairs = [(src, dst) for src, dst in label_map.items()]
    else:
        pairs = [(lab, lab) for lab in task.spec.labels if lab in target.spec.labels]
    bad = [p for p in pairs if p[0] not in task.spec.labels or p[1] not in target.spec.labels]
    if bad:
        raise DataError(f"OOD label map {bad[0][0]!r} -> {bad[0][1]!r} names a label the tasks do not have",
                        where=str(task.path), field="ood.label_map")
    if not pairs:
        raise DataError(f"no label in common with OOD target {target.name!r}; declare ood.label_map",
                        where=str(task.path), field="ood.label_map")
    return pairs


def _prediction_meta(prepared: PreparedData, rows: np.ndarray, extra_columns: list[str]) -> pl.DataFrame:
    table = prepared.data.index.table
    cols = [c for c in CANONICAL_META if c in table.columns]
    cols += [c for c in extra_columns if c in table.columns and c not in cols]
    cols += prepared.data.index.label_columns
    return table[rows.tolist()].select(cols)


def _agree(dist, *flags: bool) -> tuple[bool, ...]:
    """Flags true on any rank are true on every rank (one tiny all-reduce of a CPU tensor on the gloo side
    group: it never waits for the GPU's queued work; nothing in a single process)."""
    if dist.world_size == 1:
        return flags
    import torch
    import torch.distributed as tdist

    from medbench.train.distributed import side_group

    t = torch.tensor([int(f) for f in flags])
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX, group=side_group())
    return tuple(bool(v) for v in t.tolist())


@contextlib.contextmanager
def _node_rank_first(dist):
    """Launched ranks: local rank 0 of each node goes first (it decodes the preprocessing cache and stores the
    split) while the node's other ranks wait, then they open what it built, instead of N processes decoding
    the same images into N temporary copies. A single process: nothing."""
    if dist.world_size == 1:
        yield
        return
    import torch.distributed as tdist

    from medbench.train.distributed import init_process_group, side_group

    init_process_group(dist)
    # the gloo side group with a long timeout: decoding a large dataset outlasts the collectives' minutes
    waiting = side_group()
    if dist.local_rank != 0:
        tdist.barrier(group=waiting)
    try:
        yield
    finally:
        if dist.local_rank == 0:
            tdist.barrier(group=waiting)  # also when its checks failed: the others then fail on the same input


def _barrier(dist) -> None:
    if dist.world_size > 1:
        import torch.distributed as tdist

        tdist.barrier()


class Runner:
    """Executes run requests into a run store.

    Before any training, :meth:`preflight` checks every request (specs,
    metrics, data loaded and cached, OOD targets, engine settings): bad input
    stops the suite there with one error naming the file and field. Then each
    run is skipped when complete, resumed from its checkpoint when interrupted,
    or trained; a run that fails is recorded (``result.json`` with status
    ``failed``) and the suite goes on, unless ``fail_fast``. A full or
    read-only output folder stops the suite (:class:`~medbench.errors.OutputError`).
    """

    def __init__(self, catalog: Catalog, locations: DataLocations, store: RunStore, *,
                 reporter: Reporter | None = None, fail_fast: bool = False,
                 checkpoints: CheckpointPolicy | None = None, execution=None, memory=None):
        self.catalog = catalog
        self.locations = locations
        self.store = store
        self.reporter = reporter or SilentReporter()
        self.fail_fast = fail_fast
        self.checkpoints = checkpoints or CheckpointPolicy()
        #: medbench.train.finetune.Execution (layout, compile, loader workers); None: the device's defaults
        self.execution = execution
        #: the device's memory for --micro-batch auto (medbench.train.memory.DeviceMemory); None: the real one
        self.memory = memory
        self.stop = GracefulStop()  # installed (signal handlers) by run_all
        self._prepared: dict[str, PreparedData] = {}
        self._backbones: dict = {}
        from medbench.store.features import FeatureStore

        self.feature_store = FeatureStore(store.out)

    def prepared(self, task_name: str, resolution: int | None = None) -> PreparedData:
        key = task_name if resolution is None else f"{task_name}@{resolution}"
        if key not in self._prepared:
            self._prepared[key] = prepare_data(self.catalog.task(task_name), self.locations, self.reporter,
                                               split_store=self.store.out / "splits", resolution=resolution)
        return self._prepared[key]

    def backbone(self, name: str):
        """The registry entry of ``name``, resolved once per runner (the request keeps the name: it is part
        of the run key)."""
        if name not in self._backbones:
            from medbench.backbones import get_backbone

            self._backbones[name] = get_backbone(name)
        return self._backbones[name]

    def _ood_target(self, task: ResolvedTask, target, resolution: int | None = None
                    ) -> tuple[ResolvedTask, PreparedData, list[tuple[str, str]]]:
        """An OOD target's task, prepared data and label pairs, checked against the source task."""
        if target.task not in self.catalog.task_names():
            from medbench.errors import SpecError
            from medbench.utils import did_you_mean

            raise SpecError(f"unknown OOD target task {target.task!r}{did_you_mean(target.task, self.catalog.task_names())}",
                            where=str(task.path), field="ood.task")
        tgt_task = self.catalog.task(target.task)
        pairs = _ood_label_pairs(task, tgt_task, target.label_map)
        tgt = self.prepared(target.task, resolution)
        src = self.prepared(task.name, resolution)
        # grey images may be cached with one channel for a 3-channel network: the networks' channels must agree
        if tgt.images.size != src.images.size or tgt.channels != src.channels:
            raise DataError(f"OOD target {target.task!r} is cached at {tgt.images.size}px/{tgt.channels}ch, "
                            f"the task at {src.images.size}px/{src.channels}ch; give both the same input "
                            f"(input: {{resize: {src.images.size}, crop: {src.crop}, channels: "
                            f"{src.channels}}} in {tgt_task.path})", where=str(task.path), field="ood")
        return tgt_task, tgt, pairs

    def preflight(self, requests: list[RunRequest]) -> None:
        """Check every request before anything trains; raises a MedbenchError naming file and field."""
        from medbench.scoring import check_metrics
        from medbench.train.distributed import prepare_environment
        from medbench.train.finetune import check_engine

        from medbench.data.checks import check_task_data

        dist = prepare_environment()
        with _node_rank_first(dist):  # launched: one process per node builds the caches, then the others
            for name in dict.fromkeys(r.task for r in requests):
                task = self.catalog.task(name)
                check_metrics(task.spec.metrics, task.spec.type, where=str(task.path))
                if task.spec.splits.evaluation_only:
                    raise DataError(f"task {name!r} is evaluation-only (splits.fractions: {{test: 1}}): it is scored "
                                    "as another task's OOD target (ood: [{task: " + name + "}]), never trained",
                                    where=str(task.path), field="splits.fractions")
                prepared = self.prepared(name)
                check_task_data(prepared.data)  # attributes, one-class splits: one line, before any training
                if len(prepared.train_rows(task.spec.type)) == 0:
                    raise DataError("no labelled training image", where=str(task.path), field="labels")
                for target in task.spec.ood:
                    if target.task in self.catalog.task_names() and \
                            missing_dataset(self.catalog.task(target.task), self.locations) is not None:
                        continue  # skipped (and recorded) when the run gets there
                    self._ood_target(task, target)
            from medbench.backbones.init import preflight as check_init_and_weights

            checked_pooling: set = set()
            for req in requests:
                backbone = self.backbone(req.backbone)
                task = self.catalog.task(req.task)
                spec = task.spec
                # the one weights preflight (fine-tuning and probes alike): every file read, finite, and
                # loadable into the architecture (meta device) before anything runs; files already checked
                # in this process are skipped
                check_init_and_weights(backbone, req.init, req.weights, in_chans=(spec.input.channels,))
                if req.protocol is not None:
                    self._check_probe(req, task, backbone, dist, checked_pooling)
                    continue
                plan = make_plan(len(self.prepared(req.task).train_rows(spec.type)), spec.hyperrule,
                                 max_steps=req.max_steps)
                check_engine(plan, req.engine, dist)

    def _check_probe(self, req: RunRequest, task: ResolvedTask, backbone, dist, checked: set) -> None:
        """A probe request can run: a validation split to choose on, a pooling the network has, a precision
        the device has (before anything runs)."""
        from medbench.backbones.pooling import check_pooling
        from medbench.errors import UsageError

        req = _canonical_variant(req, backbone)
        prepared = self.prepared(req.task, req.resolution)
        if len(prepared.rows("val")) == 0:
            raise DataError(f"the {req.protocol} probe chooses its {'regularisation' if req.protocol == 'linear' else 'k'} "
                            "on the validation split, and this task has no validation image; give splits a val "
                            "fraction", where=str(task.path), field="splits")
        if req.engine.precision == "fp16" and not dist.device.startswith("cuda"):
            raise UsageError("fp16 needs a CUDA device; use --precision bf16 or fp32 on CPU", field="--precision")
        what = (backbone.name, req.pooling, task.spec.input.channels, prepared.crop)
        if what not in checked:
            check_pooling(backbone, req.pooling, in_chans=task.spec.input.channels, size=prepared.crop)
            checked.add(what)

    def run_all(self, requests: list[RunRequest]) -> list[RunOutcome]:
        outcomes = []
        with GracefulStop() as stop:
            self.stop = stop
            self.preflight(requests)
            for i, req in enumerate(requests):
                stop.check(f"before {req.task} seed {req.seed}")
                try:
                    outcome = self.run_one(req, i, len(requests))
                except (KeyboardInterrupt, OutputError):
                    raise
                except Exception as err:  # failed before its run folder was known: reported, not stored
                    if self.fail_fast:
                        raise
                    outcome = RunOutcome(req, None, "failed", error=one_line(err), result=failure_record(err))
                self.reporter.run_finished(outcome)
                outcomes.append(outcome)
                if outcome.status == "failed" and self.fail_fast:
                    where = f" (record: {outcome.run_dir.path / 'result.json'})" if outcome.run_dir else ""
                    raise RunFailed(f"{req.task} seed {req.seed} failed: {outcome.error}{where}", field="--fail-fast")
        return outcomes

    def locate(self, req: RunRequest, *, world_size: int | None = None) -> RunDir:
        """The run folder ``req`` trains into when run by ``world_size`` processes (default: as this process
        runs it); the dispatcher uses it to reuse finished runs without starting a job."""
        return self._locate(req, world_size)[-1]

    def _locate(self, req: RunRequest, world_size: int | None = None) -> tuple:
        """(canonical request, task, init, prepared data, training rows, variant record, plan, key, run folder)."""
        from medbench.backbones.weights import weights_sha256
        from medbench.train.distributed import prepare_environment

        task = self.catalog.task(req.task)
        spec = task.spec
        backbone = self.backbone(req.backbone)
        req = _canonical_variant(req, backbone)
        init = req.init or backbone.default_init
        prepared = self.prepared(req.task, req.resolution)
        world = world_size or prepare_environment().world_size
        train_rows = prepared.train_rows(spec.type)
        variant = _variant_record(req, prepared, train_rows)
        if variant is not None and "rows" in variant:
            train_rows = variant.pop("rows")
        probe = req.protocol is not None
        plan = None if probe else make_plan(len(train_rows), spec.hyperrule, max_steps=req.max_steps)
        ood = []
        for target in spec.ood:
            if missing_dataset(self.catalog.task(target.task), self.locations) is not None:
                ood.append([target.display_name, "skipped"])
                continue
            tgt_task, tgt, _ = self._ood_target(task, target, req.resolution)
            ood.append([target.display_name, tgt_task.hash, tgt.fingerprint])
        # a probe's numbers do not depend on the world size (each feature part is computed whole by one
        # rank, the fit by rank 0): its key holds the probe's settings in place of a training plan
        key = run_key(replace(req, init=init), task, prepared.fingerprint,
                      weights_sha256(req.weights) if req.weights else None,
                      plan=_probe_settings(req.protocol) if probe else plan.as_dict(),
                      input_geometry={"resize": prepared.resize, "crop": prepared.crop,
                                      "channels": spec.input.channels},
                      ood=ood, world_size=1 if probe else world,
                      execution=None if probe else
                      (self.execution or self._execution(prepare_environment())).key_fields())
        run = self.store.run_dir(req.task, req.backbone, init, req.seed, key, variant=req.folder_suffix)
        return req, task, init, prepared, train_rows, variant, plan, key, run

    def run_one(self, req: RunRequest, index: int = 0, total: int = 1) -> RunOutcome:
        from medbench.train.distributed import prepare_environment

        req, task, init, prepared, train_rows, variant, plan, key, run = self._locate(req)
        dist = prepare_environment()
        if run.complete:
            if dist.is_main:
                run.clear_checkpoint()  # left behind by a kill between result.json and its removal
                from medbench.store.scores import rescore_outdated

                rescore_outdated([run], self.reporter.message)  # scored by older scoring code: from its predictions
            return RunOutcome(req, run, "skipped", result=run.result())
        # rank 0 holds the lock for all ranks of a launched run; every rank learns whether it got it
        if dist.world_size > 1:
            from medbench.train.distributed import init_process_group

            init_process_group(dist)
        claim = run.claim() if dist.is_main else contextlib.nullcontext(True)
        with claim as claimed:
            (busy,) = _agree(dist, not claimed)
            if busy:
                return RunOutcome(req, run, "busy", error="another medbench process is training this run")
            progress: dict = {"steps_done": 0, "resumed_from_step": 0, "checkpoint_step": None}
            try:
                with self.stop.deferred():
                    if req.protocol is not None:
                        return self._probe_and_write(req, run, key, task, init, prepared, train_rows, variant,
                                                     dist, progress, index, total)
                    return self._train_and_write(req, run, key, task, init, prepared, train_rows, variant, plan,
                                                 dist, progress, index, total)
            except (KeyboardInterrupt, SystemExit, OutputError):
                raise  # not the run's fault: its checkpoint stays and the next invocation resumes it
            except Exception as err:
                from medbench.provenance import now_utc

                record = failure_record(err, key=key, task=task.name, backbone=req.backbone, init=init,
                                        seed=req.seed, failed_at=now_utc(), **progress)
                del err
                release_memory()
                if dist.is_main:
                    run.write_failure(record)
                return RunOutcome(req, run, "failed", result=record, error=record["error"])

    def _resume(self, run: RunDir, key: str, build, dist, store) -> tuple:
        """(tuner, history, start step): from the run's checkpoint when there is a usable one."""
        from medbench.train.checkpoint import CheckpointUnusable
        from medbench.train.finetune import History

        tuner = build()
        if not tuner.supports_checkpoints:
            return tuner, History(), 0
        store.remove_partial_files()
        problem = None
        ckpt = None
        try:
            ckpt = store.load(key=key)
            if ckpt is not None:
                history = History.from_dict(ckpt.meta["history"])
                if len(history.step) != ckpt.step:
                    raise ValueError(f"history has {len(history.step)} steps, the checkpoint {ckpt.step}")
                tuner.load_training_state(ckpt.step, ckpt.shared, ckpt.local)
        except (CheckpointUnusable, ValueError, KeyError, TypeError) as err:
            problem = err
        (any_problem,) = _agree(dist, problem is not None)  # every rank resumes, or none does
        if any_problem:
            self.reporter.message(f"{run.path}: checkpoint not used ({problem or 'unusable on another rank'}); "
                                  "training from step 0")
            _barrier(dist)
            if dist.is_main:
                store.clear()
            return build(), History(), 0  # a fresh network: a failed load may have changed some tensors
        if ckpt is None:
            return tuner, History(), 0
        self.reporter.message(f"{run.path.name}: resuming at step {ckpt.step}")
        return tuner, history, ckpt.step

    def _execution(self, dist):
        """The run's Execution: the one given, else the device's defaults (channels-last on CUDA)."""
        from medbench.train.finetune import Execution

        return self.execution if self.execution is not None else Execution.default_for(dist.device)

    def _auto_micro_batch(self, req: RunRequest, spec, backbone, prepared: PreparedData, plan, dist, model, memory,
                          execution) -> dict:
        """``--micro-batch auto``: the stored choice for this setting on this device type, or a new one
        (memory model + trial step, medbench.train.memory) stored in the run store for the next runs."""
        from medbench.provenance import now_utc
        from medbench.train.memory import choose_micro_batch
        from medbench.utils import atomic_write_json, sha256_json

        per_device = plan.batch_size // dist.world_size
        setting = {"task": req.task, "task_hash": self.catalog.task(req.task).hash, "backbone": req.backbone,
                   "crop": prepared.crop, "channels": spec.input.channels, "device": memory.describe(),
                   "precision": req.engine.precision, "zero_stage": req.engine.zero_stage,
                   "world_size": dist.world_size, "per_device_batch": per_device, "freeze": req.freeze,
                   "channels_last": execution.channels_last}
        path = self.store.micro_batch_file(sha256_json(setting)[:24])
        record = _read_json(path)
        usable = record is not None and record.get("setting") == setting and isinstance(record.get("micro_batch"), int) \
            and not isinstance(record["micro_batch"], bool) and 1 <= record["micro_batch"] <= per_device \
            and per_device % record["micro_batch"] == 0  # else (an edited file) chosen again
        (missing,) = _agree(dist, not usable)  # every rank reads before any writes; all choose, or none
        if not missing:
            model.to(dist.device)
            memory.attach(model)  # (choose_micro_batch attaches it itself)
            return {**record, "path": str(path)}
        choice = choose_micro_batch(model, backbone, per_device_batch=per_device, num_outputs=spec.num_outputs,
                                    channels=spec.input.channels, crop=prepared.crop, task_type=spec.type,
                                    device=dist.device, precision=req.engine.precision,
                                    zero_stage=req.engine.zero_stage, world_size=dist.world_size, memory=memory,
                                    channels_last=execution.channels_last)
        micro = _min_over_ranks(dist, choice.micro_batch)  # launched: what fits every rank's device
        record = {"setting": setting, "micro_batch": micro, "chosen": choice.as_dict(), "chosen_at": now_utc(),
                  "halved": []}
        if dist.is_main:
            atomic_write_json(path, record)
        self.reporter.message(f"{req.task}: --micro-batch auto chose {micro} ({per_device // micro} accumulation "
                              f"steps) on {choice.device}")
        return {**record, "path": str(path)}

    def _record_halving(self, record: dict, micro: int, smaller: int, run: RunDir, where: str, error: str) -> None:
        """An out-of-memory error at ``micro``: the stored choice becomes ``smaller`` for this and later runs."""
        from medbench.provenance import now_utc
        from medbench.utils import atomic_write_json

        record["micro_batch"] = smaller
        record.setdefault("halved", []).append({"from": micro, "to": smaller, "run": run.path.name, "at": where,
                                                "error": error, "date": now_utc()})
        atomic_write_json(Path(record["path"]), {k: v for k, v in record.items() if k != "path"})

    def _train_and_write(self, req: RunRequest, run: RunDir, key: str, task: ResolvedTask, init: str,
                         prepared: PreparedData, train_rows: np.ndarray, variant: dict | None, plan, dist,
                         progress: dict, index: int, total: int) -> RunOutcome:
        import torch

        from medbench.backbones.create import create_model
        from medbench.data.loader import Normalization, TrainStream, eval_batches
        from medbench.provenance import now_utc
        from medbench.train.checkpoint import CheckpointClock, CheckpointStore
        from medbench.train.data_parallel import gather_shards, shard, wait_for_all
        from medbench.train.finetune import Finetuner, predict_logits
        from medbench.train.memory import device_memory, halved, is_out_of_memory

        spec = task.spec
        backbone = self.backbone(req.backbone)
        val_rows, test_rows = prepared.rows("val"), prepared.rows("test")
        if dist.is_main:
            run.path.mkdir(parents=True, exist_ok=True)
        built = freeze_info = None
        execution = self._execution(dist)
        workers = execution.loader_workers or _loader_workers()
        auto = req.engine.micro_batch_size == "auto"
        memory = self.memory or device_memory(dist.device)
        micro_record: dict = {}  # --micro-batch auto: the stored choice this run trains with

        def build():
            nonlocal built, freeze_info
            built = create_model(backbone, num_outputs=spec.num_outputs, in_chans=spec.input.channels,
                                 init=init, weights=req.weights, seed=req.seed)
            freeze_info = _apply_freeze(built.model, backbone, req.freeze)
            engine = req.engine
            if auto:
                micro_record.update(self._auto_micro_batch(req, spec, backbone, prepared, plan, dist, built.model,
                                                           memory, execution))
                engine = replace(engine, micro_batch_size=micro_record["micro_batch"])
            else:
                memory.attach(built.model)
            return Finetuner(built.model, plan, spec.type, engine, dist, req.seed, execution)

        store = CheckpointStore(run.checkpoint_dir, rank=dist.rank, world_size=dist.world_size,
                                barrier=lambda: _barrier(dist))
        norm = Normalization(backbone.mean, backbone.std)
        stream = TrainStream(prepared.images.pixels, prepared.labels, train_rows, batch_size=plan.batch_size,
                             crop=prepared.crop, hflip=spec.input.hflip, norm=norm, seed=req.seed,
                             balanced=spec.sampler == "balanced", rank=dist.rank, world_size=dist.world_size,
                             mixup_alpha=plan.mixup_alpha,  # MixUp over the global batch, any world size
                             channels=spec.input.channels)  # a grey 1-channel cache broadcast on the device
        tuner = None

        def eval_batch() -> int:
            """Inference batch: EVAL_BATCH, at most 4 training micro-batches under --micro-batch auto (a forward
            without autograd keeps far less per image than training; images are independent in eval mode)."""
            return min(EVAL_BATCH, 4 * tuner.micro) if auto else EVAL_BATCH

        def logits_for(rows: np.ndarray, pixels: np.ndarray, crop: int) -> np.ndarray:
            """Logits ``[len(rows), outputs]`` (float32; probabilities are derived in float64 where scores are
            computed, see medbench.predictions); launched, each rank predicts its shard of the rows."""
            mine = rows[shard(len(rows), dist.world_size, dist.rank)]
            logits = np.zeros((0, spec.num_outputs), dtype=np.float32)
            if len(mine):
                logits = predict_logits(tuner.module, eval_batches(pixels, mine, crop=crop, norm=norm,
                                                                  batch_size=eval_batch(), device=dist.device,
                                                                  channels=spec.input.channels, workers=workers),
                                        dist.device, req.engine.precision)
            return gather_shards(logits, len(rows), dist.world_size)

        headline = spec.headline
        attrs = [a.source_column for a in spec.attributes]
        val_pred_meta = _prediction_meta(prepared, val_rows, attrs)
        final_val: dict = {}  # the validation logits after the last step, when fit evaluated them

        def evaluate_val() -> float | None:
            if len(val_rows) == 0:
                return None
            from medbench.scoring import compute_metrics

            logits = logits_for(val_rows, prepared.images.pixels, prepared.crop)
            if progress["steps_done"] == plan.total_steps:  # fit's final evaluation (after_step ran last)
                final_val["logits"] = logits
            preds = Predictions.from_logits(val_pred_meta, logits, spec.labels, spec.type)
            return compute_metrics(preds, [headline]).get(headline)

        clock = CheckpointClock(self.checkpoints)
        can_save = self.checkpoints.enabled and req.engine.precision != "fp16"  # Finetuner.supports_checkpoints

        def after_step(step: int) -> None:
            done = step + 1
            progress["steps_done"] = done
            save, stop = _agree(dist, can_save and clock.due(done), self.stop.requested)
            # a stop always checkpoints (even with periodic checkpoints off): it costs one write
            if tuner.supports_checkpoints and (save or stop):
                tuner.sync()  # the losses of the steps so far into the history (raises if training diverged)
                shared, local = tuner.training_state()
                store.save(done, shared, local, key=key, meta={"history": history.as_dict()})
                clock.saved()
                progress["checkpoint_step"] = done
            if stop:
                saved = "checkpoint saved" if tuner.supports_checkpoints else "fp16 runs are not checkpointed"
                raise StopRequested(self.stop.signum or 2,
                                    f"in {req.task} seed {req.seed} at step {done}/{plan.total_steps}, {saved}")

        started = now_utc()
        while True:
            tuner, history, start = self._resume(run, key, build, dist, store)
            progress.update(resumed_from_step=start, steps_done=start, checkpoint_step=start or None)
            if auto and (not history.micro_batch or history.micro_batch[-1]["micro_batch"] != tuner.micro):
                history.micro_batch.append({"from_step": start, "micro_batch": tuner.micro})
            self.reporter.run_started(index, total, req, plan.total_steps)
            try:
                history = tuner.fit(stream.iterate(start, plan.total_steps, device=dist.device, workers=workers),
                                    history=history, evaluate=evaluate_val, eval_every=plan.eval_every,
                                    on_step=self.reporter.step, after_step=after_step, premixed=True)
                break
            except Exception as err:
                smaller = halved(tuner.micro, plan.batch_size // dist.world_size) if auto else None
                if not (auto and is_out_of_memory(err)) or smaller is None:
                    raise
                where = f"step {progress['steps_done'] + 1}"
                self._record_halving(micro_record, tuner.micro, smaller, run, where, one_line(err))
                if dist.world_size > 1:  # the other ranks wait in a collective: fail; the rerun uses the halved one
                    raise
                failed_micro = tuner.micro
            # out of the except block, so the exception's frames (holding the failed step's tensors) are gone
            self.reporter.message(f"{run.path.name}: out of memory at micro-batch {failed_micro} ({where}); "
                                  f"halved to {smaller}, resuming from the last checkpoint")
            tuner = built = None
            release_memory()

        # every rank predicts its shard of val, test and each OOD target's test split; rank 0 writes and scores
        # while the others wait on the long-timeout side group (a failure on rank 0 is recorded, then released)
        split_logits = {"val": final_val.get("logits"), "test": None}
        for split, rows in (("val", val_rows), ("test", test_rows)):
            if split_logits[split] is None:
                split_logits[split] = logits_for(rows, prepared.images.pixels, prepared.crop)
        ood_logits: dict[str, np.ndarray] = {}
        for target in spec.ood:
            if missing_dataset(self.catalog.task(target.task), self.locations) is None:
                tgt = self._ood_target(task, target, req.resolution)[1]
                ood_logits[target.display_name] = logits_for(tgt.rows("test"), tgt.images.pixels, prepared.crop)
        if not dist.is_main:
            wait_for_all(dist.world_size)
            return RunOutcome(req, run, "ok")
        try:
            if req.similarity:
                _write_similarity(run, req, init, spec, tuner.module, backbone, test_rows,
                                  lambda rows: eval_batches(prepared.images.pixels, rows, crop=prepared.crop,
                                                            norm=norm, batch_size=eval_batch(), device=dist.device,
                                                            channels=spec.input.channels), dist.device)
            micro_batch = _micro_batch_record(tuner, history, micro_record)
            config_extra = {"plan": plan.as_dict(), "engine": asdict(req.engine), "micro_batch": micro_batch,
                            "execution": execution.as_dict(), "world_size": dist.world_size}
            result_extra = {
                **({"regime": _regime(req.freeze), "freeze": freeze_info} if req.freeze else {}),
                "train_seconds": history.seconds,
                "training": {"resumed_from_step": progress["resumed_from_step"],
                             "checkpoints": self.checkpoints.describe() if can_save else "off",
                             "micro_batch": micro_batch},
            }
            provenance_extra = {"engine": asdict(req.engine), "execution": execution.as_dict(),
                                "torch_deterministic": torch.are_deterministic_algorithms_enabled()}
            result = self._write_run(req, run, key, task, init, prepared, train_rows, variant, split_logits, ood_logits,
                                     config_extra=config_extra, result_extra=result_extra,
                                     model_provenance=built.provenance(), provenance_extra=provenance_extra,
                                     history=history.as_dict(), started=started, dist=dist)
            run.clear_checkpoint()
            return RunOutcome(req, run, "ok", result=result)
        finally:
            wait_for_all(dist.world_size)

    def _probe_and_write(self, req: RunRequest, run: RunDir, key: str, task: ResolvedTask, init: str,
                         prepared: PreparedData, train_rows: np.ndarray, variant: dict | None, dist,
                         progress: dict, index: int, total: int) -> RunOutcome:
        """A linear or kNN probe: frozen features of train, val, test and each OOD target's test split (from the
        feature cache, computed where missing, sharded over the ranks), the probe fitted on rank 0 with its
        hyper-parameter chosen on val, then the run written like a fine-tuned one."""
        import time

        from medbench.probe.protocols import protocol_name
        from medbench.provenance import now_utc
        from medbench.train.data_parallel import wait_for_all

        spec = task.spec
        backbone = self.backbone(req.backbone)
        if dist.is_main:
            run.path.mkdir(parents=True, exist_ok=True)
        self.reporter.run_started(index, total, req, 0)
        started = now_utc()
        clock = time.perf_counter()
        lazy = _LazyModel(self, req, backbone, spec, init, dist)
        usage = {"embedded_images": 0, "cached_images": 0, "embed_seconds": 0.0, "entries": []}
        train_all = prepared.rows("train")
        sets = [(task.name, prepared, "train", train_all), (task.name, prepared, "val", prepared.rows("val")),
                (task.name, prepared, "test", prepared.rows("test"))]
        targets = []
        for target in spec.ood:
            if missing_dataset(self.catalog.task(target.task), self.locations) is None:
                tgt = self._ood_target(task, target, req.resolution)[1]
                sets.append((target.task, tgt, "test", tgt.rows("test")))
                targets.append(target.display_name)
        feats = [self._features(req, init, backbone, name, data, split, rows, crop=prepared.crop, model=lazy,
                                dist=dist, usage=usage) for name, data, split, rows in sets]
        if not dist.is_main:
            wait_for_all(dist.world_size)
            return RunOutcome(req, run, "ok")
        try:
            (f_train, manifest), (f_val, _), (f_test, _) = feats[:3]
            position = np.full(int(train_all.max()) + 1 if len(train_all) else 0, -1, dtype=np.int64)
            position[train_all] = np.arange(len(train_all))
            x_train, y_train = f_train[position[train_rows]], prepared.labels[train_rows]
            fit_started = time.perf_counter()
            predict, record = _fit_probe(req.protocol, x_train, y_train, spec, f_val, self._selection(task, prepared),
                                         dist.device)
            split_logits = {"val": predict(f_val), "test": predict(f_test)}
            ood_logits = {name: predict(f) for name, (f, _) in zip(targets, feats[3:])}
            fit_seconds = time.perf_counter() - fit_started
            pooling = manifest.get("pooling") or {}
            probe_block = {"protocol": req.protocol, "pooling": pooling, "features": {
                "dim": int(f_train.shape[1]), "embedded_images": usage["embedded_images"],
                "cached_images": usage["cached_images"], "embed_seconds": usage["embed_seconds"],
                "entries": usage["entries"]}, **record, "fit_seconds": fit_seconds}
            config_extra = {"probe": {**_probe_settings(req.protocol), "pooling": pooling.get("name"),
                                      "precision": req.engine.precision}}
            result_extra = {"protocol": protocol_name(req.protocol), "probe": probe_block,
                            "train_seconds": time.perf_counter() - clock}
            return RunOutcome(req, run, "ok", result=self._write_run(
                req, run, key, task, init, prepared, train_rows, variant, split_logits, ood_logits,
                config_extra=config_extra, result_extra=result_extra, model_provenance=manifest.get("model") or {},
                provenance_extra={"engine": {"precision": req.engine.precision, "training": None}}, history=None,
                started=started, dist=dist))
        finally:
            wait_for_all(dist.world_size)

    def _selection(self, task: ResolvedTask, prepared: PreparedData):
        """The probes' choice on the validation split: the task's headline (signed so higher is better), and
        validation NLL (negated) where the headline is undefined for every candidate."""
        from medbench.probe.selection import Selection
        from medbench.scoring import compute_metrics, higher_is_better

        spec = task.spec
        meta = _prediction_meta(prepared, prepared.rows("val"), [a.source_column for a in spec.attributes])

        def criterion(metric: str, sign: float):
            def score(logits: np.ndarray) -> float | None:
                preds = Predictions.from_logits(meta, logits, spec.labels, spec.type)
                value = compute_metrics(preds, [metric]).get(metric)
                return None if value is None else sign * float(value)
            return metric, score

        sign = 1.0 if higher_is_better(spec.headline) else -1.0
        return Selection(primary=criterion(spec.headline, sign), fallback=criterion("nll", -1.0))

    def _features(self, req: RunRequest, init: str, backbone, task_name: str, data: PreparedData, split: str,
                  rows: np.ndarray, *, crop: int, model: "_LazyModel", dist, usage: dict) -> tuple:
        """(features ``[len(rows), D]``, manifest) of ``rows`` from the feature cache, computing the missing parts
        (each rank the parts ``i % world == rank``; rank 0 checks them and completes the entry); on other ranks
        (None, None)."""
        import time

        from medbench.backbones.pooling import pooling_name
        from medbench.backbones.weights import weights_sha256
        from medbench.data.loader import Normalization
        from medbench.probe.features import embed_rows, extractor_identity
        from medbench.store.features import FeatureCacheDamaged, rows_digest
        from medbench.train.data_parallel import wait_for_all

        weights = model.weights_file()
        spec = {"extractor": extractor_identity(backbone=backbone.name, init=init,
                                                weights_sha256=weights_sha256(weights) if weights else None,
                                                seed=req.seed, pooling=pooling_name(req.pooling),
                                                precision=req.engine.precision, mean=backbone.mean, std=backbone.std),
                "data": {"dataset": data.data.index.name, "fingerprint": data.fingerprint,
                         "pixels": data.images.path.name if data.images.path is not None else "in memory",
                         "split": split, "rows": rows_digest(rows), "n": int(len(rows)), "resize": data.images.size,
                         "crop": crop, "channels": data.channels}}  # the network's (a grey cache may hold 1)
        entry = self.feature_store.entry(task=task_name, backbone=backbone.name, split=split, spec=spec,
                                         n_rows=len(rows), world_size=dist.world_size)
        norm = Normalization(backbone.mean, backbone.std)
        for attempt in range(2):
            lock = entry.lock(wait_message=self.reporter.message) if dist.is_main else contextlib.nullcontext()
            with lock:
                wait_for_all(dist.world_size)  # the others start once rank 0 holds the entry
                computed = 0
                if not entry.complete:
                    if dist.is_main:
                        entry.write_spec()
                    missing = set(entry.missing_parts())
                    todo = [i for i in range(entry.n_parts) if i % dist.world_size == dist.rank and i in missing]
                    if todo:
                        n = sum(entry.part_range(i)[1] - entry.part_range(i)[0] for i in todo)
                        self.reporter.message(f"{task_name} {split}: computing {backbone.name} features of {n} images")
                    started = time.perf_counter()
                    for i in todo:
                        if self.stop.requested:
                            from medbench.run.failures import StopRequested

                            raise StopRequested(self.stop.signum or 2, f"in {req.task} seed {req.seed} while computing "
                                                f"{split} features (finished parts kept)")
                        a, b = entry.part_range(i)
                        entry.write_part(i, embed_rows(model.get(), data.images.pixels, rows[a:b], crop=crop,
                                                       norm=norm, pooling=req.pooling, device=dist.device,
                                                       precision=req.engine.precision, batch_size=EVAL_BATCH,
                                                       channels=data.channels,
                                                       workers=self._execution(dist).loader_workers or
                                                       _loader_workers()),
                                         meta={"rank": dist.rank, "world_size": dist.world_size})
                        computed += b - a
                    usage["embed_seconds"] += time.perf_counter() - started
                    wait_for_all(dist.world_size)
                    if dist.is_main:
                        from medbench.provenance import now_utc

                        entry.finish({"pooling": {"name": pooling_name(req.pooling)}, "model": model.provenance(),
                                      "task": task_name, "split": split, "computed": now_utc(),
                                      "device": dist.device})
                    wait_for_all(dist.world_size)
            usage["embedded_images"] += computed
            if not dist.is_main:
                return None, None
            try:
                features, manifest = entry.load()
            except FeatureCacheDamaged as err:
                entry.discard(parts=True)
                if attempt == 0 and dist.world_size == 1:
                    self.reporter.message(f"{entry.path}: {err}; computing the damaged parts again")
                    continue
                raise
            usage["cached_images"] += len(rows) - computed
            usage["entries"].append(str(entry.path.relative_to(self.store.out)))
            return features, manifest
        raise AssertionError("unreachable")

    def _write_run(self, req: RunRequest, run: RunDir, key: str, task: ResolvedTask, init: str,
                   prepared: PreparedData, train_rows: np.ndarray, variant: dict | None,
                   split_logits: dict[str, np.ndarray], ood_logits: dict[str, np.ndarray], *, config_extra: dict,
                   result_extra: dict, model_provenance: dict, provenance_extra: dict, history: dict | None,
                   started: str, dist) -> dict:
        """Rank 0 writes a finished run (fine-tuned or probed) the one way: per-sample predictions (logits) of
        val, test and every OOD target (``ood_logits``: the model's outputs on the target's test rows, mapped
        here through the label pairs), config, history (fine-tuning), splits, scores, and ``result.json``
        last."""
        from medbench.provenance import code_provenance, now_utc
        from medbench.store.scores import rescore
        from medbench.train.distributed import describe_device
        from medbench.train.numerics import TRAINING_NUMERICS

        spec = task.spec
        headline = spec.headline
        attrs = [a.source_column for a in spec.attributes]
        val_rows, test_rows = prepared.rows("val"), prepared.rows("test")
        for split, rows in (("val", val_rows), ("test", test_rows)):
            Predictions.from_logits(_prediction_meta(prepared, rows, attrs), split_logits[split],
                                    spec.labels, spec.type).save(run.prediction_file(split))

        ood_records = []
        for target in spec.ood:
            tgt_task = self.catalog.task(target.task)
            absent = missing_dataset(tgt_task, self.locations)
            if absent is not None:  # OOD is an extra axis: a target without data is skipped and recorded
                self.reporter.message(f"{task.name}: OOD target {target.display_name!r} skipped: {absent}")
                ood_records.append({"name": target.display_name, "task": target.task, "skipped": absent})
                continue
            tgt_task, tgt, pairs = self._ood_target(task, target, req.resolution)
            rows = tgt.rows("test")
            src_idx = [spec.labels.index(s) for s, _ in pairs]
            meta = _prediction_meta(tgt, rows, attrs)
            keep_cols = [c for c in meta.columns if not c.startswith("label:")]
            meta = meta.select(keep_cols).with_columns(
                **{f"label:{s}": tgt.data.index.table[rows.tolist()][f"label:{d}"] for s, d in pairs})
            # the mapped labels' logits; multiclass: their softmax is the probability renormalized over the
            # mapped classes, and target images of an unmapped class are not labelled (medbench.predictions)
            Predictions.from_logits(meta, ood_logits[target.display_name][:, src_idx], [s for s, _ in pairs],
                                    spec.type).save(run.prediction_file(f"ood-{target.display_name}"))
            ood_records.append({"name": target.display_name, "task": target.task, "task_hash": tgt_task.hash,
                                "label_pairs": pairs, "n": int(len(rows)), "data_fingerprint": tgt.fingerprint})

        fingerprint = prepared.fingerprint
        config = {
            "key": key,
            "training_numerics": TRAINING_NUMERICS,
            "request": {**asdict(req), "init": init, "weights": str(req.weights) if req.weights else None},
            "task": task.name,
            "task_version": spec.version,
            "task_hash": task.hash,
            "task_source": task.source,
            "task_spec": spec.model_dump(mode="json"),
            "backbone": req.backbone,
            "init": init,
            "seed": req.seed,
            **({"protocol": req.protocol} if req.protocol else {}),
            **{k: v for k, v in config_extra.items() if k in ("plan", "probe")},
            "input": {"resize": prepared.resize, "crop": prepared.crop, "channels": spec.input.channels},
            **{k: v for k, v in config_extra.items() if k not in ("plan", "probe")},
            "ood_targets": ood_records,
            "variant": variant,
            "data": {
                "dataset": spec.dataset.name,
                "fingerprint": fingerprint,
                "n": {"train": int(len(train_rows)), "val": int(len(val_rows)), "test": int(len(test_rows))},
                "patients": {s: int(prepared.data.index.table.filter(pl.col("split") == s)["patient_id"].n_unique())
                             for s in ("train", "val", "test")},
                "skipped_images": len(prepared.images.bad),
                "split": prepared.data.split_source,
            },
        }
        run.write_json(CONFIG, config)
        if history is not None:
            run.write_json(HISTORY, history)
        buf = io.BytesIO()
        prepared.data.split_table().write_parquet(buf)
        atomic_write_bytes(run.path / "splits.parquet", buf.getvalue())
        with undefined_numbers_reported():  # undefined values are recorded as such in the scores
            scores = rescore(run)
        result_extra = dict(result_extra)
        before = {k: result_extra.pop(k) for k in ("regime", "freeze", "protocol", "pooling", "probe")
                  if k in result_extra}
        result = {
            "status": "ok",
            "key": key,
            "task": task.name,
            "backbone": req.backbone,
            "init": init,
            "seed": req.seed,
            "variant": variant,
            **before,
            "headline": {"metric": headline, "value": scores["test"].get(headline)},
            "warnings": scores.get("warnings", []),
            "metrics": scores,
            "started": started,
            "finished": now_utc(),
            **result_extra,
            "provenance": {
                **code_provenance(),
                "task_version": spec.version,
                "task_hash": task.hash,
                "data_fingerprint": fingerprint,
                "model": model_provenance,
                "device": describe_device(dist),
                **provenance_extra,
            },
        }
        run.write_json(METRICS, scores)
        run.write_result(result)  # last: marks the run complete
        return result



def _probe_settings(protocol: str) -> dict:
    """What fixes a probe's fit beside its features (in the run key in place of a training plan)."""
    from medbench.probe import knn, linear

    return {"linear": linear.settings, "knn": knn.settings}[protocol]()


def _fit_probe(protocol: str, x_train: np.ndarray, y_train: np.ndarray, spec, x_val: np.ndarray, selection,
               device: str):
    """(predict: features -> logits, record) of the fitted probe (an empty split predicts nothing)."""
    if protocol == "linear":
        from medbench.probe.linear import fit_linear_probe

        probe, record = fit_linear_probe(x_train, y_train, spec.type, x_val, selection, device=device)
        fitted = probe.logits
    else:
        from medbench.probe.knn import fit_knn_probe, vote_logits

        knn, k, record = fit_knn_probe(x_train, y_train, spec.type, x_val, selection, device=device)
        fitted = lambda x: vote_logits(knn.predict_proba(x, [k])[k], spec.type)  # noqa: E731

    def predict(x: np.ndarray) -> np.ndarray:
        return fitted(x) if len(x) else np.zeros((0, spec.num_outputs))

    return predict, record


class _LazyModel:
    """The frozen network of a probe run, built on first use only (cached features need none)."""

    def __init__(self, runner: "Runner", req: RunRequest, backbone, spec, init: str, dist):
        self.runner, self.req, self.backbone, self.spec, self.init, self.dist = runner, req, backbone, spec, init, dist
        self.built = None
        self._weights: list = []

    def weights_file(self):
        """The weights file the network is built from (resolved once; None when the init reads none)."""
        if not self._weights:
            from medbench.backbones.init import preflight

            self._weights.append(preflight(self.backbone, self.init, self.req.weights)[1])
        return self._weights[0]

    def get(self):
        if self.built is None:
            from medbench.backbones.create import create_model

            self.built = create_model(self.backbone, num_outputs=self.spec.num_outputs,
                                      in_chans=self.spec.input.channels, init=self.init, weights=self.weights_file(),
                                      seed=self.req.seed)
            self.built.model.to(self.dist.device)
        return self.built.model

    def provenance(self) -> dict:
        self.get()
        return self.built.provenance()


def _variant_record(req: RunRequest, prepared: PreparedData, train_rows: np.ndarray) -> dict | None:
    """The variant of a run as recorded in config/result (with the training rows of a data subset)."""
    from medbench.data.subsets import fraction_subset, shots_subset

    spec = req.variant_spec()
    if spec is None:
        return None
    table = prepared.data.index.table
    if spec["kind"] == "resolution":
        return {**spec, "resize": prepared.resize, "crop": prepared.crop}
    if spec["kind"] == "fraction":
        rows = fraction_subset(table, train_rows, req.fraction, req.seed)
        extra: dict = {}
    else:
        rows, per_class = shots_subset(table, prepared.labels, train_rows, req.shots, req.seed,
                                       prepared.data.task.spec.type, prepared.data.task.spec.labels)
        extra = {"per_class": per_class}
    patients = int(table[rows.tolist()]["patient_id"].n_unique())
    return {**spec, "n_train": int(len(rows)), "n_train_full": int(len(train_rows)), "patients": patients,
            **extra, "rows": rows}


def _regime(freeze: str | None) -> str:
    from medbench.train.freeze import freeze_variant

    return freeze_variant(freeze)


def _apply_freeze(model, backbone, freeze: str | None) -> dict | None:
    if not freeze:
        return None
    from medbench.train.freeze import apply_freeze

    return apply_freeze(model, backbone, freeze)


def _write_similarity(run: RunDir, req: RunRequest, init: str, spec, tuned, backbone, test_rows: np.ndarray,
                      batches, device: str) -> None:
    """similarity.json + similarity.png: per-block similarity of the initial and the fine-tuned network.

    The initial network is built again (create_model is a pure function of its arguments and the seed), so
    nothing is held during training and a resumed run compares against the same network."""
    from medbench.analysis.similarity import (
        compare_models,
        parse_methods,
        sample_rows,
        similarity_record,
        write_run_similarity,
    )
    from medbench.backbones.blocks import block_names
    from medbench.backbones.create import create_model

    initial = create_model(backbone, num_outputs=spec.num_outputs, in_chans=spec.input.channels, init=init,
                           weights=req.weights, seed=req.seed).model
    methods = parse_methods(req.similarity)
    rows = sample_rows(test_rows)
    layers = compare_models(initial.to(device), tuned, block_names(backbone, tuned), lambda: batches(rows),
                            methods=methods, device=device)
    title = f"{req.task} · {req.backbone} · {init}" + (f" · freeze {req.freeze}" if req.freeze else "")
    write_run_similarity(run.path, similarity_record(layers, methods, len(rows)), title=title)


def _micro_batch_record(tuner, history, auto: dict) -> dict:
    """The micro-batch a run trained with: per device, the accumulation steps, and for ``--micro-batch auto``
    the micro-batch from each step on and the stored choice (how it was made, halvings)."""
    out = {"per_device": tuner.micro, "accumulation": tuner.gas}
    if auto:
        out.update(requested="auto", steps=history.micro_batch,
                   choice={k: v for k, v in auto.items() if k != "path"})
    return out


def _min_over_ranks(dist, value: int) -> int:
    """The smallest of the ranks' values (on the gloo side group; the value itself in a single process)."""
    if dist.world_size == 1:
        return value
    import torch
    import torch.distributed as tdist

    from medbench.train.distributed import side_group

    t = torch.tensor([value])
    tdist.all_reduce(t, op=tdist.ReduceOp.MIN, group=side_group())
    return int(t.item())


def _read_json(path) -> dict | None:
    import json

    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError, RecursionError):  # unreadable, not JSON, or nested past the interpreter's limit
        return None
    return data if isinstance(data, dict) else None


def _loader_workers() -> int:
    """Threads copying cache rows for the input path: half of this process's cores, 1 to 4 (each copies
    several GB/s; docs/performance.md)."""
    from medbench.train.distributed import cores_per_rank

    return max(1, min(4, cores_per_rank() // 2))


def configure_torch(threads: int | None = None, deterministic: bool = True) -> None:
    """Thread count and determinism switches for this process (see docs on GPU nondeterminism)."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        # deterministic mode also NaN-fills every new uninitialised tensor, a debugging aid that no kernel
        # medbench runs needs (each writes all of its output): off, the numbers are bit-identical and a
        # CPU training step of the smoke suite is 1.25-1.8x faster (docs/performance.md)
        import torch.utils.deterministic

        torch.utils.deterministic.fill_uninitialized_memory = False
