"""The summary of a number measured once per seed: mean, std (ddof=1), n and the per-seed values."""

from __future__ import annotations

import math
from typing import Any


def summarize(values: list[float | None]) -> dict[str, Any]:
    """mean, std (ddof=1; None for one value), n and the values; undefined values are counted, not averaged."""
    defined = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    n = len(defined)
    mean = sum(defined) / n if n else None
    std = (math.sqrt(sum((v - mean) ** 2 for v in defined) / (n - 1)) if n > 1 else None) if mean is not None else None
    return {"mean": mean, "std": std, "n": n, "values": values}
