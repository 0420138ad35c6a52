"""Training subsets for the data-efficiency axis: fractions of the training set and k examples per class.

Both are drawn from a seeded order of the training images that depends only
on the run seed and the patient/sample ids (a keyed hash, like the splits),
so a subset is reproducible, differs between seeds, and smaller subsets of a
seed are contained in larger ones (nested):

* **Patient order.** Patients are ordered by ``hash(seed, patient_id)``,
  each patient's images by ``hash(seed, sample_id)``.
* **Fraction f** (of the training *images*): whole patients are taken in
  patient order until at least ``max(1, round(f * n_train))`` images are in;
  a patient is never split, so the subset may exceed the target by less
  than one patient's images. The actual size is recorded.
* **k-shot** (CJ21: 1, 5, 10, 100, 500 examples per class): images are
  taken in *interleaved* order — every patient's first image (in patient
  order), then every patient's second image, ... — so the k examples of a
  class come from k different patients whenever the class has that many.
  Classes: multiclass — each class; binary — positives and negatives;
  **multilabel — each label's positives, plus the "no finding" images (no
  positive label)**: the subset is the union of the first k images of each
  of these classes, so every label has at least k positives (more when
  images carry several findings) and the model sees k images without
  findings. Missing (uncertain) labels never count as positive. A class
  with fewer than k images contributes all it has. The per-class counts
  are recorded.

Nesting holds because every subset is a union of prefixes of fixed orders.
"""

from __future__ import annotations

import hashlib

import numpy as np
import polars as pl


def _hash_rank(keys: list[str], salt: str) -> np.ndarray:
    key = salt.encode()[:64]
    h = np.array([int.from_bytes(hashlib.blake2b(k.encode(), key=key, digest_size=8).digest(), "big") for k in keys],
                 dtype=np.uint64)
    return np.argsort(np.argsort(h, kind="stable"), kind="stable")


def seeded_order(table: pl.DataFrame, rows: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows in patient order, each row's patient rank, each row's rank within its patient)."""
    rows = np.asarray(rows, dtype=np.int64)
    sub = table[rows.tolist()]
    patients = [str(p) if p is not None else f"sample:{s}" for p, s in
                zip(sub["patient_id"].to_list(), sub["sample_id"].to_list())]
    samples = [str(s) for s in sub["sample_id"].to_list()]
    uniq, inv = np.unique(np.asarray(patients, dtype=str), return_inverse=True)
    p_rank = _hash_rank(list(uniq), f"medbench-subset-patient:{seed}:")[inv]
    s_rank = _hash_rank(samples, f"medbench-subset-sample:{seed}:")
    by_patient = np.lexsort((s_rank, p_rank))
    within = np.empty(rows.size, dtype=np.int64)
    sorted_p = p_rank[by_patient]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_p)) + 1]
    counts = np.diff(np.r_[starts, sorted_p.size])
    within[by_patient] = np.arange(sorted_p.size) - np.repeat(starts, counts)
    return rows[by_patient], p_rank, within


def fraction_subset(table: pl.DataFrame, rows: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Whole patients in seeded order until ``max(1, round(fraction * len(rows)))`` images are in."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction {fraction} is not in (0, 1]")
    ordered, p_rank, _ = seeded_order(table, rows, seed)
    target = max(1, int(round(fraction * len(rows))))
    ranks_sorted = np.sort(p_rank)
    last_rank = ranks_sorted[target - 1]  # the patient holding the target-th image is included whole
    return np.sort(ordered[np.sort(p_rank) <= last_rank])


def shot_classes(labels: np.ndarray, task_type: str, label_names: list[str]) -> dict[str, np.ndarray]:
    """Class membership (bool per row) for k-shot sampling; see the module docstring."""
    pos = labels == 1
    if task_type == "multiclass":
        return {name: pos[:, k] for k, name in enumerate(label_names)}
    if task_type == "binary":
        return {label_names[0]: pos[:, 0], f"not {label_names[0]}": labels[:, 0] == 0}
    known = ~np.isnan(labels)
    return {**{name: pos[:, k] for k, name in enumerate(label_names)},
            "(no finding)": ~pos.any(1) & known.any(1)}


def shots_subset(table: pl.DataFrame, labels: np.ndarray, rows: np.ndarray, shots: int, seed: int,
                 task_type: str, label_names: list[str]) -> tuple[np.ndarray, dict[str, int]]:
    """(rows, images per class): the first ``shots`` images of each class in interleaved order."""
    if shots < 1:
        raise ValueError(f"shots must be >= 1, got {shots}")
    ordered, p_rank, within = seeded_order(table, rows, seed)
    rows = np.asarray(rows, dtype=np.int64)
    interleaved = rows[np.lexsort((p_rank, within))]
    classes = shot_classes(labels[interleaved], task_type, label_names)
    chosen = np.zeros(interleaved.size, dtype=bool)
    for member in classes.values():
        idx = np.flatnonzero(member)[:shots]
        chosen[idx] = True
    picked = interleaved[chosen]
    picked_labels = labels[picked]
    per_class = {name: int(m.sum()) for name, m in shot_classes(picked_labels, task_type, label_names).items()}
    return np.sort(picked), per_class
