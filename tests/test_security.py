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


def test_yaml_is_only_read_by_the_one_safe_reader(trees) -> None:
    """Only medbench/yamlio.py imports yaml, no module calls a yaml loading function, and the one reader's
    loader is a SafeLoader (plain data only)."""
    import yaml

    from medbench.yamlio import BoundedSafeLoader

    importers = set()
    for p, t in trees.items():
        for node in ast.walk(t):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any(n == "yaml" or n.startswith("yaml.") for n in names):
                importers.add(p.relative_to(REPO).as_posix())
    assert importers == {"medbench/yamlio.py"}
    bad = [(p.name, n.lineno) for p, t in trees.items() for n, owner, name in calls(t)
           if owner == "yaml" and name in ("load", "load_all", "unsafe_load", "full_load", "unsafe_load_all",
                                           "safe_load", "safe_load_all")]
    assert bad == []
    assert issubclass(BoundedSafeLoader, yaml.SafeLoader) and not issubclass(BoundedSafeLoader, yaml.FullLoader)


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
    from medbench.spec import parse_task_file

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
    from medbench.spec import DatasetSpec

    assert not DataLocations.from_cli(None, []).allow_outside_root
    assert DataLocations.from_cli(None, [], allow_outside_root=True).allow_outside_root
    monkeypatch.setenv("MEDBENCH_ALLOW_OUTSIDE_DATA_ROOT", "1")
    assert DataLocations.from_cli(None, []).allow_outside_root
    assert not any("outside" in f or "absolute" in f for f in DatasetSpec.model_fields)


def test_load_task_data_applies_the_switch(tmp_path: Path) -> None:
    """End to end through an adapter: refused by default, read with --allow-outside-data-root."""
    import medbench.data.adapters as pkg
    from medbench.data.locate import DataLocations
    from medbench.data.task_data import load_task_data
    from medbench.errors import DataError
    from medbench.spec.catalog import Catalog

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


# --------------------------------------------------------------------------- adapters resolve path options with data_path

ADAPTERS_DIR = REPO / "medbench" / "data" / "adapters"
_PATHLIKE_OPTION = r"^(csv|metadata|images)$|_(file|csv|root|dir|folder|list)$"


def _string_option_fields(tree: ast.Module) -> set[str]:
    """Fields of the module's ``Options`` model whose type can hold a string (a path)."""
    import re

    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == "Options":
            return {s.target.id for s in node.body if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)
                    and re.search(r"\b(str|Path)\b", ast.unparse(s.annotation))}
    return set()


def option_path_joins(sources: dict[str, str]) -> list[str]:
    """Places where a path is built from a task option without :func:`data_path`.

    A small taint analysis over the adapter modules. Tainted: string-typed ``opts.<field>``,
    ``getattr(opts, ...)``, raw ``options[...]`` / ``options.get(...)``; a name assigned (or
    iterated, comprehensions scoped) from a tainted value; a parameter of a module function,
    method or shared helper (``_common``/``_chest``) that some call passes a tainted value; the
    result of such a function when it returns a tainted value; an expression, a method call on a
    tainted value, ``str``/``Path``/``os.path.*`` of one. Clean: a ``data_path(...)`` call
    whatever its arguments; what other functions return (``read_csv_checked(..., separator=opts.
    separator)``, ``pl.col(opts.path_column)``: data, not a path; row paths from label files are
    checked when the ``DatasetIndex`` is built); ``table[opts.column]``. A ``/`` join, or a
    ``Path(...)``, ``os.path.join``, ``joinpath``, ``open``, ``glob`` call, with a tainted
    operand is a violation.
    """
    trees = {m: ast.parse(src) for m, src in sources.items()}
    fields = {m: _string_option_fields(t) for m, t in trees.items()}
    funcs: dict[str, tuple[str, str | None, ast.FunctionDef]] = {}
    imports: dict[tuple[str, str], str] = {}
    for m, tree in trees.items():
        for node in tree.body:
            if isinstance(node, ast.FunctionDef):
                funcs[f"{m}:{node.name}"] = (m, None, node)
            elif isinstance(node, ast.ClassDef):
                for sub in node.body:
                    if isinstance(sub, ast.FunctionDef):
                        funcs[f"{m}:{node.name}.{sub.name}"] = (m, node.name, sub)
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("medbench.data.adapters"):
                for alias in node.names:
                    imports[(m, alias.asname or alias.name)] = f"{node.module.rsplit('.', 1)[1]}:{alias.name}"
    for key, target in list(imports.items()):  # a re-exported helper resolves to its definition
        while target not in funcs and tuple(target.split(":")) in imports:
            target = imports[tuple(target.split(":"))]  # type: ignore[index]
        imports[key] = target
    tainted_params: dict[str, set[str]] = {q: set() for q in funcs}
    tainted_return: dict[str, bool] = dict.fromkeys(funcs, False)

    def callee(call: ast.Call, m: str, cls: str | None) -> tuple[str | None, int]:
        f = call.func
        if isinstance(f, ast.Name):
            q = f"{m}:{f.id}" if f"{m}:{f.id}" in funcs else imports.get((m, f.id))
            return (q, 0) if q in funcs else (None, 0)
        if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id == "self" and cls:
            q = f"{m}:{cls}.{f.attr}"
            return (q, 1) if q in funcs else (None, 0)
        return None, 0

    def names_of(target: ast.AST) -> set[str]:
        return {n.id for n in ast.walk(target) if isinstance(n, ast.Name)}

    _COMPREHENSIONS = (ast.ListComp, ast.SetComp, ast.GeneratorExp, ast.DictComp)

    def inner_scope(comp: ast.AST, ctx: tuple, names: set[str]) -> set[str]:
        inner = set(names)
        for gen in comp.generators:  # type: ignore[attr-defined]
            inner -= names_of(gen.target)
            if is_tainted(gen.iter, ctx, inner):
                inner |= names_of(gen.target)
        return inner

    def scoped(node: ast.AST, ctx: tuple, names: set[str]):
        """(node, names tainted where it stands) for ``node`` and everything below it."""
        yield node, names
        if isinstance(node, _COMPREHENSIONS):
            inner = inner_scope(node, ctx, names)
            for gen in node.generators:
                yield from scoped(gen.iter, ctx, names)
                for cond in gen.ifs:
                    yield from scoped(cond, ctx, inner)
            for part in (getattr(node, "elt", None), getattr(node, "key", None), getattr(node, "value", None)):
                if part is not None:
                    yield from scoped(part, ctx, inner)
            return
        for child in ast.iter_child_nodes(node):
            yield from scoped(child, ctx, names)

    def is_tainted(node: ast.AST, ctx: tuple, names: set[str]) -> bool:
        m, cls = ctx
        if isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Name) and f.id == "data_path":
                return False
            if isinstance(f, ast.Name) and f.id == "getattr" and node.args and isinstance(node.args[0], ast.Name) \
                    and node.args[0].id == "opts":
                attr = node.args[1] if len(node.args) > 1 else None
                return not isinstance(attr, ast.Constant) or attr.value in fields[m]
            if isinstance(f, ast.Attribute) and f.attr == "get" and isinstance(f.value, ast.Name) \
                    and f.value.id == "options":
                return True
            q, _ = callee(node, m, cls)
            if q is not None:
                return tainted_return[q]
            args = [*node.args, *(k.value for k in node.keywords)]
            if isinstance(f, ast.Name):  # builtins and constructors that carry a string on
                return f.id in ("str", "Path", "PurePath", "PurePosixPath", "format") and \
                    any(is_tainted(a, ctx, names) for a in args)
            if isinstance(f, ast.Attribute):
                if is_tainted(f.value, ctx, names):  # opts.csv.strip(), Path(...).expanduser(), ...
                    return True
                carries = (isinstance(f.value, ast.Attribute) and f.value.attr == "path") or \
                    (isinstance(f.value, ast.Name) and f.value.id in ("os", "posixpath")) or \
                    (isinstance(f.value, ast.Constant) and f.attr == "join")
                return carries and any(is_tainted(a, ctx, names) for a in args)
            return False  # another function given an option (a column name, a separator) returns data
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "opts":
            return node.attr in fields[m]
        if isinstance(node, ast.Subscript):
            return (isinstance(node.value, ast.Name) and node.value.id == "options") or \
                is_tainted(node.value, ctx, names)
        if isinstance(node, ast.Name):
            return isinstance(node.ctx, ast.Load) and node.id in names
        if isinstance(node, _COMPREHENSIONS):
            inner = inner_scope(node, ctx, names)
            parts = [getattr(node, a, None) for a in ("elt", "key", "value")]
            return any(is_tainted(p, ctx, inner) for p in parts if p is not None)
        return any(is_tainted(child, ctx, names) for child in ast.iter_child_nodes(node))

    def local_taint(q: str) -> set[str]:
        m, cls, fn = funcs[q]
        names = set(tainted_params[q])
        while True:
            before = len(names)
            for node, _ in scoped(fn, (m, cls), names):
                pairs = []
                if isinstance(node, ast.Assign):
                    pairs = [(t, node.value) for t in node.targets]
                elif isinstance(node, (ast.AnnAssign, ast.AugAssign, ast.NamedExpr)) and node.value is not None:
                    pairs = [(node.target, node.value)]
                elif isinstance(node, ast.For):
                    pairs = [(node.target, node.iter)]
                elif isinstance(node, ast.withitem) and node.optional_vars is not None:
                    pairs = [(node.optional_vars, node.context_expr)]
                for target, value in pairs:
                    if is_tainted(value, (m, cls), names):
                        names |= names_of(target)
            if len(names) == before:
                return names

    changed = True
    while changed:  # arguments into parameters, returned values into call results, until nothing moves
        changed = False
        for q, (m, cls, fn) in funcs.items():
            names = local_taint(q)
            for node, here in scoped(fn, (m, cls), names):
                if isinstance(node, ast.Return) and node.value is not None and not tainted_return[q] \
                        and is_tainted(node.value, (m, cls), here):
                    tainted_return[q] = changed = True
                if not isinstance(node, ast.Call):
                    continue
                target, skip = callee(node, m, cls)
                if target is None:
                    continue
                params = [a.arg for a in funcs[target][2].args.args][skip:]
                hit = {params[i] for i, a in enumerate(node.args) if i < len(params) and is_tainted(a, (m, cls), here)}
                hit |= {kw.arg for kw in node.keywords if kw.arg in params and is_tainted(kw.value, (m, cls), here)}
                if not hit <= tainted_params[target]:
                    tainted_params[target] |= hit
                    changed = True
    found = []
    for q, (m, cls, fn) in funcs.items():
        for node, here in scoped(fn, (m, cls), local_taint(q)):
            if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
                operands = [node.left, node.right]
            elif isinstance(node, ast.Call):
                f = node.func
                builds = (isinstance(f, ast.Name) and f.id in ("Path", "PurePath", "PurePosixPath", "open")) or (
                    isinstance(f, ast.Attribute) and (f.attr in ("joinpath", "glob", "rglob") or (
                        f.attr == "join" and isinstance(f.value, (ast.Attribute, ast.Name))
                        and getattr(f.value, "attr", getattr(f.value, "id", "")) in ("path", "posixpath"))))
                operands = [*node.args, *(k.value for k in node.keywords)] if builds else []
            else:
                continue
            if any(is_tainted(o, (m, cls), here) for o in operands):
                found.append(f"{m}.py:{node.lineno}: {ast.unparse(node)}")
    return found


def _adapter_sources() -> dict[str, str]:
    sources = {p.stem: p.read_text() for p in sorted(ADAPTERS_DIR.glob("*.py")) if p.stem != "__init__"}
    assert {"csv", "covidx", "ham10000", "mimic_cxr", "nih", "padchest", "_common", "_chest"} <= set(sources)
    return sources


def test_no_adapter_builds_a_path_from_an_option_without_data_path() -> None:
    assert option_path_joins(_adapter_sources()) == []


@pytest.mark.parametrize(("snippet", "hits"), [
    # the shapes the adapters had before every path option went through data_path
    (("def load(self, root, options):\n    opts = parse_options(Options, options, 'x')\n"
      "    return root / opts.csv\n"), 1),
    (("def patients_file(root, option):\n    path = Path(option).expanduser()\n    return root / path\n"
      "class A:\n    def load(self, root, options):\n        opts = parse_options(Options, options, 'x')\n"
      "        return patients_file(root, opts.patients_csv)\n"), 2),
    (("def _split_file(root, split, given):\n    return root / given\n"
      "def load(root, opts):\n    return {s: _split_file(root, s, getattr(opts, f'{s}_file')) for s in 'ab'}\n"), 1),
    (("def label_file(root, name):\n    names = [name] if name else ['a.csv']\n"
      "    return [root / n for n in names]\n"
      "def load(root, opts):\n    return label_file(root, opts.csv)\n"), 1),
    (("def load(root, options):\n    return root / options['csv']\n"), 1),
    # clean: resolved with data_path, or a non-string option, or a constant name
    (("def load(root, opts):\n    p = data_path(root, opts.csv, field='dataset.options.csv')\n"
      "    return p / 'x', root / 'labels.csv', root / f'{opts.size}.npz'\n"), 0),
])
def test_the_option_path_scan_finds_the_old_patterns(snippet: str, hits: int) -> None:
    options = "class Options(BaseModel):\n    csv: str | None = None\n    patients_csv: str | None = None\n" \
              "    a_file: str | None = None\n    size: Literal[28, 64] = 28\n"
    assert len(option_path_joins({"mod": options + snippet})) == hits


#: every path-like option of a shipped adapter: (adapter, option) -> (other options, labels, task type)
PATH_OPTIONS = {
    ("csv", "csv"): ({"path_column": "file", "label_column": "dx",
                        "negative_values": ["nv"]}, ["mel"], "binary"),
    ("csv", "path_root"): ({"csv": "labels.csv", "path_column": "file", "label_column": "dx",
                        "negative_values": ["nv"]}, ["mel"], "binary"),
    ("ham10000", "metadata"): ({}, ["mel"], "binary"),
    ("covidx", "train_file"): ({}, ["COVID-19"], "binary"),
    ("covidx", "val_file"): ({}, ["COVID-19"], "binary"),
    ("covidx", "test_file"): ({}, ["COVID-19"], "binary"),
    ("nih", "labels_file"): ({}, ["Effusion"], "binary"),
    ("padchest", "labels_file"): ({}, ["pneumonia"], "multilabel"),
    ("mimic-cxr", "patients_csv"): ({}, ["Edema"], "multilabel"),
}


def test_every_path_like_option_is_in_the_table() -> None:
    """A new path-like option of a shipped adapter must join PATH_OPTIONS (and so the test below)."""
    import re

    from medbench.data.base import list_adapters

    found = set()
    for name in list_adapters():
        tree = ast.parse((ADAPTERS_DIR / f"{name.replace('-', '_')}.py").read_text())
        found |= {(name, f) for f in _string_option_fields(tree) if re.search(_PATHLIKE_OPTION, f)}
    assert found == set(PATH_OPTIONS)


@pytest.mark.parametrize(("adapter", "option"), sorted(PATH_OPTIONS))
def test_each_path_option_of_a_shipped_adapter_stays_inside_the_data_root(adapter: str, option: str,
                                                                          tmp_path: Path) -> None:
    from medbench.data.base import get_adapter, paths_outside_root_allowed
    from medbench.errors import DataError

    root = tmp_path / "data"
    root.mkdir()
    others, labels, task_type = PATH_OPTIONS[(adapter, option)]
    for value in ("../elsewhere/x.csv", str(tmp_path / "elsewhere" / "x.csv")):
        with pytest.raises(DataError) as err:
            get_adapter(adapter).load(root, {**others, option: value}, labels, task_type)
        assert err.value.field == f"dataset.options.{option}"
        assert str(err.value).startswith(f"dataset.options.{option}: path {value!r} leaves the dataset folder")
        assert "--allow-outside-data-root" in str(err.value) and "\n" not in str(err.value)
        with paths_outside_root_allowed(True), pytest.raises(DataError) as allowed:  # used (and here not found)
            get_adapter(adapter).load(root, {**others, option: value}, labels, task_type)
        assert "leaves the dataset folder" not in str(allowed.value)


def _task_file(tasks: Path, name: str, dataset: str, adapter: str, options: str, labels: str,
               task_type: str = "binary") -> None:
    tasks.mkdir(parents=True, exist_ok=True)
    (tasks / f"{name}.yaml").write_text(
        f"task: {name}\nversion: 1\nfamily: f\ntype: {task_type}\nlabels: {labels}\n"
        f"dataset: {{name: {dataset}, adapter: {adapter}, options: {options}}}\n"
        "splits: {fractions: {train: 0.5, val: 0.25, test: 0.25}}\n")


def test_the_shipped_csv_adapter_keeps_its_files_inside_the_data_root(tmp_path: Path) -> None:
    from medbench.data.locate import DataLocations
    from medbench.data.task_data import load_task_data
    from medbench.errors import DataError
    from medbench.spec.catalog import Catalog

    root, elsewhere, tasks = tmp_path / "data", tmp_path / "elsewhere", tmp_path / "tasks"
    root.mkdir()
    elsewhere.mkdir()
    (elsewhere / "x.csv").write_text("file,patient,dx\n" + "".join(f"img{i},p{i},{'mel' if i % 2 else 'nv'}\n"
                                                                   for i in range(8)))
    common = "path_column: file, path_suffix: .png, patient_column: patient, label_column: dx, negative_values: [nv]"
    where = {"mydata": root}
    for value in ("../elsewhere/x.csv", str(elsewhere / "x.csv")):
        _task_file(tasks, "x", "mydata", "csv", f"{{csv: {value!r}, {common}}}", "[mel]")
        with pytest.raises(DataError) as err:
            load_task_data(Catalog([tasks]).task("x"), DataLocations(None, where))
        assert str(err.value).startswith(f"{tasks / 'x.yaml'}: dataset.options.csv: path {value!r} leaves the "
                                         f"dataset folder {root}; expected a path inside it")
        assert "\n" not in str(err.value)
        data = load_task_data(Catalog([tasks]).task("x"), DataLocations(None, where, allow_outside_root=True))
        assert data.index.table.height == 8 and data.index.source_files == [root / value]
        assert data.index.table.sort("sample_id")["label:mel"].to_list() == [0, 1] * 4
    # the image folder option obeys the same rule (images are not read here)
    _task_file(tasks, "y", "mydata", "csv", f"{{csv: ../elsewhere/x.csv, path_root: ../pictures, {common}}}",
               "[mel]")
    with pytest.raises(DataError, match=r"y.yaml: dataset.options.csv: path '../elsewhere/x.csv' leaves"):
        load_task_data(Catalog([tasks]).task("y"), DataLocations(None, where))
    (root / "x.csv").write_text((elsewhere / "x.csv").read_text())
    _task_file(tasks, "y", "mydata", "csv", f"{{csv: x.csv, path_root: ../pictures, {common}}}", "[mel]")
    with pytest.raises(DataError, match=r"y.yaml: dataset.options.path_root: path '../pictures' leaves") as err:
        load_task_data(Catalog([tasks]).task("y"), DataLocations(None, where))
    assert "\n" not in str(err.value)
    data = load_task_data(Catalog([tasks]).task("y"), DataLocations(None, where, allow_outside_root=True))
    assert data.index.table["path"].str.starts_with("../pictures/img").all()
    assert data.index.image_path(0).parent == root / "../pictures"


NIH_HEADER = "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position\n"


def test_a_shipped_chest_adapter_keeps_its_label_file_inside_the_data_root(tmp_path: Path) -> None:
    from medbench.data.locate import DataLocations
    from medbench.data.task_data import load_task_data
    from medbench.errors import DataError
    from medbench.spec.catalog import Catalog

    root, elsewhere, tasks = tmp_path / "nih", tmp_path / "elsewhere", tmp_path / "tasks"
    root.mkdir()
    elsewhere.mkdir()
    rows = "".join(f"{i:08d}_000.png,{'Effusion' if i % 3 == 0 else 'No Finding'},0,{i},{40 + i},M,PA\n"
                   for i in range(1, 13))
    (elsewhere / "Data_Entry_2017_v2020.csv").write_text(NIH_HEADER + rows)
    for value in ("../elsewhere/Data_Entry_2017_v2020.csv", str(elsewhere / "Data_Entry_2017_v2020.csv")):
        _task_file(tasks, "n", "nih", "nih", f"{{labels_file: {value!r}}}", "[Effusion]")
        with pytest.raises(DataError) as err:
            load_task_data(Catalog([tasks]).task("n"), DataLocations(None, {"nih": root}))
        assert str(err.value).startswith(f"{tasks / 'n.yaml'}: dataset.options.labels_file: path {value!r} leaves "
                                         f"the dataset folder {root}")
        assert "--allow-outside-data-root" in str(err.value) and "\n" not in str(err.value)
        data = load_task_data(Catalog([tasks]).task("n"), DataLocations(None, {"nih": root}, allow_outside_root=True))
        t = data.index.table.sort("sample_id")
        assert t.height == 12 and t["label:Effusion"].to_list() == [int(i % 3 == 0) for i in range(1, 13)]
        assert data.index.source_files == [root / value]


def test_every_command_that_reads_data_takes_the_users_switch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture) -> None:
    """`run`, `data inspect` and `transfusion` refuse a label file outside the dataset folder unless the user
    passes --allow-outside-data-root."""
    from medbench.cli import main

    monkeypatch.delenv("MEDBENCH_ALLOW_OUTSIDE_DATA_ROOT", raising=False)
    root, elsewhere, tasks = tmp_path / "data", tmp_path / "elsewhere", tmp_path / "tasks"
    root.mkdir()
    elsewhere.mkdir()
    (elsewhere / "x.csv").write_text("file,patient,dx\n" + "".join(f"img{i},p{i},{'mel' if i % 2 else 'nv'}\n"
                                                                   for i in range(8)))
    _task_file(tasks, "x", "mydata", "csv", "{csv: ../elsewhere/x.csv, path_column: file, path_suffix: .png, "
               "patient_column: patient, label_column: dx, negative_values: [nv]}", "[mel]")
    common = ["--tasks-dir", str(tasks), "--data", f"mydata={root}"]

    def invoke(*argv: str) -> tuple[int, str]:
        capsys.readouterr()
        try:
            main(list(argv))
            code = 0
        except SystemExit as exc:
            code = exc.code or 0
        return code, capsys.readouterr().err

    commands = {
        "data inspect": ["data", "inspect", "x", *common, "--json"],
        "run": ["run", "-b", "cbr-tiny", "-t", "x", *common, "--out", str(tmp_path / "out"), "--max-steps", "1"],
        "transfusion": ["transfusion", "-t", "x", "--backbones", "cbr-tiny", "--inits", "random", *common,
                        "--out", str(tmp_path / "tf"), "--max-steps", "1"],
    }
    for name, argv in commands.items():
        code, err = invoke(*argv)
        assert code == 2, name
        assert err.strip() == (f"medbench: error: {tasks / 'x.yaml'}: dataset.options.csv: path "
                               f"'../elsewhere/x.csv' leaves the dataset folder {root}; expected a path inside it; "
                               "pass --allow-outside-data-root (or MEDBENCH_ALLOW_OUTSIDE_DATA_ROOT=1) to allow it"
                               ), (name, err)
    # with the switch the label file is read (inspect counts its 8 rows; no image is needed for that)
    code, err = invoke(*commands["data inspect"], "--allow-outside-data-root")
    assert code == 0, err
    for name in ("run", "transfusion"):  # the label file is read; nothing trains: the images are absent
        code, err = invoke(*commands[name], "--allow-outside-data-root")
        assert code == 2 and "leaves the dataset folder" not in err, (name, err)
        assert "img0.png" in err and "No such option" not in err, (name, err)
