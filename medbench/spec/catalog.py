"""Finding tasks and suites: built-in, ``--tasks-dir`` folders, and installed packages.

Sources, in order (a later source may replace an earlier one's task of the same
name, and the listing says where each comes from):

1. the YAML files shipped with medbench (``tasks/``);
2. packages exposing the entry point group ``medbench.tasks``: the entry point
   loads to a folder path, a callable returning one, or a module whose folder
   holds the YAML files;
3. every ``--tasks-dir`` folder (``MEDBENCH_TASKS_DIRS``, ``os.pathsep``-separated, too).

Within one folder every ``*.yaml`` below it is read; files whose name starts
with ``_`` are include-only bases. A file with ``task:`` is a task, one with
``suite:`` a suite.

A broken plug-in (its entry point does not load, names no folder, or its
folder holds a file that cannot be read as a task or suite) does not hide the
others: it is skipped as a whole with one warning line on stderr naming the
entry point and the error (once per process), and the other sources load. Its
task names cannot be known, so asking for an unknown task or suite while a
plug-in is broken says so in the same one-line error, with the original
error. The built-in folder and ``--tasks-dir`` folders are the user's own:
their errors stop the command as before.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from types import ModuleType

from medbench.errors import SpecError
from medbench.plugins import plugin_failure, warn_plugin
from medbench.resources import builtin_tasks_dir
from medbench.spec import ResolvedTask, SuiteSpec, parse_suite_file, parse_task_file
from medbench.utils import did_you_mean
from medbench.yamlio import read_yaml

TASK_ENTRY_POINT_GROUP = "medbench.tasks"


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    kind: str  # "task" | "suite"
    path: Path
    source: str  # "builtin" | "entry point <pkg>" | "dir <path>"


def _entry_point_folder(ep) -> Path:
    obj = ep.load()
    if isinstance(obj, ModuleType):
        path = Path(obj.__file__).parent if getattr(obj, "__file__", None) else Path(list(obj.__path__)[0])
    elif callable(obj):
        path = Path(obj())
    else:
        path = Path(obj)
    if not path.is_dir():
        raise SpecError("names no tasks folder", where=path)
    return path


def _entry_point_dirs() -> tuple[list[tuple[Path, str, object]], list[str]]:
    """(folder, source, entry point) of every task plug-in that loads, and one line per one that does not."""
    out, failures = [], []
    for ep in entry_points(group=TASK_ENTRY_POINT_GROUP):
        try:
            path = _entry_point_folder(ep)
        except Exception as err:  # a broken plug-in must not hide the rest
            line = plugin_failure(TASK_ENTRY_POINT_GROUP, ep, err)
            warn_plugin(TASK_ENTRY_POINT_GROUP, ep, line)
            failures.append(line)
            continue
        dist = ep.dist.name if ep.dist else ep.name
        out.append((path, f"entry point {dist}", ep))
    return out, failures


def _env_dirs() -> list[Path]:
    raw = os.environ.get("MEDBENCH_TASKS_DIRS", "")
    return [Path(p) for p in raw.split(os.pathsep) if p]


class Catalog:
    """Every task and suite medbench can see in this invocation."""

    def __init__(self, tasks_dirs: list[Path] | None = None, *, entry_points_enabled: bool = True):
        self._entries: dict[tuple[str, str], CatalogEntry] = {}
        self._parsed: dict[str, ResolvedTask] = {}
        #: one line per task plug-in that did not load (see the module docstring)
        self.plugin_failures: list[str] = []
        self._scan(builtin_tasks_dir(), "builtin")
        if entry_points_enabled:
            folders, self.plugin_failures = _entry_point_dirs()
            for path, source, ep in folders:
                try:
                    self._scan(path, source)
                except SpecError as err:  # one unreadable file: the plug-in is skipped, not half-loaded
                    line = plugin_failure(TASK_ENTRY_POINT_GROUP, ep, err)
                    warn_plugin(TASK_ENTRY_POINT_GROUP, ep, line)
                    self.plugin_failures.append(line)
        for d in [*_env_dirs(), *(tasks_dirs or [])]:
            if not Path(d).is_dir():
                raise SpecError("tasks folder not found", where=d, field="--tasks-dir")
            self._scan(Path(d), f"dir {d}")

    def _scan(self, folder: Path, source: str) -> None:
        """Add every task and suite below ``folder``; all or nothing (an error adds none of them)."""
        if not folder.is_dir():
            raise SpecError("tasks folder not found", where=folder, field=source)
        found: dict[tuple[str, str], CatalogEntry] = {}
        for path in sorted(folder.rglob("*.yaml")):
            if path.name.startswith("_"):
                continue
            head = read_yaml(path)  # medbench.yamlio: safe, no duplicate keys, bounded aliases and nesting
            if not isinstance(head, dict):
                raise SpecError("expected a mapping with 'task:' or 'suite:'", where=path)
            if "task" in head:
                kind, name = "task", head["task"]
            elif "suite" in head:
                kind, name = "suite", head["suite"]
            else:
                raise SpecError("neither 'task:' nor 'suite:' is set (include-only files start with '_')",
                                where=path, field="task")
            if not isinstance(name, str):
                raise SpecError(f"expected a name (string), got {name!r}", where=path, field=kind)
            key = (kind, name)
            prev = found.get(key) or self._entries.get(key)
            if prev is not None and prev.source == source:
                raise SpecError(f"{kind} {name!r} is also defined in {prev.path}", where=path, field=kind)
            found[key] = CatalogEntry(name, kind, path, source)
        self._entries.update(found)

    # ------------------------------------------------------------------ queries
    def entries(self, kind: str) -> list[CatalogEntry]:
        return sorted((e for (k, _), e in self._entries.items() if k == kind), key=lambda e: e.name)

    def task_names(self) -> list[str]:
        return [e.name for e in self.entries("task")]

    def suite_names(self) -> list[str]:
        return [e.name for e in self.entries("suite")]

    def _broken_plugins_note(self) -> str:
        """One clause per task plug-in that did not load (an unknown name may be one of theirs)."""
        return "".join(f"; it may come from a plug-in that does not load: {line}" for line in self.plugin_failures)

    def task(self, name: str) -> ResolvedTask:
        if name not in self._parsed:
            entry = self._entries.get(("task", name))
            if entry is None:
                names = self.task_names()
                raise SpecError(f"unknown task {name!r}{did_you_mean(name, names)}; "
                                f"see 'medbench list tasks'{self._broken_plugins_note()}", field="--task")
            resolved = parse_task_file(entry.path, entry.source)
            if resolved.name != name:  # pragma: no cover - guarded by _scan
                raise SpecError(f"file declares task {resolved.name!r}", where=entry.path, field="task")
            self._parsed[name] = resolved
        return self._parsed[name]

    def suite(self, name: str) -> SuiteSpec:
        entry = self._entries.get(("suite", name))
        if entry is None:
            raise SpecError(f"unknown suite {name!r}{did_you_mean(name, self.suite_names())}; "
                            f"see 'medbench list suites'{self._broken_plugins_note()}", field="--suite")
        return parse_suite_file(entry.path)

    def suite_variants(self, name: str, _stack: tuple[str, ...] = ()) -> dict[str, list[dict]]:
        """Per task, the variant runs the suite (and its nested suites) declare, in order, without repeats;
        a variant for a task outside the suite is an error naming the suite file."""
        if name in _stack:  # suite_tasks reports the cycle
            return {}
        suite = self.suite(name)
        path = self._entries[("suite", name)].path
        out: dict[str, list[dict]] = {}
        for sub in suite.suites:
            for task, variants in self.suite_variants(sub, (*_stack, name)).items():
                out.setdefault(task, []).extend(variants)
        members = set(self.suite_tasks(name, _stack))
        for i, block in enumerate(suite.variants):
            for task in block.tasks:
                if task not in members:
                    raise SpecError(f"task {task!r} is not in the suite{did_you_mean(task, sorted(members))}",
                                    where=path, field=f"variants.{i}.tasks")
                out.setdefault(task, []).extend(block.runs())
        return {t: [dict(v) for v in dict.fromkeys(tuple(sorted(v.items())) for v in vs)] for t, vs in out.items()}

    def suite_protocols(self, name: str, _stack: tuple[str, ...] = ()) -> dict[str, list[str]]:
        """Per task, the protocols the suite declares for it: a suite's ``protocols`` cover all of its tasks
        (nested suites included); a nested suite's own apply where the suite above declares none."""
        if name in _stack:  # suite_tasks reports the cycle
            return {}
        suite = self.suite(name)
        if suite.protocols:
            return {t: list(suite.protocols) for t in self.suite_tasks(name, _stack)}
        out: dict[str, list[str]] = {}
        for sub in suite.suites:
            for task, protocols in self.suite_protocols(sub, (*_stack, name)).items():
                out[task] = list(dict.fromkeys([*out.get(task, []), *protocols]))
        return out

    def suite_tasks(self, name: str, _stack: tuple[str, ...] = ()) -> list[str]:
        """The suite's tasks in order, nested suites expanded, duplicates removed."""
        if name in _stack:
            raise SpecError(f"suite cycle: {' -> '.join((*_stack, name))}", where=self._entries[("suite", name)].path,
                            field="suites")
        suite = self.suite(name)
        path = self._entries[("suite", name)].path
        out: list[str] = []
        for sub in suite.suites:
            if ("suite", sub) not in self._entries:
                raise SpecError(f"unknown suite {sub!r}{did_you_mean(sub, self.suite_names())}"
                                f"{self._broken_plugins_note()}", where=path, field="suites")
            out.extend(self.suite_tasks(sub, (*_stack, name)))
        for t in suite.tasks:
            if ("task", t) not in self._entries:
                raise SpecError(f"unknown task {t!r}{did_you_mean(t, self.task_names())}{self._broken_plugins_note()}",
                                where=path, field="tasks")
            out.append(t)
        return list(dict.fromkeys(out))
