"""The embedded default: procedurally generated images with real label structure.

Each family mimics its real counterpart's labels (CheXpert's five with some
uncertain labels, PadChest's lowercase findings, binary TB, COVIDx's three
classes, HAM10000's seven ``dx`` classes, binary mammography). Each label has
its own texture (a Gabor patch of a given orientation and frequency, a blob,
a ring or a checkerboard) stamped at random positions, so a network must learn
translation- and flip-invariant detectors, as with real findings.

Built in:

* **attributes**: sex (M/F), age (years), view and site per patient;
* **a harder subgroup**: images of female patients carry the signal at
  ``hard_group_amplitude`` (default 0.55) of the amplitude, with more noise;
* **a shifted site**: ``site: B`` renders with other contrast, gamma, blur and
  noise, and other patients, for the OOD axis.

Deterministic from ``seed``; generated once and cached under
``<cache>/synthetic/``.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Literal

import numpy as np
import polars as pl
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from medbench.data.base import DatasetIndex, label_column
from medbench.errors import DataError
from medbench.paths import cache_dir
from medbench.utils import atomic_write_bytes, sha256_json

GENERATOR_VERSION = 2

FAMILIES: dict[str, dict[str, Any]] = {
    "cxr": {
        "type": "multilabel",
        "labels": ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"],
        "prevalence": [0.30, 0.25, 0.2, 0.3, 0.35],
        "uncertain": 0.06,
        "channels": 1,
        "views": ["PA", "AP"],
        "amplitude": 1.0,
    },
    "padchest": {
        "type": "multilabel",
        "labels": ["cardiomegaly", "pleural effusion", "pneumonia", "atelectasis", "nodule", "scoliosis"],
        "prevalence": [0.3, 0.25, 0.2, 0.25, 0.2, 0.3],
        "uncertain": 0.0,
        "channels": 1,
        "views": ["PA", "AP", "LATERAL"],
        "amplitude": 1.0,
    },
    "tb": {"type": "binary", "labels": ["tuberculosis"], "prevalence": [0.5], "channels": 1, "views": ["PA"],
           "amplitude": 0.35},
    "covidx": {
        "type": "multiclass",
        "labels": ["normal", "pneumonia", "COVID-19"],
        "prevalence": [0.45, 0.35, 0.2],
        "channels": 1,
        "views": ["PA", "AP"],
        "amplitude": 0.4,
    },
    "derm": {
        "type": "multiclass",
        "labels": ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"],
        "prevalence": [0.1, 0.12, 0.16, 0.08, 0.16, 0.3, 0.08],
        "channels": 3,
        "views": ["dermoscopy"],
        "amplitude": 0.7,
    },
    "mammo": {"type": "binary", "labels": ["malignant"], "prevalence": [0.45], "channels": 1, "views": ["CC", "MLO"],
              "amplitude": 0.3},
}


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")

    family: Literal["cxr", "padchest", "tb", "covidx", "derm", "mammo"]
    n_patients: int = Field(400, ge=4)
    max_images_per_patient: int = Field(3, ge=1)
    image_size: int = Field(40, ge=16, le=512)
    site: Literal["A", "B"] = "A"
    #: signal amplitude of the harder subgroup (female patients), relative to the others
    hard_group_amplitude: float = Field(0.55, gt=0, le=1)
    #: signal amplitude; null: the family's own (chosen so a small CNN lands well below AUC 1)
    amplitude: float | None = Field(None, gt=0)
    noise: float = Field(0.22, ge=0)
    seed: int = 0


def _textures(size: int, n: int) -> list[np.ndarray]:
    """``n`` distinct flip-robust textures of ``size`` x ``size``, zero mean, unit peak."""
    r = size // 2
    yy, xx = np.mgrid[-r : size - r, -r : size - r].astype(np.float32)
    env = np.exp(-(xx**2 + yy**2) / (2 * (size / 4.0) ** 2))
    rad = np.sqrt(xx**2 + yy**2)
    bank = [
        env * np.cos(2 * np.pi * 0.11 * yy),  # horizontal stripes, low frequency
        env * np.cos(2 * np.pi * 0.11 * xx),  # vertical stripes, low frequency
        env * np.cos(2 * np.pi * 0.22 * yy),  # horizontal stripes, high frequency
        np.exp(-(rad**2) / (2 * (size / 6) ** 2)),  # bright blob
        np.exp(-((rad - size / 3.2) ** 2) / (2 * 1.0**2)),  # ring
        env * np.cos(2 * np.pi * 0.22 * xx),  # vertical stripes, high frequency
        env * np.sign(np.cos(np.pi * xx / 3) * np.cos(np.pi * yy / 3)),  # checkerboard
    ]
    out = []
    for t in bank[:n]:
        t = t - t.mean()
        out.append((t / np.abs(t).max()).astype(np.float32))
    return out


def _smooth_field(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    """Low-frequency background: a few broad Gaussians per image (anatomy-like)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    field = np.zeros((n, size, size), dtype=np.float32)
    for _ in range(3):
        cy, cx = rng.uniform(0.2, 0.8, (2, n, 1, 1)).astype(np.float32)
        s = rng.uniform(0.15, 0.35, (n, 1, 1)).astype(np.float32)
        a = rng.uniform(-0.15, 0.15, (n, 1, 1)).astype(np.float32)
        field += a * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s**2))
    return field


def _blur(img: np.ndarray) -> np.ndarray:
    """Separable [1, 2, 1] / 4 blur of ``[N, H, W]`` images, edges replicated."""
    p = np.pad(img, ((0, 0), (1, 1), (0, 0)), mode="edge")
    img = 0.25 * p[:, :-2] + 0.5 * p[:, 1:-1] + 0.25 * p[:, 2:]
    p = np.pad(img, ((0, 0), (0, 0), (1, 1)), mode="edge")
    return 0.25 * p[:, :, :-2] + 0.5 * p[:, :, 1:-1] + 0.25 * p[:, :, 2:]


def generate(opts: Options) -> tuple[pl.DataFrame, np.ndarray, list[str]]:
    """Table, uint8 pixels ``[N, H, W]`` or ``[N, H, W, 3]``, and label names for ``opts``."""
    fam = FAMILIES[opts.family]
    labels: list[str] = fam["labels"]
    n_labels = len(labels)
    size = opts.image_size
    # Patients of site B are other people: the stream depends on the site.
    rng = np.random.default_rng([opts.seed, GENERATOR_VERSION, 0 if opts.site == "A" else 1,
                                 list(FAMILIES).index(opts.family)])

    n_img = rng.integers(1, opts.max_images_per_patient + 1, size=opts.n_patients)
    patient_of = np.repeat(np.arange(opts.n_patients), n_img)
    n = int(patient_of.size)
    sex_p = rng.choice(np.array(["M", "F"]), size=opts.n_patients)
    age_p = rng.integers(18, 91, size=opts.n_patients).astype(np.float64)
    sex = sex_p[patient_of]
    age = age_p[patient_of] + rng.integers(0, 3, size=n)  # follow-up images are a little later
    views = np.array(fam["views"])
    view = views[rng.integers(0, len(views), size=n)]

    prev = np.asarray(fam["prevalence"], dtype=np.float64)
    if fam["type"] == "multiclass":
        cls = rng.choice(n_labels, size=n, p=prev / prev.sum())
        y = np.eye(n_labels, dtype=np.float32)[cls]
        present = y
    else:
        y = (rng.random((n, n_labels)) < prev).astype(np.float32)
        present = y
    hard = sex == "F"
    base_amp = opts.amplitude if opts.amplitude is not None else fam["amplitude"]
    amp = base_amp * np.where(hard, opts.hard_group_amplitude, 1.0).astype(np.float32)
    noise = opts.noise * np.where(hard, 1.25, 1.0).astype(np.float32)

    channels = fam["channels"]
    tex_size = max(8, size // 2)
    textures = _textures(tex_size, n_labels)
    img = 0.5 + _smooth_field(rng, n, size)
    for k in range(n_labels):
        idx = np.nonzero(present[:, k])[0]
        for i in idx:
            oy, ox = rng.integers(0, size - tex_size + 1, size=2)
            img[i, oy : oy + tex_size, ox : ox + tex_size] += amp[i] * 0.5 * textures[k]
    img += noise[:, None, None] * rng.standard_normal(img.shape).astype(np.float32) * 0.5

    if opts.site == "B":  # another scanner: lower contrast, gamma, blur, brighter, noisier
        img = _blur(_blur(img))
        img = 0.2 + 0.6 * np.clip(img, 0, 1) ** 0.7
        img += 0.08 * rng.standard_normal(img.shape).astype(np.float32)

    img = np.clip(img, 0.0, 1.0)
    if channels == 3:
        tint = np.array([1.0, 0.78, 0.72], dtype=np.float32)  # skin-like colour
        img = img[..., None] * tint
    pixels = np.round(img * 255).astype(np.uint8)

    if fam.get("uncertain", 0) > 0:  # CheXpert-like uncertain labels, read as missing (U-Ignore)
        mask = rng.random((n, n_labels)) < fam["uncertain"]
        y = np.where(mask, np.nan, y)

    site_name = f"synthetic-{opts.site}"
    table = pl.DataFrame(
        {
            "sample_id": [f"{opts.family}-{opts.site}-{i:05d}" for i in range(n)],
            "patient_id": [f"{opts.site}{p:05d}" for p in patient_of],
            "sex": sex.tolist(),
            "age": age.astype(np.float64),
            "view": view.tolist(),
            "site": [site_name] * n,
        }
    )
    label_cols = {
        label_column(lab): pl.Series(
            [None if np.isnan(v) else int(v) for v in y[:, k]], dtype=pl.Int8
        )
        for k, lab in enumerate(labels)
    }
    table = table.with_columns(**label_cols)
    return table, pixels, labels


class SyntheticAdapter:
    name = "synthetic"
    description = "procedurally generated images with real label structure (the embedded default)"
    how_to_get = "nothing to get: generated on first use and cached"
    needs_root = False

    def load(self, root: Path | None, options: dict[str, Any], labels: list[str], task_type: str) -> DatasetIndex:
        try:
            opts = Options.model_validate(options)
        except ValidationError as err:
            e = err.errors()[0]
            raise DataError(e["msg"], where="synthetic adapter",
                            field="dataset.options." + ".".join(map(str, e["loc"]))) from None
        fam = FAMILIES[opts.family]
        if fam["type"] != task_type:
            raise DataError(f"family {opts.family!r} is {fam['type']}, the task says {task_type}",
                            where="synthetic adapter", field="type")
        if list(labels) != fam["labels"]:
            raise DataError(f"family {opts.family!r} has labels {fam['labels']}", where="synthetic adapter",
                            field="labels")
        key = sha256_json({"v": GENERATOR_VERSION, **opts.model_dump()})[:16]
        path = cache_dir() / "synthetic" / f"{opts.family}-{opts.site}-{key}.npz"
        if path.is_file():
            with np.load(path, allow_pickle=False) as z:
                pixels = z["pixels"]
                table = pl.read_ipc(io.BytesIO(z["table"].tobytes()))
            label_names = fam["labels"]
        else:
            table, pixels, label_names = generate(opts)
            buf = io.BytesIO()
            table.write_ipc(buf)
            out = io.BytesIO()
            np.savez(out, pixels=pixels, table=np.frombuffer(buf.getvalue(), dtype=np.uint8))
            atomic_write_bytes(path, out.getvalue())
        return DatasetIndex(name=f"synthetic-{opts.family}-{opts.site}", table=table, label_names=label_names,
                            pixels=pixels, notes={"generator_version": GENERATOR_VERSION})


ADAPTER = SyntheticAdapter()
