"""A generated dataset in the layout docs/own-dataset.md describes: ``labels.csv`` + ``images/*.png``.

One CSV carries every label shape the walkthrough uses, so one folder serves the binary, multiclass and
multilabel tasks:

* ``abnormal``: 0/1 (binary);
* ``diagnosis``: ``normal`` / ``benign`` / ``malignant`` (multiclass);
* ``effusion``, ``edema``: 1 / 0 / blank (multilabel, blank = not read);
* ``patient``: ``P0001``...; image files ``P0001_a.png``, ``P0001_b.png`` (the patient is also in the name);
* ``sex`` (``F``/``M``), ``age`` (years), ``scanner`` (``S1``/``S2``), ``split`` (``train``/``val``/``test``,
  by patient).

Pixels carry the labels (a bright square per finding, a texture per class) under noise, so a short CPU run
learns something. ``site="B"`` draws other patients with a dimmer, noisier look: the OOD target.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

CLASSES = ("normal", "benign", "malignant")


def _image(rng: np.random.Generator, size: int, abnormal: int, cls: int, effusion: int, edema: int,
           site: str) -> np.ndarray:
    img = rng.normal(90 if site == "A" else 70, 25 if site == "A" else 40, (size, size))
    q = size // 2
    if abnormal:
        img[2:q - 2, 2:q - 2] += 70
    if effusion:
        img[q + 2:size - 2, 2:q - 2] += 60
    if edema:
        img[2:q - 2, q + 2:size - 2] += 60
    if cls:
        img[q:, q:] += 25 * cls * ((np.indices((size - q, size - q)).sum(0) % 2) * 2 - 1)
    return np.clip(img, 0, 255).astype(np.uint8)


def make_csv_dataset(folder: Path, *, n_patients: int = 80, seed: int = 0, site: str = "A", size: int = 24,
                     with_split: bool = True) -> Path:
    """Write ``folder/labels.csv`` and ``folder/images/*.png``; returns ``folder``."""
    from PIL import Image

    rng = np.random.default_rng([seed, 0 if site == "A" else 1])
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    prefix = "P" if site == "A" else "Q"
    for p in range(n_patients):
        patient = f"{prefix}{p + 1:04d}"
        sex = "F" if rng.random() < 0.5 else "M"
        age = int(rng.integers(20, 90))
        scanner = "S1" if rng.random() < 0.6 else "S2"
        split = ("train", "val", "test")[int(rng.choice(3, p=[0.6, 0.15, 0.25]))]
        abnormal = int(rng.random() < 0.4)
        cls = int(rng.choice(3, p=[0.5, 0.3, 0.2]))
        for k in range(int(rng.integers(1, 3))):
            effusion = int(rng.random() < 0.35)
            edema = int(rng.random() < 0.3)
            name = f"{patient}_{'ab'[k]}"
            Image.fromarray(_image(rng, size, abnormal, cls, effusion, edema, site)).save(
                folder / "images" / f"{name}.png")
            row = {"image": f"{name}.png", "patient": patient, "abnormal": abnormal, "diagnosis": CLASSES[cls],
                   "effusion": effusion, "edema": "" if rng.random() < 0.05 else edema, "sex": sex, "age": age,
                   "scanner": scanner}
            if with_split:
                row["split"] = split
            rows.append(row)
    with open(folder / "labels.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    return folder
