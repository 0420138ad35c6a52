"""Checkpoints of a run in training, so that a killed run resumes with exactly the numbers of an
uninterrupted one.

What fixes the rest of a run at step ``t``: the network's weights and buffers,
the optimiser state (SGD's momentum buffers), the RNG state, and ``t`` itself;
batches, crops, flips and MixUp are pure functions of (seed, step)
(:class:`medbench.data.loader.TrainStream`) and the learning rate a function of
the step. :meth:`medbench.train.finetune.Finetuner.training_state` returns those
tensors in two parts:

* **shared** (written by rank 0): the module's state dict and, with ZeRO
  stage 0, the optimiser state of every parameter by name;
* **local** (written by every rank): the RNG state and, with ZeRO stages 1/2,
  the rank's partition of the fp32 master weights and of the optimiser state.

Files in ``<run>/checkpoint/``::

    step-00000120-shared.safetensors
    step-00000120-rank0.safetensors
    checkpoint.json          written last, atomically: step, files and sizes, history so far, run key

Only safetensors and JSON are written and read: nothing is unpickled when
resuming. (DeepSpeed's ``engine.save_checkpoint`` stores its state with
``torch.save``, i.e. pickle; medbench does not use it.) A checkpoint whose
files are missing, truncated, of another run, or that does not fit the network
is ignored with a message, and the run starts from step 0.

When: :class:`CheckpointPolicy`, from ``medbench run --checkpoint-every``
(``N`` steps and/or a time like ``10m``; default every 10 minutes of training).
"""

from __future__ import annotations

import json
import re
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from medbench import utils
from medbench.errors import UsageError

if TYPE_CHECKING:
    import torch

FORMAT = 1
INDEX = "checkpoint.json"
DEFAULT_SECONDS = 600.0
_STEP_FILE = re.compile(r"^\.?step-(\d+)-")
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*(s|sec|secs|seconds?|m|min|mins|minutes?|h|hours?)$")
_STEPS = re.compile(r"^(\d+)\s*(steps?)?$")


@dataclass(frozen=True)
class CheckpointPolicy:
    """Save after every ``every_steps`` optimiser steps and/or when ``every_seconds`` have passed
    since the last save (checked after each step); both None: never."""

    every_steps: int | None = None
    every_seconds: float | None = DEFAULT_SECONDS

    @property
    def enabled(self) -> bool:
        return bool(self.every_steps) or bool(self.every_seconds)

    @classmethod
    def parse(cls, values: list[str] | None) -> "CheckpointPolicy":
        """From ``--checkpoint-every`` values: ``500`` / ``500steps``, ``90s`` / ``10m`` / ``2h``, ``off``.

        No value: the default (every 10 minutes). One value of each kind may be given.
        """
        if not values:
            return cls()
        steps: int | None = None
        seconds: float | None = None
        for raw in values:
            v = raw.strip().lower()
            if v in ("off", "never", "0", "none"):
                if len(values) > 1:
                    raise UsageError(f"{raw!r} cannot be combined with other values", field="--checkpoint-every")
                return cls(None, None)
            if m := _STEPS.match(v):
                if int(m.group(1)) < 1:
                    raise UsageError(f"expected at least 1 step, got {raw!r}", field="--checkpoint-every")
                steps = int(m.group(1))
            elif m := _DURATION.match(v):
                scale = {"s": 1, "m": 60, "h": 3600}[m.group(2)[0]]
                seconds = float(m.group(1)) * scale
                if seconds <= 0:
                    raise UsageError(f"expected a positive duration, got {raw!r}", field="--checkpoint-every")
            else:
                raise UsageError(f"expected a number of steps (500), a duration (90s, 10m, 2h) or 'off', got {raw!r}",
                                 field="--checkpoint-every")
        return cls(steps, seconds)

    def describe(self) -> str:
        parts = []
        if self.every_steps:
            parts.append(f"every {self.every_steps} steps")
        if self.every_seconds:
            parts.append(f"every {self.every_seconds:g} s")
        return " or ".join(parts) or "off"


class CheckpointClock:
    """When the next checkpoint is due, under a policy."""

    def __init__(self, policy: CheckpointPolicy, now: Callable[[], float] = time.monotonic):
        self.policy = policy
        self.now = now
        self.last = now()

    def due(self, steps_done: int) -> bool:
        p = self.policy
        if p.every_steps and steps_done % p.every_steps == 0:
            return True
        return bool(p.every_seconds) and self.now() - self.last >= p.every_seconds

    def saved(self) -> None:
        self.last = self.now()


@dataclass
class Checkpoint:
    step: int  # optimiser steps done: training resumes at this step
    shared: dict[str, "torch.Tensor"]
    local: dict[str, "torch.Tensor"]
    meta: dict = field(default_factory=dict)


class CheckpointUnusable(Exception):
    """A checkpoint exists but cannot be used (the run then starts over)."""


def _no_shared_storage(tensors: dict[str, "torch.Tensor"]) -> dict[str, "torch.Tensor"]:
    """CPU, contiguous tensors, each with its own storage (safetensors refuses shared storage)."""
    out = {}
    seen: set[tuple[int, int]] = set()
    for name, t in tensors.items():
        t = t.detach().to("cpu").contiguous()
        ident = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if ident in seen and t.numel():
            t = t.clone()
        seen.add(ident)
        out[name] = t
    return out


def safetensors_size(path: Path) -> int:
    """The size a complete safetensors file with this header has (header length + header + data)."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError("shorter than a safetensors header")
        (n,) = struct.unpack("<Q", head)
        if n > 100_000_000:
            raise ValueError("implausible safetensors header length")
        header = json.loads(f.read(n))
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    return 8 + n + end


def write_tensors(path: Path, tensors: dict[str, "torch.Tensor"]) -> int:
    """``tensors`` to ``path`` (safetensors, atomic); the size written. A short write is an error."""
    import errno

    from safetensors.torch import save_file

    with utils.atomic_path(path) as tmp:
        save_file(_no_shared_storage(tensors), str(tmp), metadata={"medbench_checkpoint": str(FORMAT)})
        size = tmp.stat().st_size
        if size != safetensors_size(tmp):
            raise OSError(errno.ENOSPC, "incomplete write (is the disk full?)")
    return size


class CheckpointStore:
    """The checkpoint folder of one run, for one rank of the job."""

    def __init__(self, folder: Path, *, rank: int = 0, world_size: int = 1,
                 barrier: Callable[[], None] | None = None):
        self.folder = Path(folder)
        self.rank = rank
        self.world_size = world_size
        self.barrier = barrier or (lambda: None)

    def _name(self, step: int, part: str) -> str:
        return f"step-{step:08d}-{part}.safetensors"

    def save(self, step: int, shared: dict[str, "torch.Tensor"], local: dict[str, "torch.Tensor"], *,
             key: str, meta: dict) -> None:
        """Write this rank's files, then (rank 0, after every rank is done) the index, then prune."""
        files: dict[str, int] = {}
        if self.rank == 0 and shared:
            files[self._name(step, "shared")] = write_tensors(self.folder / self._name(step, "shared"), shared)
        if local:
            write_tensors(self.folder / self._name(step, f"rank{self.rank}"), local)
        self.barrier()
        if self.rank != 0:
            return
        for r in range(self.world_size):
            name = self._name(step, f"rank{r}")
            if (self.folder / name).is_file():
                files[name] = (self.folder / name).stat().st_size
        utils.atomic_write_json(self.folder / INDEX, {
            "format": FORMAT, "step": step, "key": key, "world_size": self.world_size, "files": files,
            "meta": meta,
        })
        self._prune(keep=set(files), below=step)

    def _prune(self, *, keep: set[str], below: int) -> None:
        """Remove files of older checkpoints (never a newer one another rank may be writing)."""
        for p in self.folder.iterdir():
            m = _STEP_FILE.match(p.name)
            if m and p.name not in keep and int(m.group(1)) < below:
                p.unlink(missing_ok=True)

    def remove_partial_files(self) -> None:
        """Temporary files of a writer that was killed (call while no one writes: before training)."""
        if self.rank == 0 and self.folder.is_dir():
            for p in self.folder.glob(".*.tmp"):
                p.unlink(missing_ok=True)

    def load(self, *, key: str) -> Checkpoint | None:
        """The last checkpoint, None when there is none; :class:`CheckpointUnusable` when it cannot be used."""
        from safetensors.torch import load_file

        index_path = self.folder / INDEX
        if not index_path.is_file():
            return None
        try:
            index = json.loads(index_path.read_text())
            step = int(index["step"])
            files: dict[str, int] = dict(index["files"])
        except (OSError, ValueError, KeyError, TypeError, RecursionError) as err:
            raise CheckpointUnusable(f"unreadable {INDEX}: {type(err).__name__}") from err
        if index.get("format") != FORMAT:
            raise CheckpointUnusable(f"format {index.get('format')} (this medbench writes {FORMAT})")
        if index.get("key") != key:
            raise CheckpointUnusable("it belongs to another run configuration")
        if index.get("world_size") != self.world_size:
            raise CheckpointUnusable(f"written by {index.get('world_size')} processes, this job has {self.world_size}")

        def read(name: str) -> dict[str, "torch.Tensor"]:
            path = self.folder / name
            if not path.is_file():
                raise CheckpointUnusable(f"{name} is missing")
            if path.stat().st_size != files[name]:
                raise CheckpointUnusable(f"{name} has {path.stat().st_size} bytes, expected {files[name]}")
            try:
                return load_file(str(path), device="cpu")
            except Exception as err:  # safetensors' own error type: a damaged file
                raise CheckpointUnusable(f"{name} is damaged: {str(err).splitlines()[0]}") from err

        shared_name, local_name = self._name(step, "shared"), self._name(step, f"rank{self.rank}")
        shared = read(shared_name) if shared_name in files else {}
        local = read(local_name) if local_name in files else {}
        return Checkpoint(step=step, shared=shared, local=local, meta=index.get("meta") or {})

    def clear(self) -> None:
        import shutil

        shutil.rmtree(self.folder, ignore_errors=True)
