"""Data efficiency (and the resolution sweep): learning curves and their normalized area.

Each point of a curve is a separate fine-tuning run on a training subset
(``medbench run --fractions`` / ``--shots``, see :mod:`medbench.data.subsets`)
scored on the full test split; the plain run is the 100 % point of the
fraction curve. The **normalized area** under the headline metric's curve is
the trapezoidal area over ``log10(x)`` (fraction or shots) divided by the
``log10`` range of ``x``: the curve's mean height on a log axis, in the
metric's units (an AUC curve has an area between 0 and 1), comparable across
backbones when they share the points. Replicates of the area come from the
seed-averaged bootstrap replicates of each point (every point is scored on
the same test resamples), so the area gets an interval too; relative to a
baseline backbone it is reported as a difference (with a paired interval) and
a ratio.
"""

from __future__ import annotations

import numpy as np


def normalized_area(x: list[float] | np.ndarray, y: np.ndarray) -> np.ndarray | float | None:
    """Area under ``y`` over ``log10(x)`` divided by the log range; ``y`` is ``[P]`` or ``[P, B]``.
    None with fewer than two distinct ``x``; NaN where a replicate misses a point."""
    x = np.asarray(x, dtype=np.float64)
    if x.size < 2 or np.unique(x).size < 2 or np.any(x <= 0):
        return None
    order = np.argsort(x)
    lx = np.log10(x[order])
    yy = np.asarray(y, dtype=np.float64)[order]
    widths = np.diff(lx)
    heights = (yy[1:] + yy[:-1]) / 2.0
    area = np.tensordot(widths, heights, axes=(0, 0)) / (lx[-1] - lx[0])
    return float(area) if np.ndim(area) == 0 else area
