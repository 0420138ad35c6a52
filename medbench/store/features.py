"""The feature cache in the run store: frozen features computed once, reused by every probe run.

Layout under the output folder::

    features/<task>/<backbone>/<init>[-seed<k>]-<pooling>-<crop>px-<split>-<key[:12]>/
        spec.json              what the features are (the full key material), written first
        part-00000.npy         float32 [rows, D] of rows 0..1023 of the entry, then 1024..2047, ...
                               (smaller parts when that gives every rank of a launched run one)
        part-00000.json        its row range, shape and sha256, written after the .npy
        manifest.json          written last: the entry is complete iff it exists (every part listed with
                               its sha256, the network's provenance, how the features were made)
        .lock                  held while the entry is being computed

**The key** (:func:`feature_key`) is a sha256 of the extractor (backbone, init, weights sha256, the seed
only for an init that draws random tensors, pooling, precision, normalisation: see
:func:`medbench.probe.features.extractor_identity`), the data (dataset fingerprint, which split and
which cache rows, resize, crop, channels), the medbench version and :data:`FEATURE_FORMAT`. So one entry
per (backbone, weights, init, task data, resolution, pooling) and split: every protocol, seed (for a
pre-trained init) and training subset of a task reads the same entries, and an OOD target's test
split is the same entry as that task's own test split.

**Integrity.** Every file is written atomically (:func:`medbench.utils.atomic_path`); a part counts
only with its sidecar and a matching sha256, and the manifest is written after every part is checked,
so a half-written or damaged part is never used: it is computed again. Reading verifies each part
against the manifest's sha256, and what is read back is bounded like every file medbench reads back
(JSON nesting, see :func:`medbench.utils.parse_json`): a manifest that does not list exactly the entry's
parts, a part whose rows, width or dtype differ from what the entry needs, or features that are not
finite, make the entry damaged (computed again), never features of another shape. **Resumable**: an interrupted extraction keeps its finished parts; the
next run computes the others. **Sharded**: with W processes, part ``i`` is computed by rank ``i % W`` (a
new entry has at least W parts; each part's sidecar names its rank), see
:mod:`medbench.run.runner`; rank 0 checks all parts and writes the manifest.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from medbench.store.rundir import RunDir
from medbench.errors import IntegrityError
from medbench.utils import atomic_write_bytes, atomic_write_json, parse_json, safe_name, sha256_json

FEATURES = "features"
FEATURE_FORMAT = 1
#: rows per part file: the unit of resumption and of sharding across ranks
PART_ROWS = 1024
MANIFEST = "manifest.json"
SPEC = "spec.json"


def feature_key(spec: dict) -> str:
    import medbench

    return sha256_json({"format": FEATURE_FORMAT, "spec": spec, "medbench": medbench.__version__})


def rows_digest(rows: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(np.asarray(rows, dtype=np.int64)).tobytes()).hexdigest()


class FeatureCacheDamaged(Exception):
    """A part of a complete entry does not match its manifest (changed on disk after it was written)."""


def _read_object(path: Path) -> dict | None:
    """A JSON object medbench wrote into the cache, or None when it is missing, unreadable, not JSON,
    nested beyond :func:`medbench.utils.parse_json`'s bound or not an object."""
    try:
        obj = parse_json(path.read_bytes(), where=path)
    except (OSError, IntegrityError):
        return None
    return obj if isinstance(obj, dict) else None


def _is_sha256(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


@dataclass(frozen=True)
class FeatureEntry:
    path: Path
    key: str
    spec: dict
    n_rows: int
    #: rows per part, fixed when the entry is started (``spec.json``): :data:`PART_ROWS`, or fewer so that
    #: every rank of a launched run gets a part
    part_rows: int = PART_ROWS

    @property
    def n_parts(self) -> int:
        return (self.n_rows + self.part_rows - 1) // self.part_rows

    def part_range(self, i: int) -> tuple[int, int]:
        return i * self.part_rows, min(self.n_rows, (i + 1) * self.part_rows)

    def _part(self, i: int) -> Path:
        return self.path / f"part-{i:05d}.npy"

    def _part_meta(self, i: int) -> Path:
        return self.path / f"part-{i:05d}.json"

    def manifest(self) -> dict | None:
        """The manifest of a complete entry (None: incomplete, unreadable, or another key's)."""
        m = _read_object(self.path / MANIFEST)
        if m is None or m.get("key") != self.key or m.get("format") != FEATURE_FORMAT:
            return None
        parts, dim = m.get("parts"), m.get("dim")
        if not isinstance(parts, list) or len(parts) != self.n_parts \
                or not all(isinstance(p, dict) and _is_sha256(p.get("sha256")) for p in parts) \
                or not isinstance(dim, int) or isinstance(dim, bool) or dim < 0:
            return None  # not what finish() writes for this entry: incomplete, computed again
        return m

    @property
    def complete(self) -> bool:
        return self.manifest() is not None

    def _read_part(self, i: int, sha256: str | None = None) -> np.ndarray | None:
        """Part ``i`` when it is whole (its sidecar's sha256, and ``sha256`` when given, match); else None."""
        meta = _read_object(self._part_meta(i))
        if meta is None:
            return None
        try:
            data = self._part(i).read_bytes()
        except OSError:
            return None
        digest = hashlib.sha256(data).hexdigest()
        if digest != meta.get("sha256") or (sha256 is not None and digest != sha256):
            return None
        start, stop = self.part_range(i)
        try:
            arr = np.load(io.BytesIO(data), allow_pickle=False)
        except ValueError:
            return None
        if arr.ndim != 2 or arr.shape[0] != stop - start or arr.dtype != np.float32 or not np.isfinite(arr).all():
            return None
        return arr

    def missing_parts(self) -> list[int]:
        return [i for i in range(self.n_parts) if self._read_part(i) is None]

    def write_part(self, i: int, features: np.ndarray, meta: dict | None = None) -> None:
        start, stop = self.part_range(i)
        arr = np.ascontiguousarray(features, dtype=np.float32)
        if arr.ndim != 2 or arr.shape[0] != stop - start:
            raise ValueError(f"part {i} needs {stop - start} rows, got an array of shape {arr.shape}")
        buf = io.BytesIO()
        np.save(buf, arr, allow_pickle=False)
        data = buf.getvalue()
        atomic_write_bytes(self._part(i), data)
        atomic_write_json(self._part_meta(i), {"rows": [start, stop], "shape": list(arr.shape),
                                               "sha256": hashlib.sha256(data).hexdigest(), **(meta or {})})

    def write_spec(self) -> None:
        """``spec.json``, written once (a damaged one again: it is what a later run reads the layout from)."""
        if (_read_object(self.path / SPEC) or {}).get("key") != self.key:
            atomic_write_json(self.path / SPEC, {"key": self.key, "format": FEATURE_FORMAT, "spec": self.spec,
                                                 "n_rows": self.n_rows, "part_rows": self.part_rows})

    def finish(self, info: dict[str, Any]) -> dict:
        """Check every part and write the manifest (the entry is then complete); raises FeatureCacheDamaged
        naming a part that is missing or damaged."""
        parts = []
        width = None
        for i in range(self.n_parts):
            arr = self._read_part(i)
            if arr is None:
                raise FeatureCacheDamaged(f"{self._part(i)} is missing or damaged")
            if width is not None and arr.shape[1] != width:
                raise FeatureCacheDamaged(f"{self._part(i)} has {arr.shape[1]} features, part 0 has {width}")
            width = arr.shape[1]
            parts.append({"file": self._part(i).name, "rows": list(self.part_range(i)),
                          "sha256": (_read_object(self._part_meta(i)) or {}).get("sha256")})
        manifest = {"key": self.key, "format": FEATURE_FORMAT, "n_rows": self.n_rows, "dim": int(width or 0),
                    "parts": parts, **info}
        atomic_write_json(self.path / MANIFEST, manifest)
        return manifest

    def load(self) -> tuple[np.ndarray, dict]:
        """(features ``[n_rows, D]``, manifest) of a complete entry, every part checked against the manifest."""
        manifest = self.manifest()
        if manifest is None:
            raise FeatureCacheDamaged(f"{self.path} is not complete")
        arrays = []
        for i, part in enumerate(manifest["parts"]):
            arr = self._read_part(i, part["sha256"])
            if arr is None:
                raise FeatureCacheDamaged(f"{self._part(i)} does not match {self.path / MANIFEST}")
            if arr.shape[1] != manifest["dim"]:
                raise FeatureCacheDamaged(f"{self._part(i)} has {arr.shape[1]} features, {self.path / MANIFEST} "
                                          f"says {manifest['dim']}")
            arrays.append(arr)
        dim = manifest["dim"]
        return (np.concatenate(arrays) if arrays else np.zeros((0, dim), dtype=np.float32)), manifest

    def discard(self, *, parts: bool = False) -> None:
        """Drop the manifest (the entry is incomplete again) and, with ``parts``, the damaged parts."""
        (self.path / MANIFEST).unlink(missing_ok=True)
        if parts:
            for i in range(self.n_parts):
                if self._read_part(i) is None:
                    self._part(i).unlink(missing_ok=True)
                    self._part_meta(i).unlink(missing_ok=True)

    @contextlib.contextmanager
    def lock(self, *, wait_message: Callable[[str], None] | None = None, poll: float = 1.0) -> Iterator[None]:
        """Hold the entry while computing it; waits while another process holds it (it computes the same
        features: they are complete when it releases the lock). The run lock's mechanism
        (:meth:`medbench.store.RunDir.claim`), including the removal of a killed writer's temporary files."""
        told = False
        while True:
            with RunDir(self.path).claim() as claimed:
                if claimed:
                    yield
                    return
            if not told and wait_message is not None:
                wait_message(f"{self.path.name}: another medbench process is computing these features; waiting")
                told = True
            time.sleep(poll)


class FeatureStore:
    def __init__(self, out_dir: Path):
        self.root = Path(out_dir) / FEATURES

    def entry(self, *, task: str, backbone: str, split: str, spec: dict, n_rows: int, world_size: int = 1
              ) -> FeatureEntry:
        """The entry of ``spec``; a new one is cut into parts of at most :data:`PART_ROWS` rows, at least one per
        rank; a started one keeps the parts it was started with (the layout does not change the features)."""
        extractor, data = spec["extractor"], spec["data"]
        seed = "" if extractor.get("seed") is None else f"-seed{extractor['seed']}"
        key = feature_key(spec)
        leaf = (f"{safe_name(extractor['init'])}{seed}-{safe_name(extractor['pooling'])}-{data['crop']}px-"
                f"{safe_name(split)}-{key[:12]}")
        path = self.root / safe_name(task) / safe_name(backbone) / leaf
        part_rows = max(1, min(PART_ROWS, -(-n_rows // max(1, world_size))))
        started = _read_object(path / SPEC) or {}
        kept = started.get("part_rows")
        if started.get("key") == key and isinstance(kept, int) and not isinstance(kept, bool) \
                and 0 < kept <= max(PART_ROWS, n_rows):
            part_rows = kept
        return FeatureEntry(path, key, spec, n_rows, part_rows)
