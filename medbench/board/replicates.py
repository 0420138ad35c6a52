"""What the paired regression gate needs from a leaderboard entry, stored compactly in the entry itself.

An entry's ``replicates`` block (optional within format version 2; boards made before it, and published
rows, have none) holds, for every top-level test metric (``metrics``) and every top-level OOD metric
(``ood.<target>``) of the entry's plain runs, the **seed-mean test-resample replicates**: replicate ``b`` is
the metric on test resample ``b`` averaged over the entry's seeds
(:meth:`medbench.board.axes.SeedAggregate.replicates`).
Beside them, the ``resampling`` of each scope (``test``, ``ood:<target>``: number of resamples, bootstrap
seed, unit, unit and sample counts and the fingerprint of the resampled ids,
:meth:`medbench.scoring.bootstrap.Resampling.describe`): two boards whose scope descriptions are equal
resampled the same test set the same way, so replicate ``b`` of both scores the same patients, and their
difference is the paired bootstrap distribution of the difference (:mod:`medbench.board.compare`). The
per-seed values are the summaries' ``values``/``seeds``.

Encoding (``encoding: "float32-le+zlib+base64"``): each replicate array is little-endian float32 (a
relative precision of 6e-8, far below any tolerance; an undefined resample stays NaN), zlib-compressed
and base64-encoded. About 4 KB per array of 1000 resamples; the smoke board's six entries carry 24 arrays
(~100 KB). Per-label metrics (``auc/Edema``) and the axes' values are not stored: the gate compares them by
the unpaired rule.
"""

from __future__ import annotations

import base64
import zlib
from typing import Any

import numpy as np

ENCODING = "float32-le+zlib+base64"


def encode(values: np.ndarray) -> str:
    raw = np.asarray(values, dtype="<f4").tobytes()
    return base64.b64encode(zlib.compress(raw, 9)).decode("ascii")


def decode(text: str, *, where: str | None = None, field: str = "replicates") -> np.ndarray:
    """The float64 replicates of an encoded array (a :class:`LeaderboardFormatError` naming the file and the
    field when the text is not one)."""
    from medbench.board.schema import LeaderboardFormatError

    try:
        raw = zlib.decompress(base64.b64decode(text.encode("ascii"), validate=True))
    except (ValueError, zlib.error, UnicodeEncodeError) as err:
        raise LeaderboardFormatError(f"expected {ENCODING} replicates ({err})", where=where, field=field) from None
    if len(raw) % 4:
        raise LeaderboardFormatError(f"expected {ENCODING} replicates (length {len(raw)} is not a multiple of 4)",
                                     where=where, field=field)
    return np.frombuffer(raw, dtype="<f4").astype(np.float64)


def replicates_block(entry: dict, agg) -> dict | None:
    """The ``replicates`` block of an entry from its plain runs, ``agg`` (a :class:`medbench.board.axes.SeedAggregate`;
    None without replicates, e.g. runs scored without a bootstrap or scored with different settings)."""
    if not agg.records or not agg.aligned:
        return None
    resampling = agg.scoring.get("resampling") or {}
    metrics = {}
    for name in entry.get("metrics", {}):
        reps = agg.replicates(("test", name)) if "/" not in name else None
        if reps is not None:
            metrics[name] = encode(reps)
    ood: dict[str, dict[str, str]] = {}
    for target, scores in entry.get("ood", {}).items():
        for name in scores:
            reps = agg.replicates(("ood", target, name)) if "/" not in name else None
            if reps is not None:
                ood.setdefault(target, {})[name] = encode(reps)
    if not metrics and not ood:
        return None
    scopes = ["test"] if metrics else []
    scopes += [f"ood:{t}" for t in ood]
    return {"encoding": ENCODING, "seeds": agg.seeds, "level": agg.level,
            "resampling": {s: resampling.get(s) for s in scopes}, "metrics": metrics, "ood": ood}


def selector_scope(selector: str) -> str:
    """The resampled scope of a gate selector (a test metric name or ``ood:TARGET:NAME``)."""
    return "ood:" + selector.split(":", 2)[1] if selector.startswith("ood:") else "test"


def entry_replicates(entry: dict, selector: str, *, where: str | None = None, prefix: str = "") -> np.ndarray | None:
    """The stored seed-mean replicates of ``selector`` (a test metric name or ``ood:TARGET:NAME``) in an entry
    (``where``/``prefix``: the file and the entry's field, for errors)."""
    block: Any = entry.get("replicates")
    if not isinstance(block, dict):
        return None
    if selector.startswith("ood:"):
        _, target, name = selector.split(":", 2)
        text = ((block.get("ood") or {}).get(target) or {}).get(name)
        field = f"replicates.ood.{target}.{name}"
    else:
        text = (block.get("metrics") or {}).get(selector)
        field = f"replicates.metrics.{selector}"
    return None if text is None else decode(text, where=where, field=f"{prefix}{field}")
