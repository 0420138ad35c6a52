"""What one run is: a :class:`RunRequest` (task, backbone, seed, init, variant, engine settings ...) and its
key in the run store (:func:`run_key`, documented in :mod:`medbench.store.rundir`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from medbench.spec import ResolvedTask
from medbench.store import STORE_FORMAT
from medbench.train.finetune import EngineConfig
from medbench.utils import sha256_json


@dataclass(frozen=True)
class RunRequest:
    task: str
    backbone: str
    seed: int
    init: str | None = None
    weights: Path | None = None
    max_steps: int | None = None
    engine: EngineConfig = field(default_factory=EngineConfig)
    #: data-efficiency and resolution variants (at most one): a fraction (0, 1) of the training images,
    #: k training images per class, or another crop size (see medbench.data.subsets)
    fraction: float | None = None
    shots: int | None = None
    resolution: int | None = None
    #: frozen features (medbench.train.freeze): None, "head" or "<L>"
    freeze: str | None = None
    #: representation similarity initial vs fine-tuned (medbench.analysis.similarity): None, "cka", "cka,svcca"
    similarity: str | None = None
    #: evaluation protocol (medbench.probe.protocols): None for fine-tuning, "linear" or "knn" for a probe on
    #: frozen features
    protocol: str | None = None
    #: probes only: the features' pooling (medbench.backbones.pooling); None: the model's own
    pooling: str | None = None

    @property
    def variant(self) -> str:
        """Run-folder suffix of the variant; "" for the plain run."""
        if self.fraction is not None:
            return f"frac{self.fraction * 100:g}"
        if self.shots is not None:
            return f"shots{self.shots}"
        if self.resolution is not None:
            return f"res{self.resolution}"
        return ""

    @property
    def folder_suffix(self) -> str:
        """Run-folder suffix: the data variant, the training regime and the protocol (e.g. ``frac10``,
        ``freeze-head``, ``shots5-linear``, ``knn-cls+mean``)."""
        from medbench.train.freeze import freeze_variant

        probe = f"{self.protocol}-{self.pooling}" if self.protocol and self.pooling else (self.protocol or "")
        return "-".join(x for x in (self.variant, freeze_variant(self.freeze), probe) if x)

    def variant_spec(self) -> dict | None:
        set_ = [(k, v) for k, v in (("fraction", self.fraction), ("shots", self.shots),
                                    ("resolution", self.resolution)) if v is not None]
        if len(set_) > 1:
            raise ValueError(f"a run has at most one variant, got {dict(set_)}")
        return {"kind": set_[0][0], "value": set_[0][1]} if set_ else None


def run_key(request: RunRequest, task: ResolvedTask, fingerprint: str, weights_id: str | None, *,
            plan: dict | None = None, input_geometry: dict | None = None, ood: list | None = None,
            world_size: int = 1, execution: dict | None = None) -> str:
    """The run store key: a sha256 of everything that fixes a run's numbers (see :mod:`medbench.store`).

    ``request`` has its init resolved. Every field of :class:`RunRequest` enters
    the key, so a field added later (a data fraction, a frozen-layer option)
    separates runs without touching this function; fields that are None are
    left out, so adding an optional field keeps the keys of earlier runs.
    ``weights`` enters as ``weights_id`` (the file's sha256), not as its path.
    Beside the request: the task's content hash, the data fingerprint (``PreparedData.fingerprint``: rows,
    labels, metadata and the image files' stamps, so replaced images make a new run), the OOD
    targets' hashes and fingerprints, the resolved plan (schedule, batch, lr,
    MixUp) and input geometry, the world size (batch statistics are per rank),
    the training-numerics version (:data:`medbench.train.numerics.TRAINING_NUMERICS`:
    bumped by any code change that changes the trained numbers, so such a change
    retrains) and the store format. Not in the key (they do not change the
    numbers, or are recorded as provenance instead): checkpoint settings, output
    folder, git revision, ``medbench.__version__``, library versions, the scoring
    version (a run scored by older scoring code is re-scored from its saved
    predictions instead, see :mod:`medbench.scoring.version`), and the thread
    count (on CPU it changes the last bits of reductions, far below seed
    noise; recorded as ``device.torch_threads``) and the input path's worker
    threads (no number changes). ``execution``: the execution options that pick
    other kernels and so change last bits (channels-last, ``--compile``;
    :meth:`medbench.train.finetune.Execution.key_fields`), only those that are
    on: runs with them off (every CPU default) keep the key they had before the
    options existed. The precision (bf16 autocast, the GPU default) is an
    engine field of the request. The engine's micro-batch enters as requested:
    ``auto`` stays ``auto`` (the value it resolves to depends on the device and
    may be halved during a run, which must keep its key to resume; it is
    recorded in the run).
    """
    from medbench.train.numerics import TRAINING_NUMERICS

    fields = {k: v for k, v in asdict(request).items() if v is not None}
    fields["weights"] = weights_id
    return sha256_json({
        "store_format": STORE_FORMAT,
        "request": fields,
        "task_hash": task.hash,
        "data": fingerprint,
        "ood": ood or [],
        "plan": plan,
        "input": input_geometry,
        "world_size": world_size,
        "training_numerics": TRAINING_NUMERICS,
        **({"execution": execution} if execution else {}),
    })


def _canonical_variant(req: RunRequest, backbone) -> RunRequest:
    """``freeze``/``similarity``/``protocol``/``pooling`` validated and spelled one way, so equal settings give
    equal run keys. A probe run keeps only what changes its numbers: no step cap and no fine-tuning engine
    settings (the precision of the features stays)."""
    if req.protocol is not None or req.pooling is not None:
        from medbench.backbones.pooling import parse_pooling
        from medbench.errors import UsageError
        from medbench.probe.protocols import request_protocol

        protocol = request_protocol(req.protocol)
        if protocol is None:
            if req.pooling is not None:
                raise UsageError("--pooling applies to the probes (--protocol linear|knn); fine-tuning trains the "
                                 "model's own head", field="--pooling")
            req = replace(req, protocol=None)
        else:
            if req.freeze or req.similarity:
                raise UsageError(f"--{'freeze' if req.freeze else 'similarity'} applies to --protocol finetune, not "
                                 f"to the {protocol} probe (its network is frozen as it is)", field="--protocol")
            return replace(req, protocol=protocol, pooling=parse_pooling(req.pooling), max_steps=None,
                           engine=EngineConfig(precision=req.engine.precision))
    if not req.freeze and not req.similarity:
        return req

    from medbench.analysis.similarity import parse_methods
    from medbench.train.freeze import parse_freeze

    return replace(req, freeze=parse_freeze(req.freeze, backbone),
                   similarity=",".join(parse_methods(req.similarity)) or None)


def expand_requests(tasks: list[str], backbone: str, seeds: list[int], *, init: str | None, weights: Path | None,
                    max_steps: int | None, engine: EngineConfig, variants: list[dict] | None = None,
                    freeze: str | None = None, similarity: str | None = None,
                    protocols: list[str] | None = None, pooling: str | None = None) -> list[RunRequest]:
    """Per protocol (default: fine-tuning), the plain run of every task x seed, then each variant
    (``{"fraction": 0.1}``, ``{"shots": 5}``, ``{"resolution": 64}``) of every task x seed.

    ``freeze``/``similarity`` apply to the fine-tuning runs, ``pooling`` to the probe runs. A probe whose
    numbers cannot depend on the seed (a pre-trained init: no random tensor in the frozen network; the
    full training set or a resolution variant: no seeded subset; a deterministic fit) runs its first seed
    only: the other seeds would repeat it number for number.
    """
    from medbench.probe.features import seed_free
    from medbench.probe.protocols import is_probe, request_protocol

    out = []
    for protocol in protocols or ["finetune"]:
        probe = is_probe(protocol)
        for v in [{}, *(variants or [])]:
            one_seed = probe and init is not None and seed_free(init) and "fraction" not in v and "shots" not in v
            for t in tasks:
                for s in (seeds[:1] if one_seed else seeds):
                    out.append(RunRequest(task=t, backbone=backbone, seed=s, init=init, weights=weights,
                                          max_steps=None if probe else max_steps, engine=engine,
                                          freeze=None if probe else freeze, similarity=None if probe else similarity,
                                          protocol=request_protocol(protocol), pooling=pooling if probe else None,
                                          **v))
    return out
