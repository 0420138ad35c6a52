"""The package layout follows the flow: each stage imports only itself and the stages before it, and no
module imports itself back through others (an import loop).

Every import counts, wherever it is written (module level, inside a function, under ``TYPE_CHECKING``):
a lazy import is still a dependency. The stage order is written once, here; a new module must belong to a
stage (its package prefix) or this test fails.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "medbench"

#: the flow of docs/architecture.md, first to last; a module belongs to the first stage whose prefix it has
STAGES: list[tuple[str, tuple[str, ...]]] = [
    ("common", ("medbench", "medbench.errors", "medbench.utils", "medbench.paths", "medbench.resources",
                "medbench.provenance", "medbench.plugins", "medbench.yamlio", "medbench.limits")),
    ("spec", ("medbench.spec",)),
    ("data", ("medbench.data",)),
    ("backbones", ("medbench.backbones",)),
    ("train", ("medbench.train",)),
    ("probe", ("medbench.probe",)),
    ("analysis", ("medbench.analysis",)),
    ("predictions", ("medbench.predictions",)),
    ("scoring", ("medbench.scoring",)),
    ("store", ("medbench.store",)),
    ("run", ("medbench.run",)),
    ("board", ("medbench.board",)),
    ("recipes", ("medbench.recipes",)),
    ("cli", ("medbench.cli",)),
]


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = _modules()


def stage_of(module: str) -> int | None:
    """Index of the stage of ``module`` (its longest matching prefix), None when it belongs to none."""
    best, best_len = None, -1
    for i, (_, prefixes) in enumerate(STAGES):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best_len:
                best, best_len = i, len(p)
    return best


def imports_of(name: str, path: Path) -> set[str]:
    """The medbench modules ``name`` imports (``from pkg import sub`` is the module ``pkg.sub``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in MODULES:  # ``import medbench.data.base as b`` names a module; attributes climb up
                t = t.rpartition(".")[0]
            if t.startswith("medbench") and t != name:
                found.add(t)
    return found


GRAPH = {name: imports_of(name, path) for name, path in MODULES.items()}


def test_every_module_belongs_to_a_stage() -> None:
    orphans = sorted(m for m in MODULES if stage_of(m) is None)
    assert not orphans, f"modules without a stage (add their package to STAGES): {orphans}"


def test_no_import_against_the_flow() -> None:
    wrong = []
    for name, targets in GRAPH.items():
        mine = stage_of(name)
        for t in sorted(targets):
            theirs = stage_of(t)
            if mine is not None and theirs is not None and theirs > mine:
                wrong.append(f"{name} ({STAGES[mine][0]}) imports {t} ({STAGES[theirs][0]})")
    assert not wrong, "imports against the flow:\n" + "\n".join(wrong)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in graph:
                    continue
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    m = stack.pop()
                    on_stack.discard(m)
                    comp.append(m)
                    if m == node:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_no_import_loops() -> None:
    loops = _cycles(GRAPH)
    assert not loops, "import loops (each a set of modules importing each other, possibly lazily):\n" + "\n".join(
        " <-> ".join(c) for c in loops)


@pytest.mark.parametrize("graph, expected", [
    ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
    ({"a": {"b"}, "b": {"a"}}, [["a", "b"]]),
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c"]]),
])
def test_the_loop_finder_finds_loops(graph, expected) -> None:
    assert _cycles(graph) == expected


def test_a_lazy_back_import_counts(tmp_path: Path) -> None:
    """A registry importing its entries' module inside a function is a dependency like any other."""
    src = tmp_path / "mod.py"
    src.write_text("def load():\n    import medbench.backbones.builtin\n\nif False:\n    from medbench.errors import X\n")
    assert imports_of("medbench.somewhere", src) == {"medbench.backbones.builtin", "medbench.errors"}
