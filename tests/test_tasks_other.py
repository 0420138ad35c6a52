"""The built-in tasks and suites of the non-chest-X-ray families: valid, complete, plannable without data."""

from __future__ import annotations

import pytest
from conftest import run_cli

from medbench.data.base import get_adapter
from medbench.data.medmnist_info import SETS
from medbench.spec.catalog import Catalog

SUITES = {
    "tuberculosis": ["tuberculosis"],
    "covidx": ["covidx"],
    "dermatology": ["ham10000", "isic-2019", "isic-2020"],
    "mammography": ["cbis-ddsm", "vindr-mammo"],
    "medmnist": list(SETS),
}
EXTRA = ["tuberculosis-shenzhen", "tuberculosis-montgomery", "covidx-binary", "vindr-mammo-density"]
ALL = [t for tasks in SUITES.values() for t in tasks] + EXTRA


def test_suites_list_their_tasks() -> None:
    catalog = Catalog()
    for suite, tasks in SUITES.items():
        assert catalog.suite_tasks(suite) == tasks


@pytest.mark.parametrize("name", ALL)
def test_task_is_complete(name: str) -> None:
    task = Catalog().task(name)
    spec = task.spec
    adapter = get_adapter(spec.dataset.adapter)
    assert getattr(adapter, "needs_root", True) and "http" in adapter.how_to_get
    assert spec.expected_train_size and spec.version == 1 and spec.attributes is not None
    assert spec.headline in spec.metrics and set(spec.metrics) <= {"auc", "accuracy", "balanced_accuracy"}
    # the ISIC challenges rank dermatology by balanced multiclass accuracy: those tasks report it too
    assert ("balanced_accuracy" in spec.metrics) == (spec.family == "dermatology" and spec.type == "multiclass")
    if spec.family == "medmnist":
        info = SETS[spec.dataset.options["flag"]]
        assert spec.labels == info.task_labels() and spec.input.channels == info.channels
        assert (spec.input.resize, spec.input.crop) == (160, 128) and spec.splits.method == "official"
        assert spec.expected_train_size == info.n_samples["train"]
    else:
        assert spec.input.resize is None and spec.input.crop is None  # BiT-HyperRule by native size
        assert spec.hyperrule.batch_size == 512 and spec.hyperrule.schedule is None


def test_every_task_plans_without_data_and_says_where_to_get_it() -> None:
    args = [a for s in SUITES for a in ("--suite", s)] + [a for t in EXTRA for a in ("--task", t)]
    proc = run_cli("run", "--backbone", "cbr-small", *args, "--dry-run")
    assert proc.returncode == 0, proc.stderr
    out = " ".join(proc.stdout.split())
    for name in ALL:
        assert f"for {name} (looked in" in out, name
    for page in ("https://zenodo.org/records/10519652", "https://data.lhncbc.nlm.nih.gov/", "kaggle.com",
                 "https://doi.org/10.7910/DVN/DBW86T", "https://challenge.isic-archive.com/data/",
                 "https://www.cancerimagingarchive.net/collection/cbis-ddsm/",
                 "https://physionet.org/content/vindr-mammo/1.0.0/"):
        assert page in out, page
    assert "images/<study_id>/<image_id>.dicom" in out and "CHNCXR_####_{0,1}.png" in out
