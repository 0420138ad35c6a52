"""Task and suite specs: validation, include inheritance, hashing, discovery."""

from __future__ import annotations

from pathlib import Path

import pytest

from medbench.catalog import Catalog
from medbench.errors import SpecError
from medbench.specs import parse_task_file

BASE = """
version: 3
family: chest-xray
dataset: {name: smoke, adapter: synthetic, options: {family: tb, n_patients: 40}}
type: binary
labels: [tuberculosis]
input: {resize: 40, crop: 32, channels: 1}
hyperrule: {batch_size: 8, schedule: [1, 2, 3, 4, 5]}
"""


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(text)
    return path


def test_include_merges_mappings_and_replaces_lists(tmp_path: Path) -> None:
    write(tmp_path, "_base.yaml", BASE + "metrics: [auc, accuracy]\nattributes: [sex, site]\n")
    child = write(tmp_path, "child.yaml", "task: child\ninclude: _base.yaml\n"
                                          "dataset: {options: {n_patients: 60}}\nattributes: [view]\n")
    spec = parse_task_file(child).spec
    assert spec.dataset.options == {"family": "tb", "n_patients": 60}  # merged key by key
    assert spec.dataset.adapter == "synthetic"
    assert [a.name for a in spec.attributes] == ["view"]  # lists replace
    assert spec.version == 3 and spec.task == "child"


def test_hash_is_stable_and_tracks_content(tmp_path: Path) -> None:
    write(tmp_path, "_base.yaml", BASE)
    a = write(tmp_path, "a.yaml", "task: a\ninclude: _base.yaml\n")
    b = write(tmp_path, "b.yaml", "task: a\ninclude: _base.yaml\nhyperrule: {base_lr: 0.01}\n")
    assert parse_task_file(a).hash == parse_task_file(a).hash
    assert parse_task_file(a).hash != parse_task_file(b).hash
    # formatting and key order do not change the hash; content does
    c = write(tmp_path, "c.yaml", "include: _base.yaml\n\n\ntask:   a\n")
    assert parse_task_file(a).hash == parse_task_file(c).hash


@pytest.mark.parametrize(
    ("text", "field", "fragment"),
    [
        ("task: x\ninclude: _base.yaml\nlabelz: [a]\n", "labelz", "did you mean 'labels'"),
        ("task: x\ninclude: _base.yaml\nhyperrule: {batch_size: many}\n", "hyperrule.batch_size", "integer"),
        ("task: x\ninclude: _base.yaml\ntype: regression\n", "type", "binary"),
        ("task: x\ninclude: _base.yaml\nsplits: {fractions: {train: 0.5, test: 0.2}}\n", "splits.fractions",
         "sum to 1"),
        ("task: x\ninclude: _base.yaml\ninput: {resize: 32, crop: 64}\n", "input", "must not exceed"),
        ("task: x\ninclude: _base.yaml\nheadline: f1\n", "(top level)", "headline 'f1'"),
        ("task: x\ninclude: missing.yaml\n", "include", "not found"),
        ("task: Bad Name\ninclude: _base.yaml\n", "task", "pattern"),
        ("task: x\ninclude: _base.yaml\nlabels: [a, b]\n", "(top level)", "exactly one label"),
    ],
)
def test_errors_name_file_and_field(tmp_path: Path, text: str, field: str, fragment: str) -> None:
    write(tmp_path, "_base.yaml", BASE)
    path = write(tmp_path, "x.yaml", text)
    with pytest.raises(SpecError) as info:
        parse_task_file(path)
    message = str(info.value)
    assert str(path) in message or "x.yaml" in message
    assert f": {field}: " in message
    assert fragment in message
    assert "\n" not in message


def test_include_cycle_is_reported(tmp_path: Path) -> None:
    write(tmp_path, "_a.yaml", "include: _b.yaml\n")
    write(tmp_path, "_b.yaml", "include: _a.yaml\n")
    path = write(tmp_path, "t.yaml", "task: t\ninclude: _a.yaml\n")
    with pytest.raises(SpecError, match=r"include cycle: t.yaml -> _a.yaml -> _b.yaml -> _a.yaml"):
        parse_task_file(path)


def test_yaml_syntax_error_gives_line(tmp_path: Path) -> None:
    path = write(tmp_path, "t.yaml", "task: t\nlabels: [a\nfamily: x\n")
    with pytest.raises(SpecError, match=r"t.yaml: line \d+: invalid YAML"):
        parse_task_file(path)


def test_builtin_catalog_has_smoke_suite() -> None:
    catalog = Catalog()
    tasks = catalog.suite_tasks("smoke")
    assert tasks == ["smoke-cxr", "smoke-padchest", "smoke-tb", "smoke-covidx", "smoke-derm", "smoke-mammo"]
    types = {t: catalog.task(t).spec.type for t in tasks}
    assert types == {"smoke-cxr": "multilabel", "smoke-padchest": "multilabel", "smoke-tb": "binary",
                     "smoke-covidx": "multiclass", "smoke-derm": "multiclass", "smoke-mammo": "binary"}
    assert len(catalog.task("smoke-cxr").spec.labels) == 5
    assert len(catalog.task("smoke-derm").spec.labels) == 7
    for t in tasks:  # every smoke task has a site-shift target that is itself a task
        assert catalog.task(t).spec.ood and catalog.task(catalog.task(t).spec.ood[0].task)


def test_tasks_dir_adds_and_overrides(tmp_path: Path) -> None:
    write(tmp_path, "_base.yaml", BASE)
    write(tmp_path, "mine.yaml", "task: mine\ninclude: _base.yaml\n")
    write(tmp_path, "smoke-tb.yaml", "task: smoke-tb\ninclude: _base.yaml\ndescription: my own\n")
    write(tmp_path, "my-suite.yaml", "suite: my-suite\ntasks: [mine]\nsuites: [smoke]\n")
    catalog = Catalog([tmp_path])
    assert "mine" in catalog.task_names()
    assert catalog.task("smoke-tb").spec.description == "my own"
    assert catalog.task("smoke-tb").source.startswith("dir ")
    assert catalog.suite_tasks("my-suite")[0] == "smoke-cxr" and catalog.suite_tasks("my-suite")[-1] == "mine"


def test_unknown_task_and_suite_suggest(tmp_path: Path) -> None:
    catalog = Catalog()
    with pytest.raises(SpecError, match=r"unknown task 'smoke-tbb' \(did you mean 'smoke-tb'"):
        catalog.task("smoke-tbb")
    with pytest.raises(SpecError, match=r"unknown suite 'smok' \(did you mean 'smoke'"):
        catalog.suite_tasks("smok")


def test_suite_naming_unknown_task_is_an_error(tmp_path: Path) -> None:
    write(tmp_path, "s.yaml", "suite: s\ntasks: [nope]\n")
    with pytest.raises(SpecError, match=r"s.yaml: tasks: unknown task 'nope'"):
        Catalog([tmp_path]).suite_tasks("s")
