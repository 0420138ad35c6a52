"""A dataset of one's own (issue 17) and the data checks of issue 14 (items 6, 7, 9): a CSV task is checked
before training, its split counts rows without a split, image content keys the cache and the runs, an
evaluation-only set is scored as an OOD target, a built-in task is included by name."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from conftest import run_cli
from csv_datasets import make_csv_dataset

from medbench.data.locate import DataLocations
from medbench.errors import DataError, SpecError
from medbench.spec.catalog import Catalog

BINARY = """task: {name}
version: 1
family: own
dataset:
  name: mydata
  adapter: csv
  options:
    csv: labels.csv
    path_column: image
    path_root: images
    patient_column: patient
    label_columns: {{abnormal: abnormal}}
    sex_column: sex
    age_column: age
type: binary
labels: [abnormal]
metrics: [auc, accuracy]
headline: auc
splits: {{method: grouped, fractions: {{train: 0.6, val: 0.2, test: 0.2}}}}
input: {{resize: 24, crop: 20, channels: 1}}
hyperrule: {{batch_size: 16, base_lr: 0.3, schedule: [1, 2, 3, 4, 5], mixup_alpha: 0.0}}
default_seeds: 1
{extra}"""


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_csv_dataset(tmp_path_factory.mktemp("own") / "mydata", n_patients=60)


def write_task(folder: Path, name: str = "own", extra: str = "") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.yaml").write_text(BINARY.format(name=name, extra=extra))
    return folder


# --------------------------------------------------------------------------- stale pixels (issue 14 item 7)


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_replaced_images_get_a_new_cache_entry_and_run_key(dataset: Path, tmp_path: Path) -> None:
    """Issue 14 item 7: replacing every image with noise (same paths, same labels) reused the cached pixels
    (AUC 1.0 instead of 0.5) and an existing store's result. The file stamps (size + mtime) now key both."""
    from medbench.run.prepare import prepare_data
    from medbench.run.request import RunRequest
    from medbench.run.runner import Runner
    from medbench.store import RunStore

    data = _copy(dataset, tmp_path / "mydata")
    tasks = write_task(tmp_path / "tasks")
    catalog = Catalog([tasks])
    locations = DataLocations(overrides={"mydata": data})
    runner = Runner(catalog, locations, RunStore(tmp_path / "out"))
    req = RunRequest(task="own", backbone="cbr-tiny", seed=0)
    before = runner.prepared("own")
    folder_before = runner.locate(req)
    first = np.asarray(before.images.pixels[0]).copy()

    rng = np.random.default_rng(1)
    from PIL import Image

    for png in sorted((data / "images").glob("*.png")):
        st = png.stat()
        Image.fromarray(rng.integers(0, 256, (24, 24), dtype=np.uint8)).save(png)
        os.utime(png, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # a later write, as a copy makes
    after = prepare_data(catalog.task("own"), locations, runner.reporter)
    assert after.images.path != before.images.path  # a new cache entry, decoded from the new files
    assert after.fingerprint != before.fingerprint  # the run key's data fingerprint
    row0 = before.data.index.table["path"][0]
    expected = np.asarray(Image.open(data / row0).convert("L").resize((24, 24), Image.BILINEAR))
    assert np.array_equal(np.asarray(after.images.pixels[0])[0], expected)
    assert not np.array_equal(np.asarray(after.images.pixels[0]), first)
    fresh = Runner(catalog, locations, RunStore(tmp_path / "out"))
    assert fresh.locate(req).path != folder_before.path  # an existing store does not reuse the old run


def test_content_check_catches_what_size_and_mtime_cannot(dataset: Path, tmp_path: Path) -> None:
    """A file rewritten with the same size and its old mtime restored keeps its stat stamp (the documented
    limit of the cheap check); --verify-pixels (sha256 of every file) changes the keys."""
    from medbench.data.cache import row_paths
    from medbench.data.fingerprint import file_stamps
    from medbench.run.prepare import prepare_data
    from medbench.run.runner import SilentReporter

    from PIL import Image

    data = _copy(dataset, tmp_path / "mydata")
    victim = data / "images" / "P0001_a.png"
    Image.open(victim).save(victim, compress_level=0)  # uncompressed: any 24x24 grey image has this size
    catalog = Catalog([write_task(tmp_path / "tasks")])
    stat_loc = DataLocations(overrides={"mydata": data})
    content_loc = DataLocations(overrides={"mydata": data}, pixel_check="content")
    stat_before = prepare_data(catalog.task("own"), stat_loc, SilentReporter())
    content_before = prepare_data(catalog.task("own"), content_loc, SilentReporter())
    assert content_before.fingerprint != stat_before.fingerprint  # the mode is part of the key
    st = victim.stat()
    noise = np.random.default_rng(2).integers(0, 256, (24, 24), dtype=np.uint8)
    Image.fromarray(noise).save(victim, compress_level=0)
    assert victim.stat().st_size == st.st_size
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))  # a tool that restores the old mtime
    assert prepare_data(catalog.task("own"), stat_loc, SilentReporter()).fingerprint == stat_before.fingerprint
    assert prepare_data(catalog.task("own"), content_loc, SilentReporter()).fingerprint != content_before.fingerprint
    # the stamps themselves, against an independent reading of the file system
    import hashlib

    paths = row_paths(stat_before.data.index)
    stats = file_stamps(data, paths, "stat")
    sums = file_stamps(data, paths, "content")
    for p, s, c in zip(paths, stats, sums):
        st = os.stat(data / p)
        assert s == f"{st.st_size}:{st.st_mtime_ns}"
        assert c == hashlib.sha256((data / p).read_bytes()).hexdigest()
