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
        """Run-folder suffix: the data variant and the training regime (e.g. ``frac10``, ``freeze-head``)."""
        from medbench.train.freeze import freeze_variant

        return "-".join(x for x in (self.variant, freeze_variant(self.freeze)) if x)

    def variant_spec(self) -> dict | None:
        set_ = [(k, v) for k, v in (("fraction", self.fraction), ("shots", self.shots),
                                    ("resolution", self.resolution)) if v is not None]
        if len(set_) > 1:
            raise ValueError(f"a run has at most one variant, got {dict(set_)}")
        return {"kind": set_[0][0], "value": set_[0][1]} if set_ else None


def run_key(request: RunRequest, task: ResolvedTask, fingerprint: str, weights_id: str | None, *,
            plan: dict | None = None, input_geometry: dict | None = None, ood: list | None = None,
            world_size: int = 1) -> str:
    """The run store key: a sha256 of everything that fixes a run's numbers (see :mod:`medbench.store`).

    ``request`` has its init resolved. Every field of :class:`RunRequest` enters
    the key, so a field added later (a data fraction, a frozen-layer option)
    separates runs without touching this function; fields that are None are
    left out, so adding an optional field keeps the keys of earlier runs.
    ``weights`` enters as ``weights_id`` (the file's sha256), not as its path.
    Beside the request: the task's content hash, the data fingerprint, the OOD
    targets' hashes and fingerprints, the resolved plan (schedule, batch, lr,
    MixUp) and input geometry, the world size (batch statistics are per rank),
    the medbench version and the store format. Not in the key (they do not
    change the numbers, or are recorded as provenance instead): checkpoint
    settings, output folder, git revision, library versions, and the thread
    count (on CPU it changes the last bits of reductions, far below seed
    noise; recorded as ``device.torch_threads``), and the execution options
    (channels-last, ``--compile``: last bits too). The engine's micro-batch
    enters as requested: ``auto`` stays ``auto`` (the value it resolves to
    depends on the device and may be halved during a run, which must keep
    its key to resume; it is recorded in the run).
    """
    import medbench

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
        "medbench": medbench.__version__,
    })


def _canonical_variant(req: RunRequest, backbone) -> RunRequest:
    """``freeze``/``similarity`` validated and spelled one way, so equal settings give equal run keys."""
    if not req.freeze and not req.similarity:
        return req

    from medbench.analysis.similarity import parse_methods
    from medbench.train.freeze import parse_freeze

    return replace(req, freeze=parse_freeze(req.freeze, backbone),
                   similarity=",".join(parse_methods(req.similarity)) or None)


def expand_requests(tasks: list[str], backbone: str, seeds: list[int], *, init: str | None, weights: Path | None,
                    max_steps: int | None, engine: EngineConfig, variants: list[dict] | None = None,
                    freeze: str | None = None, similarity: str | None = None) -> list[RunRequest]:
    """The plain run of every task x seed, then each variant (``{"fraction": 0.1}``, ``{"shots": 5}``,
    ``{"resolution": 64}``) of every task x seed; ``freeze``/``similarity`` apply to all of them."""
    return [RunRequest(task=t, backbone=backbone, seed=s, init=init, weights=weights, max_steps=max_steps,
                       engine=engine, freeze=freeze, similarity=similarity, **v)
            for v in [{}, *(variants or [])] for t in tasks for s in seeds]
