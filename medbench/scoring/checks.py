"""Warnings: degenerate results that would otherwise pass unnoticed, recorded with a run's scores.

A warning is ``{"code", "subject", "message"}``: a stable code, what it is about
(a split, a value path, a label), and one line for people. ``metrics.json``
holds the run's list (``warnings``, also copied into ``result.json`` when the
run finishes); the leaderboard aggregates them over the seeds of an entry
(:func:`medbench.board.axes.entry_warnings`) and the console summary, the
Markdown and the HTML boards show them.

Codes:

* ``headline_undefined``: the headline metric is undefined on the test split
  (e.g. the test split holds one class);
* ``undefined``: another test or OOD value is undefined (``auc/Edema`` with one
  class in the test split);
* ``undefined_resamples``: some bootstrap replicates of a test or OOD metric,
  or of an attribute's worst group, gap or difference, are undefined
  (``118 of 1000``): the interval is over the defined ones only;
* ``no_interval``: a defined value has no interval (every replicate undefined);
* ``constant_scores``: every prediction of a label is the same on a split (a
  collapsed network: AUC 0.5, accuracy the base rate);
* ``unlabelled_rows``: multiclass rows whose class is not among the scored
  classes (or several classes), left out of every metric
  (:mod:`medbench.predictions`);
* ``temperature_not_fitted``: temperature scaling left labels unscaled (the
  status names why, see :mod:`medbench.scoring.calibration`);
* ``empty_convergence``: no validation point was recorded, so the convergence
  axis is empty;
* ``probabilities_only``: the prediction file has no logits (written before
  medbench kept them): saturated probabilities tie and their NLL is clipped;
* ``ood_skipped``: an OOD target had no data and was skipped.
"""

from __future__ import annotations

import numpy as np

from medbench.predictions import Predictions

STATUS_REASON = {
    "no_validation": "no validation predictions",
    "one_class": "validation holds one class",
    "too_few": "too few validation images (see the temperature guard)",
    "not_positive": "validation predictions rank the wrong way (likelihood maximal at 1/T <= 0)",
    "out_of_range": "the fitted temperature is outside the allowed range",
}


def warning(code: str, subject: str, message: str) -> dict:
    return {"code": code, "subject": subject, "message": message}


def prediction_warnings(split: str, preds: Predictions) -> list[dict]:
    """Warnings about one split's predictions: constant scores, unlabelled multiclass rows."""
    out = []
    if len(preds) >= 2:
        scores = preds.y_score()
        constant = [name for k, name in enumerate(preds.label_names) if np.ptp(scores[:, k]) == 0]
        if preds.task_type == "multiclass" and len(constant) < len(preds.label_names):
            constant = []  # a class column can be constant only if every row is the same prediction
        if constant:
            out.append(warning("constant_scores", split, f"{split}: every image gets the same score for "
                               f"{', '.join(constant)}: the network's output does not depend on the image"))
    if preds.task_type == "multiclass":
        c = preds.label_counts()
        bad = c.get("outside_classes", 0) + c.get("several_classes", 0)
        if bad:
            parts = [f"{c['outside_classes']} with no scored class"] if c.get("outside_classes") else []
            parts += [f"{c['several_classes']} with several classes"] if c.get("several_classes") else []
            out.append(warning("unlabelled_rows", split, f"{split}: {bad} of {c['n']} rows are not labelled "
                               f"({', '.join(parts)}) and are left out of every metric"))
    return out


def _undefined_values(scope: str, values: dict, headline: str | None) -> list[dict]:
    out = []
    for key, v in values.items():
        if v is not None:
            continue
        if key == headline and scope == "test":
            out.append(warning("headline_undefined", f"test.{key}", f"test: the headline {key} is undefined "
                               "(e.g. the test split holds one class)"))
        else:
            out.append(warning("undefined", f"{scope}.{key}", f"{scope}: {key} is undefined"))
    return out


def _interval_warnings(scope: str, values: dict, ci: dict, n_resamples: int) -> list[dict]:
    out = []
    for key, v in values.items():
        if v is None or "/" in key or not n_resamples:
            continue
        c = ci.get(key)
        if c is None:
            out.append(warning("no_interval", f"{scope}.{key}", f"{scope}: {key} has no interval (every one of "
                               f"{n_resamples} resamples is undefined)"))
        elif c.get("n_undefined"):
            k = c["n_undefined"]
            out.append(warning("undefined_resamples", f"{scope}.{key}", f"{scope}: {key} is undefined in {k} of "
                               f"{n_resamples} resamples; its interval is over the {n_resamples - k} defined"))
    return out


def _fairness_interval_warnings(scores: dict, n_resamples: int) -> list[dict]:
    """Per resampled attribute: the largest share of undefined replicates among its worst-group and gap values
    (a group that drew one class of a label makes them undefined, see docs/metrics.md)."""
    out = []
    attrs = ((scores.get("ci") or {}).get("fairness") or {}).get("attributes") or {}
    for name, tree in attrs.items():
        worst = [(f"{kind}.{m}", c.get("n_undefined", 0)) for kind in ("worst", "gap")
                 for m, c in (tree.get(kind) or {}).items() if isinstance(c, dict)]
        worst += [(key, tree[key].get("n_undefined", 0)) for key in ("equalized_odds_difference",
                                                                      "demographic_parity_difference")
                  if isinstance(tree.get(key), dict)]
        bad = [(k, n) for k, n in worst if n]
        if bad and n_resamples:
            k, n = max(bad, key=lambda kn: kn[1])
            out.append(warning("undefined_resamples", f"fairness.{name}", f"fairness {name}: {k} is undefined in "
                               f"{n} of {n_resamples} resamples (a group drew one class of a label); its interval "
                               f"is over the {n_resamples - n} defined"))
    return out


def score_warnings(scores: dict, preds: dict[str, Predictions], *, headline: str | None,
                   ood_records: list[dict] | None = None, has_history: bool = False) -> list[dict]:
    """Every warning of a scored run: ``scores`` is the ``metrics.json`` tree (with ``ci``), ``preds`` the
    prediction tables by split name (``val``, ``test``, ``ood-<target>``)."""
    out: list[dict] = []
    no_logits = [split for split, p in preds.items() if len(p) and not p.has_logits]
    if no_logits:
        out.append(warning("probabilities_only", "predictions", f"predictions of {', '.join(no_logits)} hold "
                           "probabilities only (no logits; written before medbench kept them): saturated scores tie "
                           "and their NLL is clipped"))
    for split, p in preds.items():
        out += prediction_warnings(split, p)
    ci = scores.get("ci") or {}
    resampling = (scores.get("scoring") or {}).get("resampling") or {}
    out += _undefined_values("test", scores.get("test") or {}, headline)
    out += _interval_warnings("test", scores.get("test") or {}, ci.get("test") or {},
                              (resampling.get("test") or {}).get("n_resamples", 0))
    for name, values in (scores.get("ood") or {}).items():
        out += _undefined_values(f"ood.{name}", values, None)
        out += _interval_warnings(f"ood.{name}", values, (ci.get("ood") or {}).get(name) or {},
                                  (resampling.get(f"ood:{name}") or {}).get("n_resamples", 0))
    out += _fairness_interval_warnings(scores, (resampling.get("test") or {}).get("n_resamples", 0))
    status = (scores.get("calibration") or {}).get("temperature_status") or {}
    by_status: dict[str, list[str]] = {}
    for label, st in status.items():
        if st != "fitted":
            by_status.setdefault(st, []).append(label)
    for st, labels in by_status.items():
        which = "all classes" if labels == ["all"] else ", ".join(labels)
        out.append(warning("temperature_not_fitted", f"calibration.{st}", f"temperature scaling not fitted for "
                           f"{which} ({st}: {STATUS_REASON.get(st, st)}); left unscaled"))
    conv = scores.get("convergence")
    if has_history and (conv is None or conv.get("final") is None):
        out.append(warning("empty_convergence", "convergence", "no validation point was recorded during "
                           "training: the convergence curve is empty"))
    for record in ood_records or []:
        if record.get("skipped"):
            out.append(warning("ood_skipped", f"ood.{record.get('name')}", f"OOD target {record.get('name')!r} "
                               f"was skipped: {record['skipped']}"))
    return out
