"""Task and suite specs: validation, include inheritance, hashing, discovery."""

from __future__ import annotations

from pathlib import Path

import pytest

from medbench.errors import SpecError
from medbench.spec import TaskSpec, parse_task_file, task_content_hash
from medbench.spec.catalog import Catalog

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


def _hash(folder: Path, extra: str, name: str = "h.yaml") -> str:
    return parse_task_file(write(folder, name, "task: h\ninclude: _base.yaml\n" + extra)).hash


def test_hash_ignores_cosmetic_fields(tmp_path: Path) -> None:
    write(tmp_path, "_base.yaml", BASE)
    plain = _hash(tmp_path, "")
    for cosmetic in ("description: first wording\n", "description: a better wording\n",
                     "citation: Someone et al. 2024\n", "family: another-family\n", "default_seeds: 2\n",
                     "expected_train_size: 12345\n"):
        assert _hash(tmp_path, cosmetic) == plain, cosmetic


def test_hash_changes_with_what_fixes_the_numbers(tmp_path: Path) -> None:
    write(tmp_path, "_base.yaml", BASE)
    plain = _hash(tmp_path, "")
    changed = {
        "label": "labels: [tb]\n",
        "split seed": "splits: {seed: 1}\n",
        "hyperrule value": "hyperrule: {base_lr: 0.01}\n",
        "hyperrule value from the base": "hyperrule: {batch_size: 16}\n",
        "dataset option": "dataset: {options: {n_patients: 41}}\n",
        "version": "version: 4\n",
        "OOD target": "ood: [{task: other}]\n",
        "scoring": "scoring: {bootstrap: 10}\n",
    }
    hashes = {what: _hash(tmp_path, text) for what, text in changed.items()}
    for what, h in hashes.items():
        assert h != plain, what
    assert len(set(hashes.values())) == len(hashes)


def test_hash_is_the_same_with_defaults_spelled_out(tmp_path: Path) -> None:
    write(tmp_path, "_base.yaml", BASE)
    explicit = ("splits: {method: grouped, seed: 0, fractions: {test: 0.2, train: 0.7, val: 0.1}}\n"
                "hyperrule: {base_lr: 0.003, momentum: 0.9, mixup_alpha: null}\n"
                "dataset: {on_bad_image: fail}\nmetrics: [auc, accuracy]\nheadline: auc\nsampler: uniform\n"
                "scoring: {bootstrap: 1000, threshold: youden}\nood: [{task: other, label_map: {}}]\n")
    assert _hash(tmp_path, explicit) == _hash(tmp_path, "ood: [{task: other}]\n")


def test_hash_survives_a_new_optional_field(tmp_path: Path) -> None:
    """A field medbench adds later, left at its default, keeps every existing task hash."""
    write(tmp_path, "_base.yaml", BASE)
    resolved = parse_task_file(write(tmp_path, "h.yaml", "task: h\ninclude: _base.yaml\n"))

    class LaterTaskSpec(TaskSpec):
        label_smoothing: float = 0.0
        extra_augmentation: str | None = None

    later = LaterTaskSpec.model_validate(resolved.spec.model_dump())
    assert task_content_hash(later) == resolved.hash
    assert task_content_hash(LaterTaskSpec.model_validate({**resolved.spec.model_dump(), "label_smoothing": 0.1})) \
        != resolved.hash


def test_errors_in_included_files_name_the_defining_file(tmp_path: Path) -> None:
    write(tmp_path, "_base.yaml", BASE.replace("batch_size: 8", "batch_size: many"))
    write(tmp_path, "_mid.yaml", "include: _base.yaml\n")
    direct = write(tmp_path, "t.yaml", "task: t\ninclude: _base.yaml\n")
    base = tmp_path / "_base.yaml"
    with pytest.raises(SpecError) as info:
        parse_task_file(direct)
    assert str(info.value).startswith(f"{base} (included by {direct}): hyperrule.batch_size: ")
    assert "integer" in str(info.value) and "\n" not in str(info.value)

    nested = write(tmp_path, "n.yaml", "task: n\ninclude: _mid.yaml\n")
    with pytest.raises(SpecError) as info:
        parse_task_file(nested)
    assert str(info.value).startswith(f"{base} (included by {nested} via {tmp_path / '_mid.yaml'}): "
                                      "hyperrule.batch_size: ")

    # the task file overrides the bad value with another bad one: the task file is named
    own = write(tmp_path, "o.yaml", "task: o\ninclude: _base.yaml\nhyperrule: {batch_size: 0}\n")
    with pytest.raises(SpecError) as info:
        parse_task_file(own)
    assert str(info.value).startswith(f"{own}: hyperrule.batch_size: ")


def test_errors_across_files_and_in_included_yaml(tmp_path: Path) -> None:
    write(tmp_path, "_base.yaml", BASE)
    # crop from the task, resize from the base: the check of the merged mapping is reported at the task
    mixed = write(tmp_path, "m.yaml", "task: m\ninclude: _base.yaml\ninput: {crop: 64}\n")
    with pytest.raises(SpecError) as info:
        parse_task_file(mixed)
    assert str(info.value).startswith(f"{mixed}: input: crop (64) must not exceed resize (40)")
    # an unknown key and a bad list item in the base
    write(tmp_path, "_typo.yaml", BASE + "labelz: [a]\n")
    typo = write(tmp_path, "y.yaml", "task: y\ninclude: _typo.yaml\n")
    with pytest.raises(SpecError, match=r"_typo.yaml \(included by .*y.yaml\): labelz: unknown field"):
        parse_task_file(typo)
    write(tmp_path, "_bins.yaml", BASE + "attributes: [{name: age, bins: [3, 1]}]\n")
    bins = write(tmp_path, "b.yaml", "task: b\ninclude: _bins.yaml\n")
    with pytest.raises(SpecError, match=r"_bins.yaml \(included by .*b.yaml\): attributes.0.bins: "):
        parse_task_file(bins)
    write(tmp_path, "_broken.yaml", "labels: [a\n")
    broken = write(tmp_path, "k.yaml", "task: k\ninclude: _broken.yaml\n")
    with pytest.raises(SpecError, match=r"_broken.yaml \(included by .*k.yaml\): line \d+: invalid YAML"):
        parse_task_file(broken)


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


def test_suites_declare_variant_runs_for_their_tasks(tmp_path: Path) -> None:
    assert Catalog().suite_variants("smoke") == {
        "smoke-mammo": [{"fraction": 0.25}, {"shots": 10}, {"resolution": 24}]}
    # nested suites pass theirs on; repeats are dropped; 100 % is the plain run, not a variant
    write(tmp_path, "outer.yaml", "suite: outer\nsuites: [smoke]\n"
          "variants: [{tasks: [smoke-mammo, smoke-tb], fractions: [25, 100], shots: [5]}]\n")
    assert Catalog([tmp_path]).suite_variants("outer") == {
        "smoke-mammo": [{"fraction": 0.25}, {"shots": 10}, {"resolution": 24}, {"shots": 5}],
        "smoke-tb": [{"fraction": 0.25}, {"shots": 5}]}


@pytest.mark.parametrize(("variants", "field", "fragment"), [
    ("[{tasks: [smoke-cxr], fractions: [0]}]", "variants.0.fractions", "percentages must be in (0, 100]"),
    ("[{tasks: [smoke-cxr], shots: [0]}]", "variants.0.shots", "shots must be >= 1"),
    ("[{tasks: [smoke-cxr], resolutions: [4]}]", "variants.0.resolutions", "resolutions must be >= 8 px"),
    ("[{tasks: [], shots: [5]}]", "variants.0.tasks", "at least 1 item"),
    ("[{tasks: [smoke-cxr], epochs: [5]}]", "variants.0.epochs", "unknown field; expected one of: fractions"),
    ("[{tasks: [smoke-tb], shots: [5]}]", "variants.0.tasks", "task 'smoke-tb' is not in the suite"),
])
def test_suite_variant_errors_name_the_file_and_field(tmp_path: Path, variants: str, field: str,
                                                      fragment: str) -> None:
    path = write(tmp_path, "s.yaml", f"suite: s\ntasks: [smoke-cxr]\nvariants: {variants}\n")
    with pytest.raises(SpecError) as err:
        Catalog([tmp_path]).suite_variants("s")
    assert str(err.value).startswith(f"{path}: {field}: ") and fragment in str(err.value), str(err.value)


def test_broken_task_plugins_warn_and_the_rest_load(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    from importlib.metadata import EntryPoint

    from medbench.spec import catalog as catalog_module
    from medbench import plugins

    good, half = tmp_path / "good", tmp_path / "half"
    for folder in (good, half):
        folder.mkdir()
        write(folder, "_base.yaml", BASE)
    write(good, "plug-task.yaml", "task: plug-task\ninclude: _base.yaml\n")
    write(half, "half-task.yaml", "task: half-task\ninclude: _base.yaml\n")
    write(half, "z-broken.yaml", "task: [unclosed\n")
    (tmp_path / "medbench_fake_task_plugin.py").write_text(
        f"GOOD = {str(good)!r}\nHALF = {str(half)!r}\nMISSING = {str(tmp_path / 'nowhere')!r}\n"
        f"def tasks_dir():\n    return GOOD\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    group_name = catalog_module.TASK_ENTRY_POINT_GROUP
    eps = [EntryPoint("broken", "medbench_no_such_module:tasks_dir", group_name),
           EntryPoint("missing", "medbench_fake_task_plugin:MISSING", group_name),
           EntryPoint("half", "medbench_fake_task_plugin:HALF", group_name),
           EntryPoint("good", "medbench_fake_task_plugin:tasks_dir", group_name)]
    monkeypatch.setattr(catalog_module, "entry_points", lambda group: eps if group == group_name else [])
    monkeypatch.setattr(plugins, "_WARNED", set())

    catalog = Catalog()
    assert "plug-task" in catalog.task_names() and "smoke-tb" in catalog.task_names()
    assert catalog.task("plug-task").source == "entry point good"
    assert "half-task" not in catalog.task_names()  # a plug-in loads whole or not at all
    warnings = capsys.readouterr().err.splitlines()
    assert len(warnings) == 3 and all(w.startswith("medbench: warning: entry point ") and w.endswith("; skipped")
                                      for w in warnings)
    assert "'broken' (medbench.tasks = 'medbench_no_such_module:tasks_dir') failed to load: ModuleNotFoundError: " \
           "No module named 'medbench_no_such_module'" in warnings[0]
    assert "'missing'" in warnings[1] and "nowhere: names no tasks folder" in warnings[1]
    assert "'half'" in warnings[2] and "z-broken.yaml: line 2: invalid YAML" in warnings[2]
    Catalog()
    assert capsys.readouterr().err == ""  # once per process

    with pytest.raises(SpecError) as info:  # maybe one of the broken plug-ins' tasks: the error says why
        catalog.task("half-task")
    message = str(info.value)
    assert message.startswith("--task: unknown task 'half-task'") and "\n" not in message
    assert "plug-in that does not load: entry point 'broken'" in message and "No module named" in message
    assert "z-broken.yaml: line 2: invalid YAML" in message
    # the user's own folders still stop the command
    with pytest.raises(SpecError, match=r"z-broken.yaml: line 2: invalid YAML"):
        Catalog([half])

