"""The one YAML reader of medbench: task and suite files, the cluster config, any YAML it reads.

Task files come from plug-ins and colleagues, so reading one must be safe and bounded:

* **safe**: a subclass of ``yaml.SafeLoader``, plain data only; a ``!!python/...`` tag is an error,
  never a call;
* **no duplicate keys**: a key written twice in one mapping is an error naming the file, the line and
  the key (YAML itself silently keeps the last value). Keys brought in by a merge (``<<: *base``) may be
  overridden, as YAML intends;
* **bounded alias expansion**: an alias (``*a``) stands for every node below its anchor, and once the
  data is used (validated, merged, hashed) each alias is a full copy. A 1 KB file of nested aliases
  ("billion laughs") stands for billions of nodes. The nodes each alias stands for are counted, through
  nested aliases, without expanding anything; past :data:`ALIAS_NODE_BUDGET` in one file the file is
  refused. A recursive alias (an anchor used inside itself) is refused too;
* **bounded nesting**: at most :data:`MAX_DEPTH` levels, counted through aliases (deeper input would
  exhaust Python's recursion in the reader or in whatever walks the data later);
* **bounded size**: files over :data:`MAX_BYTES` are refused unread.

Every error is one line, raised as the caller's :class:`~medbench.errors.MedbenchError` subclass
(``SpecError`` for task and suite files): ``FILE: line N: what is wrong; what was expected``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from medbench.errors import MedbenchError, SpecError

#: nesting levels a YAML document may have (task files use about 5)
MAX_DEPTH = 64
#: nodes that aliases may stand for in one file, summed over every alias use (merging a 30-key base
#: into a few dozen places is about a thousand)
ALIAS_NODE_BUDGET = 10_000
#: bytes a YAML file may have (task files are a few KB)
MAX_BYTES = 1 << 20


class _Refused(yaml.YAMLError):
    """A bound of this module was crossed; ``line`` is 1-based or None."""

    def __init__(self, message: str, line: int | None):
        super().__init__(message)
        self.message = message
        self.line = line


def _line(mark: Any) -> int | None:
    return mark.line + 1 if mark is not None else None


class BoundedSafeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses duplicate keys, recursive aliases, alias expansion past
    :data:`ALIAS_NODE_BUDGET` nodes and nesting past :data:`MAX_DEPTH` levels."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._alias_nodes = 0
        self._open_anchors: set[str] = set()
        self._size: dict[int, tuple[int, int]] = {}  # id(node) -> (nodes below it, levels below it)

    # ---------------------------------------------------------------- composing: depth and aliases
    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            if event.anchor in self._open_anchors:
                raise _Refused(f"alias *{event.anchor} is used inside its own anchor (a recursive structure); "
                               "expected plain data", _line(event.start_mark))
            node = super().compose_node(parent, index)
            count, depth = self._measure(node)
            self._alias_nodes += count
            if self._alias_nodes > ALIAS_NODE_BUDGET:
                raise _Refused(f"aliases expand to more than {ALIAS_NODE_BUDGET:,} nodes (at *{event.anchor}); "
                               "expected a task-sized file (write the values out, or use fewer nested aliases)",
                               _line(event.start_mark))
            if self._depth + depth > MAX_DEPTH:
                raise _Refused(f"nested deeper than {MAX_DEPTH} levels (through *{event.anchor})",
                               _line(event.start_mark))
            return node
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise _Refused(f"nested deeper than {MAX_DEPTH} levels", _line(event.start_mark))
        anchor = getattr(event, "anchor", None)
        if anchor is not None:
            self._open_anchors.add(anchor)
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1
            if anchor is not None:
                self._open_anchors.discard(anchor)

    def _measure(self, node: Any) -> tuple[int, int]:
        """(nodes, levels) that ``node`` stands for once expanded; memoised, iterative."""
        stack = [(node, False)]
        while stack:
            current, children_done = stack.pop()
            if id(current) in self._size:
                continue
            children = self._children(current)
            if children_done or not children:
                sizes = [self._size[id(c)] for c in children]
                count = 1 + sum(s[0] for s in sizes)
                depth = 1 + max((s[1] for s in sizes), default=0)
                self._size[id(current)] = (count, depth)
                continue
            stack.append((current, True))
            stack.extend((c, False) for c in children if id(c) not in self._size)
        return self._size[id(node)]

    @staticmethod
    def _children(node: Any) -> list[Any]:
        if isinstance(node, yaml.SequenceNode):
            return list(node.value)
        if isinstance(node, yaml.MappingNode):
            return [n for pair in node.value for n in pair]
        return []

    # ---------------------------------------------------------------- constructing: duplicate keys
    def construct_mapping(self, node: Any, deep: bool = False) -> dict:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int | None] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key, -1)
                except TypeError:  # an unhashable key: SafeLoader reports it below
                    continue
                if first != -1:
                    at = f" (first at line {first})" if first is not None else ""
                    raise _Refused(f"duplicate key {key!r}{at}; expected each key once in a mapping",
                                   _line(key_node.start_mark))
                seen[key] = _line(key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def parse_yaml(text: str, *, where: str | Path | None = None, error: type[MedbenchError] = SpecError,
               field: str | None = None) -> Any:
    """The data of one YAML document; errors are one ``error`` line naming ``where`` and the line
    (``field`` first when given, e.g. the command-line option that named the file)."""
    if len(text.encode("utf-8", errors="replace")) > MAX_BYTES:
        raise error(f"file is larger than {MAX_BYTES // 1024} KiB; expected a task-sized YAML file",
                    where=where, field=field)
    loader = BoundedSafeLoader(text)
    try:
        return loader.get_single_data()
    except _Refused as err:
        raise _error(error, err.message, where, field, err.line) from None
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        what = err.problem or err.context or "unreadable"
        if err.problem and err.context:
            what += f" ({err.context})"
        raise _error(error, f"invalid YAML: {what}", where, field, _line(mark)) from None
    except yaml.YAMLError as err:
        raise _error(error, f"invalid YAML: {err}", where, field, None) from None
    except (RecursionError, MemoryError) as err:  # not reachable within the bounds above; still one line
        raise _error(error, f"too large or too deeply nested to read ({type(err).__name__})", where, field,
                     None) from None
    finally:
        loader.dispose()


def read_yaml(path: Path, *, where: str | Path | None = None, error: type[MedbenchError] = SpecError,
              field: str | None = None) -> Any:
    """The data of the YAML file ``path`` (see :func:`parse_yaml`); ``where`` names it in errors (default:
    ``path``). A missing or unreadable file, or one that is not UTF-8, is one ``error`` line too."""
    where = path if where is None else where
    try:
        size = Path(path).stat().st_size
        if size > MAX_BYTES:
            raise error(f"file is larger than {MAX_BYTES // 1024} KiB; expected a task-sized YAML file",
                        where=where, field=field)
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise error("file not found", where=where, field=field) from None
    except OSError as err:
        raise error(f"cannot read: {err.strerror or err}", where=where, field=field) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise error(f"not UTF-8 text (byte {err.start}); expected a YAML file", where=where, field=field) from None
    return parse_yaml(text, where=where, error=error, field=field)


def _error(error: type[MedbenchError], message: str, where: Any, field: str | None,
           line: int | None) -> MedbenchError:
    at = f"line {line}" if line is not None else None
    if field is None:
        return error(message, where=where, field=at)
    return error(f"{at}: {message}" if at else message, where=where, field=field)
