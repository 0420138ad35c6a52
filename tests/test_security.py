"""Security rules, one test each: safe YAML, no eval/exec, no unpickling of files, weights and checkpoints
through safetensors or ``torch.load(weights_only=True)``, paths confined to the data root unless allowed."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from conftest import REPO

SOURCES = sorted((REPO / "medbench").rglob("*.py"))


def calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
            # owner: the module/object name of ``owner.name(...)``; None for a bare ``name(...)`` (a builtin)
            owner = (f.value.id if isinstance(f.value, ast.Name) else "?") if isinstance(f, ast.Attribute) else None
            yield node, owner, name


def keyword(node: ast.Call, name: str):
    for kw in node.keywords:
        if kw.arg == name:
            return kw.value.value if isinstance(kw.value, ast.Constant) else "<expr>"
    return None


@pytest.fixture(scope="module")
def trees() -> dict[Path, ast.AST]:
    assert len(SOURCES) > 30
    return {p: ast.parse(p.read_text(), filename=str(p)) for p in SOURCES}


def test_yaml_is_only_read_with_safe_load(trees) -> None:
    bad = [(p.name, n.lineno) for p, t in trees.items() for n, owner, name in calls(t)
           if owner == "yaml" and name in ("load", "load_all", "unsafe_load", "full_load", "unsafe_load_all")]
    assert bad == []
    assert any(owner == "yaml" and name == "safe_load" for t in trees.values() for _, owner, name in calls(t))


def test_no_eval_exec_or_shell(trees) -> None:
    bad = [(p.name, n.lineno, name) for p, t in trees.items() for n, owner, name in calls(t)
           if (owner is None and name in ("eval", "exec", "compile", "__import__"))
           or (owner == "os" and name in ("system", "popen"))
           or (name in ("run", "Popen", "call", "check_output") and keyword(n, "shell") is True)]
    assert bad == []


def test_no_pickle_anywhere(trees) -> None:
    imported = set()
    for t in trees.values():
        for node in ast.walk(t):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module.split(".")[0])
    assert not imported & {"pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}
    for p, t in trees.items():
        for n, owner, name in calls(t):
            if name == "load" and owner == "torch":
                assert keyword(n, "weights_only") is True, (p.name, n.lineno)
            if name == "load" and owner == "np":
                assert keyword(n, "allow_pickle") in (None, False), (p.name, n.lineno)
            # DeepSpeed's own checkpoints are pickles (torch.save); medbench writes safetensors instead
            assert name not in ("save_checkpoint", "load_checkpoint"), (p.name, n.lineno)


def test_yaml_tags_cannot_run_code(tmp_path: Path) -> None:
    from medbench.errors import SpecError
    from medbench.specs import parse_task_file

    marker = tmp_path / "ran"
    spec = tmp_path / "t.yaml"
    spec.write_text(f"task: t\nlabels: !!python/object/apply:pathlib.Path.touch [{str(marker)!r}]\n")
    with pytest.raises(SpecError, match="invalid YAML"):
        parse_task_file(spec)
    assert not marker.exists()


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickled_weights_are_refused_not_run(tmp_path: Path) -> None:
    import torch

    from medbench.backbones.weights import read_state_dict
    from medbench.errors import BackboneError

    marker = tmp_path / "ran"
    weights = tmp_path / "evil.pth"
    torch.save({"state_dict": {"conv.weight": _Payload(marker)}}, weights)
    with pytest.raises(BackboneError, match=r"evil.pth: --weights: cannot read weights"):
        read_state_dict(weights)
    assert not marker.exists()


def test_npz_weights_with_objects_are_refused(tmp_path: Path) -> None:
    from medbench.backbones.builtin import _load_timm_weights
    from medbench.backbones.create import create_model
    from medbench.errors import BackboneError

    marker = tmp_path / "ran"
    weights = tmp_path / "BiT-M-R50x1.npz"
    np.savez(weights, **{"resnet/root_block/standardized_conv2d/kernel": np.array([_Payload(marker)], dtype=object)})
    model = create_model("bit-m-r50x1", num_outputs=1, in_chans=3, init="random").model
    with pytest.raises(BackboneError, match="BiT-M-R50x1.npz: --weights: cannot read .npz weights"):
        _load_timm_weights(model, weights)
    assert not marker.exists()


def test_checkpoints_are_safetensors_files(tmp_path: Path) -> None:
    import torch

    from medbench.train.checkpoint import CheckpointStore

    CheckpointStore(tmp_path).save(2, {"model/w": torch.ones(2)}, {"rng/torch": torch.get_rng_state()}, key="k",
                                   meta={"history": {}})
    for p in tmp_path.glob("*.safetensors"):
        from safetensors import safe_open

        with safe_open(str(p), "pt") as f:  # parses as safetensors: header + raw tensors, no code
            assert list(f.keys())
        assert not p.read_bytes().startswith(b"PK")  # not a torch.save zip (pickle inside)


def test_spec_paths_stay_inside_the_data_root(tmp_path: Path) -> None:
    from medbench.data.base import data_path, paths_outside_root_allowed
    from medbench.errors import DataError

    root = tmp_path / "data"
    root.mkdir()
    assert data_path(root, "labels.csv", field="dataset.options.csv") == root / "labels.csv"
    assert data_path(root, "sub/../labels.csv", field="f") == root / "sub/../labels.csv"  # stays inside
    for bad in ("../labels.csv", "/etc/passwd", "sub/../../x", str(tmp_path / "elsewhere.csv")):
        with pytest.raises(DataError, match=r"dataset.options.csv: path .* leaves the dataset folder"):
            data_path(root, bad, field="dataset.options.csv")
    with paths_outside_root_allowed(True):
        assert data_path(root, "/etc/passwd", field="f") == Path("/etc/passwd")
    with pytest.raises(DataError):  # the permission ends with its block
        data_path(root, "/etc/passwd", field="f")


def test_label_file_paths_stay_inside_the_data_root(tmp_path: Path) -> None:
    from medbench.data.base import DatasetIndex, paths_outside_root_allowed
    from medbench.errors import DataError

    table = pl.DataFrame({"sample_id": ["a", "b"], "patient_id": ["p", "q"], "path": ["img/a.png", "../b.png"],
                          "label:x": [1, 0]})
    with pytest.raises(DataError, match=r"labels.csv: path: image path '../b.png' of sample 'b' leaves"):
        DatasetIndex("d", table, ["x"], root=tmp_path, source_files=[tmp_path / "labels.csv"])
    with paths_outside_root_allowed(True):
        DatasetIndex("d", table, ["x"], root=tmp_path)


def test_the_switch_is_the_users_not_the_specs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the command line (or the environment) allows outside paths: a task spec has no such field."""
    from medbench.data.locate import DataLocations
    from medbench.specs import DatasetSpec

    assert not DataLocations.from_cli(None, []).allow_outside_root
    assert DataLocations.from_cli(None, [], allow_outside_root=True).allow_outside_root
    monkeypatch.setenv("MEDBENCH_ALLOW_OUTSIDE_DATA_ROOT", "1")
    assert DataLocations.from_cli(None, []).allow_outside_root
    assert not any("outside" in f or "absolute" in f for f in DatasetSpec.model_fields)


def test_load_task_data_applies_the_switch(tmp_path: Path) -> None:
    """End to end through an adapter: refused by default, read with --allow-outside-data-root."""
    import medbench.data.adapters as pkg
    from medbench.catalog import Catalog
    from medbench.data.locate import DataLocations
    from medbench.data.task_data import load_task_data
    from medbench.errors import DataError

    root, elsewhere, tasks = tmp_path / "data", tmp_path / "elsewhere", tmp_path / "tasks"
    for d in (root / "images", elsewhere, tasks):
        d.mkdir(parents=True)
    rows = "".join(f"img{i}.png,p{i},{i % 2}\n" for i in range(8))
    (elsewhere / "labels.csv").write_text("file,patient,label\n" + rows)
    (tasks / "x.yaml").write_text(
        "task: x\nversion: 1\nfamily: f\ntype: binary\nlabels: [tb]\n"
        f"dataset: {{name: corpus, adapter: corpus-csv, options: {{csv: {elsewhere / 'labels.csv'}}}}}\n"
        "splits: {fractions: {train: 0.5, val: 0.25, test: 0.25}}\n")
    folder = str(Path(__file__).parent / "corpus_adapters")
    pkg.__path__.append(folder)
    try:
        task = Catalog([tasks]).task("x")
        with pytest.raises(DataError, match="x.yaml: dataset.options.csv: .* leaves the dataset folder"):
            load_task_data(task, DataLocations(None, {"corpus": root}))
        data = load_task_data(task, DataLocations(None, {"corpus": root}, allow_outside_root=True))
        assert len(data.index) == 8
    finally:
        pkg.__path__.remove(folder)
