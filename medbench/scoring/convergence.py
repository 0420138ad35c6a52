"""Convergence (M21 Fig. 3): how fast the validation metric approaches its final value.

The runner records the validation headline metric every ``total_steps / 10``
steps and at the last step (``history.json``: ``val_step``, ``val_metric``).
``steps_to_95`` / ``steps_to_99`` is the first recorded step whose value
reaches 95 % / 99 % of the final value (for a lower-is-better metric: falls
to the final value / 0.95, / 0.99); ``fraction_to_*`` divides by the
schedule's length. The resolution is the evaluation interval
(``eval_every``); the leaderboard reports these relative to a baseline
backbone when one is named.
"""

from __future__ import annotations

FRACTIONS = {"95": 0.95, "99": 0.99}


def convergence(history: dict, metric: str, higher_is_better: bool = True) -> dict:
    steps = list(history.get("val_step") or [])
    values = list(history.get("val_metric") or [])
    total = (history["step"][-1] + 1) if history.get("step") else (steps[-1] if steps else None)
    out: dict = {"metric": metric, "total_steps": total,
                 "eval_every": steps[0] if steps else None,
                 "final": None, "curve": {"step": steps, "value": values}}
    pairs = [(s, v) for s, v in zip(steps, values) if v is not None]
    for key in FRACTIONS:
        out[f"steps_to_{key}"] = None
        out[f"fraction_to_{key}"] = None
    if not pairs:
        return out
    final = pairs[-1][1]
    out["final"] = final
    for key, frac in FRACTIONS.items():
        if higher_is_better:
            if final <= 0:
                continue
            target = final * frac
            hit = next(s for s, v in pairs if v >= target)
        else:
            target = final / frac
            hit = next(s for s, v in pairs if v <= target)
        out[f"steps_to_{key}"] = hit
        out[f"fraction_to_{key}"] = hit / total if total else None
    return out
