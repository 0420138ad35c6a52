"""Choosing a probe's hyper-parameter (the linear probe's regularisation, kNN's k) on the validation split.

The probe modules know nothing about metrics (scoring comes later in the flow): the caller hands them a
:class:`Selection`, two named criteria on validation logits (what the run's predictions are made of),
higher is better. The primary criterion
is the task's headline metric (signed so that higher is better); when it is undefined for every candidate
(e.g. AUC on a validation split with one class), the fallback (validation NLL, negated) decides. Ties go to
the first candidate in the order the probe lists them (the strongest regularisation, the smallest k).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

Criterion = Callable[[np.ndarray], "float | None"]


@dataclass(frozen=True)
class Selection:
    """Named criteria on validation logits ``[n_val, outputs]``; higher is better; None: undefined."""

    primary: tuple[str, Criterion]
    fallback: tuple[str, Criterion] | None = None


def _defined(v: float | None) -> bool:
    return v is not None and not (isinstance(v, float) and math.isnan(v))


def choose(candidates: Sequence, val_logits: Callable[[int], np.ndarray], selection: Selection) -> tuple[int, dict]:
    """(index of the chosen candidate, record): every candidate's validation logits scored once by the
    primary criterion (and by the fallback when the primary is undefined for all)."""
    probs = [val_logits(i) for i in range(len(candidates))]
    name, fn = selection.primary
    scores = [fn(p) for p in probs]
    used = name
    if not any(_defined(s) for s in scores) and selection.fallback is not None:
        used, fn = selection.fallback
        scores = [fn(p) for p in probs]
    best = None
    for i, s in enumerate(scores):
        if _defined(s) and (best is None or s > scores[best]):
            best = i
    record = {"selected_by": used if best is not None else "none defined: first candidate",
              "scores": [float(s) if _defined(s) else None for s in scores]}
    return (best if best is not None else 0), record
