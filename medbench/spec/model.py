"""Task and suite specs: the pydantic models of the YAML files and the task content hash.

Reading the files (``include:`` merging, errors naming the file that wrote a value) is
:mod:`medbench.spec.loader`; finding tasks and suites is :mod:`medbench.spec.catalog`.

A task's content hash (:func:`task_content_hash`) covers what fixes its
numbers, not how the file is spelled (see there).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from medbench.limits import (
    MAX_BATCH,
    MAX_BINS,
    MAX_IMAGES,
    MAX_INTERSECTIONS,
    MAX_LR,
    MAX_PIXELS,
    MAX_RESAMPLES,
    MAX_SEED,
    MAX_SEEDS,
    MAX_STEPS,
    MAX_VALIDATION_POINTS,
)
from medbench.paths import name_problem
from medbench.utils import sha256_json

TaskType = Literal["binary", "multiclass", "multilabel"]
#: evaluation protocols (medbench.probe.protocols): fine-tuning, a linear probe or kNN on frozen features
Protocol = Literal["finetune", "linear", "knn"]

# Bounds of every number a spec (or the command line) can set: medbench.limits, one place for both.
# Floats must be finite everywhere (``.inf``/``.nan`` are refused at parse time, naming the field).


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False, allow_inf_nan=False)


def _non_finite(value: Any, path: str = "") -> str | None:
    """The dotted path of the first non-finite float in a nested value (adapter options), or None."""
    import math

    if isinstance(value, float) and not math.isfinite(value):
        return path or "(value)"
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, (list, tuple)):
        items = enumerate(value)
    else:
        return None
    for key, sub in items:
        found = _non_finite(sub, f"{path}.{key}" if path else str(key))
        if found:
            return found
    return None


class DatasetSpec(_Strict):
    #: data-location key: ``--data NAME=PATH`` / ``MEDBENCH_DATA_<NAME>`` / ``<data-root>/<NAME>``; a plain
    #: name (one folder name: no ``/``, no ``..``, not absolute), so a task file cannot name a folder
    #: outside the data root (the path rule: :func:`medbench.paths.name_problem`)
    name: str
    #: the layout reader, a module of ``medbench.data.adapters``
    adapter: str
    #: adapter-specific options, validated by the adapter
    options: dict[str, Any] = Field(default_factory=dict)
    #: a corrupt or missing image: stop (``fail``) or leave it out and count it (``skip``)
    on_bad_image: Literal["fail", "skip"] = "fail"

    @field_validator("name")
    @classmethod
    def _plain_name(cls, v: str) -> str:
        problem = name_problem(v)
        if problem:
            raise ValueError(f"{problem}; a dataset name is a folder name under --data-root (use --data "
                             "NAME=PATH to point a dataset elsewhere)")
        return v

    @field_validator("options")
    @classmethod
    def _finite_options(cls, v: dict[str, Any]) -> dict[str, Any]:
        bad = _non_finite(v)
        if bad:
            raise ValueError(f"option {bad} is not a finite number; expected a finite number")
        return v


class SplitSpec(_Strict):
    #: ``official``: the publisher's split column (val carved from train by group when absent);
    #: ``grouped``: every group (patient / lesion) assigned to one split (see medbench.data.splits)
    method: Literal["official", "grouped"] = "grouped"
    group_by: str = "patient_id"
    #: image fractions of ``grouped``; ``{test: 1}`` makes the task evaluation-only (an external test set:
    #: scored as another task's OOD target, never trained)
    fractions: dict[Literal["train", "val", "test"], float] = Field(
        default_factory=lambda: {"train": 0.7, "val": 0.1, "test": 0.2}
    )
    #: ``grouped`` (and validation carved from an official train split): label-stratified iterative
    #: assignment of whole groups, so every split gets each label's prevalence; false: the groups in seeded
    #: hash order cut at the fractions, labels ignored
    stratify: bool = True
    #: with ``official``: fraction of the official train groups held out as validation when the
    #: publisher ships no validation split
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    #: with ``official``: what the publisher calls each split, e.g. ``{valid: test}``
    rename: dict[str, Literal["train", "val", "test", "drop"]] = Field(default_factory=dict)
    #: the split seed is part of the task, never of the run: reruns and other backbones see the same split
    seed: int = Field(0, ge=0, le=MAX_SEED)
    #: with ``official``, when the copy at hand carries no official split (e.g. NIH without its list files):
    #: ``error``, or ``grouped`` with ``fractions``
    fallback: Literal["error", "grouped"] = "error"

    @field_validator("fractions")
    @classmethod
    def _fractions_sum_to_one(cls, v: dict[str, float]) -> dict[str, float]:
        if any(x < 0 for x in v.values()):
            raise ValueError("fractions must be >= 0")
        total = sum(v.values())
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"fractions must sum to 1 (they sum to {total:g})")
        if v.get("test", 0) <= 0:
            raise ValueError("fractions need test > 0")
        if v.get("train", 0) <= 0 and v.get("val", 0) > 0:
            raise ValueError("an evaluation-only task (train: 0) has no validation split; use fractions: {test: 1}")
        return v

    @property
    def evaluation_only(self) -> bool:
        """The whole dataset is a test set (``fractions: {test: 1}`` with ``grouped``): never trained."""
        return self.method == "grouped" and self.fractions.get("train", 0) <= 0


class InputSpec(_Strict):
    #: images are resized (squashed) to ``resize`` x ``resize`` once, into the cache; null: BiT-HyperRule
    #: by native size (area < 96x96: 160, else 512)
    resize: int | None = Field(None, ge=8, le=MAX_PIXELS)
    #: training random crop / evaluation size; null: BiT-HyperRule (128 or 480)
    crop: int | None = Field(None, ge=8, le=MAX_PIXELS)
    channels: Literal[1, 3] = 3
    hflip: bool = True

    @model_validator(mode="after")
    def _crop_fits(self) -> "InputSpec":
        if self.resize is not None and self.crop is not None and self.crop > self.resize:
            raise ValueError(f"crop ({self.crop}) must not exceed resize ({self.resize})")
        return self


class HyperRuleSpec(_Strict):
    """Overrides of BiT-HyperRule (see :mod:`medbench.train.hyperrule`); null keeps the rule."""

    batch_size: int = Field(512, ge=1, le=MAX_BATCH)
    #: learning rate at batch 512; scaled linearly with ``batch_size``
    base_lr: float = Field(0.003, gt=0, le=MAX_LR)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0, le=1)
    #: explicit [warm-up end, decay, decay, decay, end] in steps, instead of the rule's choice by size
    schedule: list[int] | None = None
    #: multiply the rule's step boundaries (e.g. 0.1 for a quick variant)
    schedule_scale: float = Field(1.0, gt=0, le=1000)
    mixup_alpha: float | None = Field(None, ge=0, le=100)
    #: adaptive gradient clipping factor (CJ21); null: off
    agc_clip: float | None = Field(None, gt=0, le=100)
    #: validation evaluations during training, evenly spaced (the convergence axis, M21 Fig. 3); each is a
    #: forward pass over the validation split. Not part of BiT-HyperRule's optimisation
    validation_points: int = Field(10, ge=1, le=MAX_VALIDATION_POINTS)

    @field_validator("schedule")
    @classmethod
    def _five_increasing(cls, v: list[int] | None) -> list[int] | None:
        if v is None:
            return v
        if len(v) != 5 or any(b <= a for a, b in zip(v, v[1:])) or v[0] < 0:
            raise ValueError("schedule must be 5 increasing step counts [warm-up, decay, decay, decay, end]")
        if v[-1] > MAX_STEPS:
            raise ValueError(f"schedule must end by step {MAX_STEPS:,}, got {v[-1]:,}")
        return v


class AttributeSpec(_Strict):
    """A subgroup attribute: a table column, optionally binned (e.g. age)."""

    name: str
    column: str | None = None
    #: bin edges for a numeric column; a value v falls in [edge_i, edge_i+1)
    bins: list[float] | None = None

    @property
    def source_column(self) -> str:
        return self.column or self.name

    @field_validator("bins")
    @classmethod
    def _increasing(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and (len(v) < 2 or any(b <= a for a, b in zip(v, v[1:]))):
            raise ValueError("bins must be at least two increasing edges")
        return v


class OODTargetSpec(_Strict):
    """Another task whose test split scores this task's model (distribution shift)."""

    task: str
    #: this task's label -> the target's label (harmonization); labels absent on both sides are skipped
    label_map: dict[str, str] = Field(default_factory=dict)
    name: str | None = None

    @property
    def display_name(self) -> str:
        return self.name or self.task


class ScoringSpec(_Strict):
    """How scores are computed from predictions (``medbench score`` options override these)."""

    #: bootstrap resamples for confidence intervals (0: no intervals)
    bootstrap: int = Field(1000, ge=0, le=MAX_RESAMPLES)
    #: confidence level of the percentile intervals
    ci_level: float = Field(0.95, gt=0, lt=1)
    #: seed of the resamples; fixed so every run of a task draws the same resamples (paired comparisons)
    bootstrap_seed: int = Field(0, ge=0, le=MAX_SEED)
    #: calibration bins: ``uniform`` (equal width) or ``adaptive`` (equal mass)
    ece_bins: int = Field(15, ge=1, le=MAX_BINS)
    ece_binning: Literal["uniform", "adaptive"] = "uniform"
    #: fairness operating threshold, chosen per label on the validation split: ``youden`` (max TPR - FPR)
    #: or ``sensitivity`` (the highest threshold reaching ``target_sensitivity``)
    threshold: Literal["youden", "sensitivity"] = "youden"
    target_sensitivity: float = Field(0.9, gt=0, le=1)
    #: subgroups with fewer test images are reported with their size and status ``too_small``, not scored
    min_group_size: int = Field(20, ge=1, le=MAX_IMAGES)
    #: subgroups are crossed up to this many attributes (2: every pair; 1: single attributes only)
    intersections: int = Field(2, ge=1, le=MAX_INTERSECTIONS)


class TaskSpec(_Strict):
    task: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]*$")
    #: bump when the task's meaning changes (part of the content hash, like every field that fixes numbers)
    version: Union[int, str]
    #: informational (listing, grouping); not in the content hash
    family: str
    #: informational; not in the content hash
    description: str = ""
    #: informational; not in the content hash
    citation: str | None = None
    dataset: DatasetSpec
    type: TaskType
    labels: list[str] = Field(min_length=1)
    splits: SplitSpec = Field(default_factory=SplitSpec)
    input: InputSpec = Field(default_factory=InputSpec)
    #: scores computed on the test split; names from :mod:`medbench.scoring`
    metrics: list[str] = Field(default_factory=lambda: ["auc", "accuracy"])
    #: the metric that ranks backbones on the leaderboard
    headline: str = "auc"
    attributes: list[AttributeSpec] = Field(default_factory=list)
    ood: list[OODTargetSpec] = Field(default_factory=list)
    hyperrule: HyperRuleSpec = Field(default_factory=HyperRuleSpec)
    #: training sampler: ``balanced`` oversamples minority classes (COVIDx)
    sampler: Literal["uniform", "balanced"] = "uniform"
    #: seeds run when ``--seeds`` is not given (the protocol's 5; fewer for quick suites); how many runs,
    #: not what one run computes: not in the content hash
    default_seeds: int = Field(5, ge=1, le=MAX_SEEDS)
    #: training images in the publisher's release, for ``--dry-run`` planning without the data; not in the
    #: content hash
    expected_train_size: int | None = Field(None, ge=1, le=MAX_IMAGES)
    #: how scores, intervals, fairness thresholds and calibration bins are computed
    scoring: ScoringSpec = Field(default_factory=ScoringSpec)
    #: the evaluation protocols run when neither ``--protocol`` nor a suite says otherwise (default:
    #: fine-tuning only); which runs are made, not what one run computes: not in the content hash
    protocols: list[Protocol] | None = Field(None, min_length=1)

    @field_validator("attributes", mode="before")
    @classmethod
    def _short_attributes(cls, v: Any) -> Any:
        if isinstance(v, list):
            return [{"name": a} if isinstance(a, str) else a for a in v]
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "TaskSpec":
        if len(set(self.labels)) != len(self.labels):
            raise ValueError("labels must be unique")
        if self.type == "binary" and len(self.labels) != 1:
            raise ValueError("a binary task has exactly one label (the positive class)")
        if self.type == "multiclass" and len(self.labels) < 2:
            raise ValueError("a multiclass task needs at least two labels")
        if self.headline not in self.metrics:
            raise ValueError(f"headline {self.headline!r} must be one of metrics {self.metrics}")
        return self

    @property
    def num_outputs(self) -> int:
        return 1 if self.type == "binary" else len(self.labels)


class VariantRuns(_Strict):
    """Data-efficiency and resolution runs besides a task's plain runs (``--fractions``/``--shots``/
    ``--resolutions``, or a suite's ``variants:``)."""

    #: percentages of the training images, in (0, 100] (100 is the plain run itself)
    fractions: list[float] = Field(default_factory=list)
    #: training images per class (medbench.data.subsets)
    shots: list[int] = Field(default_factory=list)
    #: other crop sizes in px (the task's own crop is the plain run)
    resolutions: list[int] = Field(default_factory=list)

    @field_validator("fractions")
    @classmethod
    def _percentages(cls, v: list[float]) -> list[float]:
        bad = [x for x in v if not 0 < x <= 100]
        if bad:
            raise ValueError(f"percentages must be in (0, 100], got {bad[0]:g}")
        return v

    @field_validator("shots", "resolutions")
    @classmethod
    def _in_range(cls, v: list[int], info) -> list[int]:
        shots = info.field_name == "shots"
        low, high, unit = (1, MAX_IMAGES, "") if shots else (8, MAX_PIXELS, " px")
        for x in v:
            if not low <= x <= high:
                bound = f">= {low}" if x < low else f"<= {high}"
                raise ValueError(f"{info.field_name} must be {bound}{unit}, got {x}")
        return v

    def runs(self) -> list[dict]:
        """The variants as ``RunRequest`` fields (``{"fraction": 0.25}``, ``{"shots": 10}``, ...)."""
        return ([{"fraction": pct / 100} for pct in self.fractions if pct < 100]
                + [{"shots": k} for k in self.shots] + [{"resolution": r} for r in self.resolutions])


class SuiteVariants(VariantRuns):
    """Variant runs a suite adds for some of its tasks, as the command-line options would for every task:
    data-efficiency and resolution points that belong to the suite's leaderboard."""

    tasks: list[str] = Field(min_length=1)


class SuiteSpec(_Strict):
    suite: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]*$")
    description: str = ""
    tasks: list[str] = Field(default_factory=list)
    #: other suites whose tasks are included, in order
    suites: list[str] = Field(default_factory=list)
    #: variant runs for some of the tasks (data efficiency, resolution), besides each task's plain runs
    variants: list[SuiteVariants] = Field(default_factory=list)
    #: the evaluation protocols of every task of the suite (nested suites included), unless ``--protocol``
    #: says otherwise; null: each task's own ``protocols`` (default fine-tuning)
    protocols: list[Protocol] | None = Field(None, min_length=1)


#: TaskSpec fields that never reach a run's numbers: left out of the content hash. ``family``,
#: ``description`` and ``citation`` are for people; ``default_seeds`` and ``protocols`` say which runs a
#: suite makes (each run's seed and protocol are in its own key); ``expected_train_size`` only feeds
#: ``--dry-run``.
HASH_EXCLUDED_FIELDS = frozenset({"family", "description", "citation", "default_seeds", "expected_train_size",
                                  "protocols"})


def task_content_hash(spec: TaskSpec) -> str:
    """sha256 of what fixes a task's numbers: the resolved spec (includes merged, short forms expanded),
    every field left at its default omitted, the fields of :data:`HASH_EXCLUDED_FIELDS` left out.

    So the hash does not change when a description or citation is edited, when a default is spelled out
    (``splits: {seed: 0}`` equals no ``splits:``), or when medbench adds an optional field later (a new
    field at its default is omitted, like ``runner.run_key`` omits RunRequest fields left at None). It
    changes with everything else: name, version, dataset and its options, labels, splits, input,
    metrics, attributes, OOD targets, HyperRule overrides, sampler, scoring. A change of a *default* in
    medbench's code is not seen here; the run key holds the medbench version for that.
    """
    return sha256_json(spec.model_dump(mode="json", exclude_defaults=True, exclude=set(HASH_EXCLUDED_FIELDS)))


class ResolvedTask:
    """A validated task with where it came from and its content hash (:func:`task_content_hash`)."""

    def __init__(self, spec: TaskSpec, path: Path | None, source: str):
        self.spec = spec
        self.path = path
        self.source = source
        self.hash = task_content_hash(spec)

    @property
    def name(self) -> str:
        return self.spec.task

    def __repr__(self) -> str:
        return f"ResolvedTask({self.name!r}, hash={self.hash[:12]}, source={self.source!r})"
