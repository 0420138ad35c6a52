"""Running a benchmark: tasks x seeds for one backbone, each run through every stage.

task spec -> dataset (+ splits, preprocessing cache) -> backbone -> fine-tune
-> per-sample predictions -> scores -> run folder; then the leaderboard.

This module only orchestrates; each stage lives in its own module.
"""

from __future__ import annotations

import os
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import polars as pl

from medbench.catalog import Catalog
from medbench.data.cache import CachedImages, build_cache
from medbench.data.locate import DataLocations
from medbench.data.task_data import TaskData, load_task_data
from medbench.errors import DataError, MedbenchError
from medbench.predictions import Predictions
from medbench.results import CONFIG, HISTORY, METRICS, RunDir, RunStore
from medbench.specs import ResolvedTask
from medbench.train.finetune import EngineConfig
from medbench.train.hyperrule import make_plan, resolve_input
from medbench.utils import sha256_json

EVAL_BATCH = 128
CANONICAL_META = ["sample_id", "patient_id", "split", "sex", "age", "view", "site"]


@dataclass(frozen=True)
class RunRequest:
    task: str
    backbone: str
    seed: int
    init: str | None = None
    weights: Path | None = None
    max_steps: int | None = None
    engine: EngineConfig = field(default_factory=EngineConfig)
    #: frozen features (medbench.train.freeze): None, "head" or "<L>"
    freeze: str | None = None
    #: representation similarity initial vs fine-tuned (medbench.analysis.similarity): None, "cka", "cka,svcca"
    similarity: str | None = None


@dataclass
class RunOutcome:
    request: RunRequest
    run_dir: RunDir | None
    status: str  # "ok" | "skipped" (already complete) | "failed"
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


@dataclass
class PreparedData:
    """A task's data ready for training: splits, cached pixels, labels, input geometry."""

    data: TaskData
    images: CachedImages
    labels: np.ndarray  # float32 [N, L], NaN missing
    resize: int
    crop: int

    def rows(self, split: str) -> np.ndarray:
        rows = self.data.rows(split)
        return rows[self.images.ok[rows]]

    def train_rows(self, task_type: str) -> np.ndarray:
        rows = self.rows("train")
        y = self.labels[rows]
        labelled = ~np.isnan(y).all(1) if task_type != "multiclass" else ~np.isnan(y).any(1)
        return rows[labelled]


def native_size(index) -> tuple[int, int]:
    img = index.read_image(0)
    return int(img.shape[0]), int(img.shape[1])


def prepare_data(task: ResolvedTask, locations: DataLocations, reporter: Reporter) -> PreparedData:
    data = load_task_data(task, locations)
    spec = task.spec
    need_native = spec.input.resize is None or spec.input.crop is None
    resize, crop = resolve_input(spec.input, native_size(data.index) if need_native else None)
    images = build_cache(data.index, resize, spec.input.channels, on_bad_image=spec.dataset.on_bad_image)
    if images.bad:
        reporter.message(f"{task.name}: {len(images.bad)} unreadable images left out (first: {images.bad[0]['path']})")
    return PreparedData(data=data, images=images, labels=data.index.labels(), resize=resize, crop=crop)


def run_key(request: RunRequest, task: ResolvedTask, fingerprint: str, weights_id: str | None) -> str:
    import medbench

    return sha256_json({
        "task_hash": task.hash,
        "data": fingerprint,
        "backbone": request.backbone,
        "init": request.init,
        "weights": weights_id,
        "seed": request.seed,
        "max_steps": request.max_steps,
        "engine": asdict(request.engine),
        "medbench": medbench.__version__,
        # only when set, so the keys of runs without them do not change
        **({"freeze": request.freeze} if request.freeze else {}),
        **({"similarity": request.similarity} if request.similarity else {}),
    })


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


class Runner:
    """Executes run requests into a run store; one failing run does not stop the others."""

    def __init__(self, catalog: Catalog, locations: DataLocations, store: RunStore, *,
                 reporter: Reporter | None = None, fail_fast: bool = False):
        self.catalog = catalog
        self.locations = locations
        self.store = store
        self.reporter = reporter or SilentReporter()
        self.fail_fast = fail_fast
        self._prepared: dict[str, PreparedData] = {}

    def prepared(self, task_name: str) -> PreparedData:
        if task_name not in self._prepared:
            self._prepared[task_name] = prepare_data(self.catalog.task(task_name), self.locations, self.reporter)
        return self._prepared[task_name]

    def run_all(self, requests: list[RunRequest]) -> list[RunOutcome]:
        outcomes = []
        for i, req in enumerate(requests):
            try:
                outcome = self.run_one(req, i, len(requests))
            except MedbenchError as err:
                if self.fail_fast:
                    raise
                outcome = RunOutcome(req, None, "failed", error=str(err))
            except Exception as err:  # a crash in one run is recorded; the suite goes on
                if self.fail_fast:
                    raise
                outcome = RunOutcome(req, None, "failed", error=f"{type(err).__name__}: {err}",
                                     result={"traceback": traceback.format_exc()})
            self.reporter.run_finished(outcome)
            outcomes.append(outcome)
        return outcomes

    def run_one(self, req: RunRequest, index: int = 0, total: int = 1) -> RunOutcome:
        import torch

        from medbench.backbones.create import create_model
        from medbench.backbones.registry import get_backbone
        from medbench.backbones.weights import weights_sha256
        from medbench.data.loader import Normalization, TrainStream, eval_batches
        from medbench.provenance import code_provenance, now_utc
        from medbench.scoring import check_metrics
        from medbench.scoring.runs import rescore
        from medbench.train.distributed import describe_device, prepare_environment
        from medbench.train.finetune import Finetuner, logits_to_probs, predict_logits

        task = self.catalog.task(req.task)
        spec = task.spec
        check_metrics(spec.metrics, spec.type, where=str(task.path))
        backbone = get_backbone(req.backbone)
        req = _canonical_variant(req, backbone)
        init = req.init or backbone.default_init
        prepared = self.prepared(req.task)
        fingerprint = prepared.data.index.fingerprint()
        weights_id = weights_sha256(req.weights) if req.weights else None
        key = run_key(RunRequest(**{**asdict(req), "init": init, "engine": req.engine}), task, fingerprint, weights_id)
        from medbench.train.freeze import freeze_variant

        run = self.store.run_dir(req.task, req.backbone, init, req.seed, key, variant=freeze_variant(req.freeze))
        if run.complete:
            return RunOutcome(req, run, "skipped", result=run.result())

        dist = prepare_environment()
        train_rows = prepared.train_rows(spec.type)
        val_rows, test_rows = prepared.rows("val"), prepared.rows("test")
        plan = make_plan(len(train_rows), spec.hyperrule, max_steps=req.max_steps)
        self.reporter.run_started(index, total, req, plan.total_steps)

        built = create_model(req.backbone, num_outputs=spec.num_outputs, in_chans=spec.input.channels,
                             init=init, weights=req.weights, seed=req.seed)
        freeze_info = _apply_freeze(built.model, backbone, req.freeze)
        norm = Normalization(backbone.mean, backbone.std)
        stream = TrainStream(prepared.images.pixels, prepared.labels, train_rows, batch_size=plan.batch_size,
                             crop=prepared.crop, hflip=spec.input.hflip, norm=norm, seed=req.seed,
                             balanced=spec.sampler == "balanced", rank=dist.rank, world_size=dist.world_size)
        tuner = Finetuner(built.model, plan, spec.type, req.engine, dist, req.seed)

        def probs_for(rows: np.ndarray, pixels: np.ndarray, crop: int) -> np.ndarray:
            logits = predict_logits(tuner.module, eval_batches(pixels, rows, crop=crop, norm=norm,
                                                              batch_size=EVAL_BATCH), dist.device,
                                    req.engine.precision)
            return logits_to_probs(spec.type, logits)

        headline = spec.headline
        val_pred_meta = _prediction_meta(prepared, val_rows, [a.source_column for a in spec.attributes])

        def evaluate_val() -> float | None:
            if len(val_rows) == 0:
                return None
            from medbench.scoring import compute_metrics

            preds = Predictions.build(val_pred_meta, probs_for(val_rows, prepared.images.pixels, prepared.crop),
                                      spec.labels, spec.type)
            return compute_metrics(preds, [headline]).get(headline)

        eval_every = max(1, plan.total_steps // 10)
        started = now_utc()
        history = tuner.fit(stream.iterate(0, plan.total_steps), evaluate=evaluate_val, eval_every=eval_every,
                            on_step=self.reporter.step)

        if not dist.is_main:
            return RunOutcome(req, run, "ok")
        run.path.mkdir(parents=True, exist_ok=True)
        attrs = [a.source_column for a in spec.attributes]
        for split, rows in (("val", val_rows), ("test", test_rows)):
            Predictions.build(_prediction_meta(prepared, rows, attrs),
                              probs_for(rows, prepared.images.pixels, prepared.crop),
                              spec.labels, spec.type).save(run.prediction_file(split))
        if req.similarity:
            _write_similarity(run, req, init, spec, tuner.module, backbone, test_rows,
                              lambda rows: eval_batches(prepared.images.pixels, rows, crop=prepared.crop, norm=norm,
                                                        batch_size=EVAL_BATCH), dist.device)

        ood_records = []
        for target in spec.ood:
            tgt_task = self.catalog.task(target.task)
            tgt = self.prepared(target.task)
            pairs = _ood_label_pairs(task, tgt_task, target.label_map)
            if tgt.images.size != prepared.images.size or tgt.images.channels != prepared.images.channels:
                raise DataError(f"OOD target {target.task!r} is cached at {tgt.images.size}px/{tgt.images.channels}ch, "
                                f"the task at {prepared.images.size}px/{prepared.images.channels}ch; align their input:",
                                where=str(task.path), field="ood")
            rows = tgt.rows("test")
            probs = probs_for(rows, tgt.images.pixels, prepared.crop)
            src_idx = [spec.labels.index(s) for s, _ in pairs]
            meta = _prediction_meta(tgt, rows, attrs)
            keep_cols = [c for c in meta.columns if not c.startswith("label:")]
            meta = meta.select(keep_cols).with_columns(
                **{f"label:{s}": tgt.data.index.table[rows.tolist()][f"label:{d}"] for s, d in pairs})
            sub_probs = probs[:, src_idx]
            if spec.type == "multiclass":
                sub_probs = sub_probs / sub_probs.sum(1, keepdims=True)
            Predictions.build(meta, sub_probs, [s for s, _ in pairs], spec.type).save(
                run.prediction_file(f"ood-{target.display_name}"))
            ood_records.append({"name": target.display_name, "task": target.task, "task_hash": tgt_task.hash,
                                "label_pairs": pairs, "n": int(len(rows)),
                                "data_fingerprint": tgt.data.index.fingerprint()})

        config = {
            "key": key,
            "request": {**asdict(req), "init": init, "weights": str(req.weights) if req.weights else None},
            "task": task.name,
            "task_version": spec.version,
            "task_hash": task.hash,
            "task_source": task.source,
            "task_spec": spec.model_dump(mode="json"),
            "backbone": req.backbone,
            "init": init,
            "seed": req.seed,
            "plan": plan.as_dict(),
            "input": {"resize": prepared.resize, "crop": prepared.crop, "channels": spec.input.channels},
            "engine": asdict(req.engine),
            "ood_targets": ood_records,
            "data": {
                "dataset": spec.dataset.name,
                "fingerprint": fingerprint,
                "n": {"train": int(len(train_rows)), "val": int(len(val_rows)), "test": int(len(test_rows))},
                "patients": {s: int(prepared.data.index.table.filter(pl.col("split") == s)["patient_id"].n_unique())
                             for s in ("train", "val", "test")},
                "skipped_images": len(prepared.images.bad),
            },
        }
        run.write_json(CONFIG, config)
        run.write_json(HISTORY, history.as_dict())
        split_path = run.path / "splits.parquet"
        prepared.data.split_table().write_parquet(split_path)
        scores = rescore(run)
        result = {
            "status": "ok",
            "key": key,
            "task": task.name,
            "backbone": req.backbone,
            "init": init,
            "seed": req.seed,
            **({"variant": freeze_variant(req.freeze), "freeze": freeze_info} if req.freeze else {}),
            "headline": {"metric": headline, "value": scores["test"].get(headline)},
            "metrics": scores,
            "started": started,
            "finished": now_utc(),
            "train_seconds": history.seconds,
            "provenance": {
                **code_provenance(),
                "task_version": spec.version,
                "task_hash": task.hash,
                "data_fingerprint": fingerprint,
                "model": built.provenance(),
                "device": describe_device(dist),
                "engine": asdict(req.engine),
                "torch_deterministic": torch.are_deterministic_algorithms_enabled(),
            },
        }
        run.write_json(METRICS, scores)
        run.write_json("result.json", result)  # last: marks the run complete
        return RunOutcome(req, run, "ok", result=result)


def _canonical_variant(req: RunRequest, backbone) -> RunRequest:
    """``freeze``/``similarity`` validated and spelled one way, so equal settings give equal run keys."""
    if not req.freeze and not req.similarity:
        return req
    from dataclasses import replace

    from medbench.analysis.similarity import parse_methods
    from medbench.train.freeze import parse_freeze

    return replace(req, freeze=parse_freeze(req.freeze, backbone),
                   similarity=",".join(parse_methods(req.similarity)) or None)


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
    from medbench.analysis.similarity import (compare_models, parse_methods, sample_rows, similarity_record,
                                              write_run_similarity)
    from medbench.backbones.blocks import block_names
    from medbench.backbones.create import create_model

    initial = create_model(req.backbone, num_outputs=spec.num_outputs, in_chans=spec.input.channels, init=init,
                           weights=req.weights, seed=req.seed).model
    methods = parse_methods(req.similarity)
    rows = sample_rows(test_rows)
    layers = compare_models(initial.to(device), tuned, block_names(backbone, tuned), lambda: batches(rows),
                            methods=methods, device=device)
    title = f"{req.task} · {req.backbone} · {init}" + (f" · freeze {req.freeze}" if req.freeze else "")
    write_run_similarity(run.path, similarity_record(layers, methods, len(rows)), title=title)


def configure_torch(threads: int | None = None, deterministic: bool = True) -> None:
    """Thread count and determinism switches for this process (see docs on GPU nondeterminism)."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def expand_requests(tasks: list[str], backbone: str, seeds: list[int], *, init: str | None, weights: Path | None,
                    max_steps: int | None, engine: EngineConfig, freeze: str | None = None,
                    similarity: str | None = None) -> list[RunRequest]:
    return [RunRequest(task=t, backbone=backbone, seed=s, init=init, weights=weights, max_steps=max_steps,
                       engine=engine, freeze=freeze, similarity=similarity) for t in tasks for s in seeds]
