"""Reading task and suite YAML files into validated specs.

A task lives in one YAML file. ``include:`` names one or more files (relative
to the including file) whose content is deep-merged underneath: mappings merge
key by key, everything else (lists included) is replaced. Files whose name
starts with ``_`` are include-only bases, never tasks themselves.
``include: builtin:NAME`` names a file shipped with medbench by its name
(``builtin:chexpert``, ``builtin:_chest-xray-base``) or by the task it defines,
wherever medbench is installed, so a user's variant of a built-in task does not
hard-code a site-packages path.

Every error names the file and the dotted field, e.g.
``tasks/nih.yaml: splits.fractions.val: Input should be a valid number``.
When the bad value comes from an included file, the error names that file
and the file that included it, e.g.
``tasks/_base.yaml (included by tasks/t.yaml): hyperrule.batch_size: ...``.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from medbench.errors import SpecError
from medbench.spec.model import ResolvedTask, SuiteSpec, TaskSpec
from medbench.utils import did_you_mean
from medbench.yamlio import read_yaml

# --------------------------------------------------------------------------- YAML loading


def _read_yaml(path: Path, *, included_from: str | Path | None = None,
               shown: str | Path | None = None) -> dict[str, Any]:
    """``path``'s mapping; errors about its content name it as ``shown`` (default: ``path``), a missing
    included file names the includer ``included_from``."""
    shown = path if shown is None else shown
    if not path.is_file():
        where = included_from if included_from else path
        raise SpecError(f"included file not found: {path}" if included_from else "file not found", where=where,
                        field="include" if included_from else None)
    data = read_yaml(path, where=shown)  # the one YAML reader: safe, no duplicate keys, bounded (medbench.yamlio)
    if data is None:
        raise SpecError("file is empty; expected a mapping with 'task:' or 'suite:'", where=shown)
    if not isinstance(data, dict):
        raise SpecError(f"expected a mapping at the top level, got {type(data).__name__}", where=shown)
    return data


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``override`` on top of ``base``: mappings merge recursively, anything else replaces."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


#: where each leaf of a merged mapping was written: dotted key path -> (file, chain of including files)
Origins = dict[tuple[str, ...], tuple[Path, tuple[Path, ...]]]


def _leaves(data: dict[str, Any], prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Key paths of the values that are not non-empty mappings (lists are leaves: they replace)."""
    out = []
    for key, value in data.items():
        path = (*prefix, str(key))
        if isinstance(value, dict) and value:
            out.extend(_leaves(value, path))
        else:
            out.append(path)
    return out


def load_with_includes(path: Path) -> dict[str, Any]:
    """The file's mapping with its ``include:`` chain merged underneath."""
    return load_with_origins(path)[0]


def load_with_origins(path: Path) -> tuple[dict[str, Any], Origins]:
    """:func:`load_with_includes` and, for every leaf of the result, the file that wrote it."""
    return _load(Path(path).resolve(), Path(path), (), ())


def _load(path: Path, shown: Path, _stack: tuple[Path, ...],
          chain: tuple[Path, ...]) -> tuple[dict[str, Any], Origins]:
    """``path`` (resolved) as ``shown`` in messages; ``chain``: the including files as shown, outermost first."""
    path = path.resolve()
    if path in _stack:
        cycle = " -> ".join(p.name for p in (*_stack, path))
        raise SpecError(f"include cycle: {cycle}", where=chain[0] if chain else shown, field="include")
    described = _describe(shown, chain)
    data = _read_yaml(path, included_from=_describe(chain[-1], chain[:-1]) if chain else None, shown=described)
    includes = data.pop("include", None)
    own: Origins = {leaf: (shown, chain) for leaf in _leaves(data)}
    if includes is None:
        return data, own
    if isinstance(includes, str):
        includes = [includes]
    if not isinstance(includes, list) or not all(isinstance(i, str) for i in includes):
        raise SpecError("expected a file name or a list of file names", where=described, field="include")
    merged: dict[str, Any] = {}
    origins: Origins = {}
    for inc in includes:
        if inc.startswith(BUILTIN_PREFIX):
            target = builtin_file(inc[len(BUILTIN_PREFIX):], where=described)
            inc_shown = target
        else:
            target, inc_shown = path.parent / inc, Path(os.path.normpath(shown.parent / inc))
        sub, sub_origins = _load(target, inc_shown, (*_stack, path), (*chain, shown))
        merged, origins = _merge_with_origins(merged, origins, sub, sub_origins)
    return _merge_with_origins(merged, origins, data, own)


BUILTIN_PREFIX = "builtin:"


def builtin_file(name: str, *, where: str | Path | None = None) -> Path:
    """The YAML file shipped with medbench named ``name`` (its file name without ``.yaml``, e.g. ``chexpert`` or
    ``_chest-xray-base``), or else the one defining the task ``name``."""
    from medbench.resources import builtin_tasks_dir

    files = sorted(builtin_tasks_dir().rglob("*.yaml"))
    for f in files:
        if f.stem == name:
            return f
    names: list[str] = []
    for f in files:
        try:
            head = read_yaml(f)
        except SpecError:  # a shipped file that does not read is reported when it is used, not here
            continue
        task = head.get("task") if isinstance(head, dict) else None
        if task == name:
            return f
        if isinstance(task, str):
            names.append(task)
    choices = sorted(set(names) | {f.stem for f in files if f.stem.startswith("_")})
    raise SpecError(f"no built-in task or base file {name!r}{did_you_mean(name, choices)}; 'medbench list tasks' "
                    "shows the built-in tasks (source builtin)", where=where, field="include")


def _merge_with_origins(base: dict[str, Any], base_origins: Origins, override: dict[str, Any],
                        override_origins: Origins) -> tuple[dict[str, Any], Origins]:
    merged = deep_merge(base, override)
    # a leaf of the result is either written by the override or left over from the base
    origins = {leaf: override_origins.get(leaf) or base_origins[leaf] for leaf in _leaves(merged)
               if leaf in override_origins or leaf in base_origins}
    return merged, origins


def origin_of(origins: Origins, loc: tuple[Any, ...], default: Path) -> str:
    """Where to report an error at the field ``loc``: the file that wrote it, with who included it.

    A field written in the task file itself, or assembled from several files (a mapping merged from a
    base and the task, the top level), is reported at ``default``, the task file.
    """
    key = tuple(str(p) for p in loc)
    found = None
    for n in range(len(key), 0, -1):  # the longest written prefix: a list or a scalar holding the field
        if key[:n] in origins:
            found = {origins[key[:n]]}
            break
    if found is None:
        found = {o for leaf, o in origins.items() if leaf[:len(key)] == key}
    if len(found) != 1:
        return str(default)
    (shown, chain), = found
    return _describe(shown, chain)


def _describe(shown: Path, chain: tuple[Path, ...]) -> str:
    """``_base.yaml (included by t.yaml)``; through several files ``... (included by t.yaml via _a.yaml)``."""
    if not chain:
        return str(shown)
    via = f" via {', '.join(str(p) for p in chain[1:])}" if len(chain) > 1 else ""
    return f"{shown} (included by {chain[0]}{via})"


def _format_validation_error(err: ValidationError, model: type[BaseModel]) -> tuple[str, str]:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"]) or "(top level)"
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        parent = _model_at(model, first["loc"][:-1])
        if parent is not None:
            allowed = sorted(parent.model_fields)
            msg = f"unknown field{did_you_mean(str(first['loc'][-1]), allowed)}; expected one of: {', '.join(allowed)}"
        else:
            msg = "unknown field"
    elif first["type"] == "missing":
        msg = "required field is missing"
    elif first["type"] == "value_error":
        msg = msg.removeprefix("Value error, ")
    return loc, msg


def _model_at(model: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    import typing

    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        fld = current.model_fields.get(str(part))
        if fld is None:
            return None
        ann = fld.annotation
        candidates = [ann, *typing.get_args(ann)]
        for c in list(candidates):
            candidates.extend(typing.get_args(c))
        current = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def parse_task_file(path: Path, source: str = "file") -> ResolvedTask:
    data, origins = load_with_origins(Path(path))
    if "task" not in data:
        raise SpecError("not a task spec: no 'task:' field", where=path, field="task")
    try:
        spec = TaskSpec.model_validate(data)
    except ValidationError as err:
        field, msg = _format_validation_error(err, TaskSpec)
        where = origin_of(origins, err.errors()[0]["loc"], Path(path))
        raise SpecError(msg, where=where, field=field) from None
    return ResolvedTask(spec, Path(path), source)


def parse_suite_file(path: Path) -> SuiteSpec:
    data = _read_yaml(Path(path))
    try:
        return SuiteSpec.model_validate(data)
    except ValidationError as err:
        field, msg = _format_validation_error(err, SuiteSpec)
        raise SpecError(msg, where=path, field=field) from None
