"""The leaderboard format: its JSON Schema (shipped in ``medbench/schemas/``), validation, loading.

``validate_board`` checks a leaderboard dict against the schema of its
``schema_version`` and raises :class:`LeaderboardFormatError` with one line
naming the file and the field (``entries[2].headline.mean``). ``load_board``
reads a file and validates it: every command that reads a leaderboard
(``compare``, ``render``) goes through it.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from medbench.errors import MedbenchError

SCHEMA_NAME = "medbench-leaderboard"
#: 2: JSON Schema ``medbench/schemas/leaderboard-v2.schema.json``; provenance names backbone, weights sha256,
#: seeds and date; per-entry ``significance`` (tied with the best) and board-level ``significance`` method.
#: ``provenance.task_version`` is the task's ``version:`` as written (an integer or a string such as "1.2",
#: as ``TaskSpec.version``); allowing strings kept every earlier version-2 board valid, so no version bump.
#: Entries' optional ``warnings`` list (codes and one-line messages, see medbench.scoring.checks) was added the
#: same way: optional, so every earlier version-2 board stays valid; so was entries' optional ``replicates`` block
#: (what the paired regression gate needs, medbench.board.replicates): a board without it is gated by the
#: unpaired rule
SCHEMA_VERSION = 2
#: what identifies an entry: runs of other values are never pooled, and entries are matched on it. ``regime``
#: is "" for full fine-tuning (absent from the entry); ``protocol`` (``finetune``, ``linear``, ``knn``, see
#: medbench.probe.protocols) was added as an optional field in format 2: an entry without it is fine-tuning
ENTRY_KEY = ("task", "backbone", "init", "regime", "protocol")


def entry_key(entry: dict) -> tuple[str, str, str, str, str]:
    """(task, backbone, init, regime, protocol) of a leaderboard entry (or of a run's ``result.json``)."""
    from medbench.probe.protocols import protocol_name

    return (entry["task"], entry["backbone"], entry["init"], entry.get("regime") or "",
            protocol_name(entry.get("protocol")))


class LeaderboardFormatError(MedbenchError):
    """A leaderboard file is missing, not JSON, or does not follow the leaderboard schema."""


def schema_file(version: int = SCHEMA_VERSION) -> Path:
    from medbench.resources import package_data

    return package_data(f"leaderboard-v{version}.schema.json")


@lru_cache(maxsize=4)
def _validator(version: int):
    from jsonschema import Draft202012Validator

    schema = json.loads(schema_file(version).read_text())
    return Draft202012Validator(schema)


def field_name(path) -> str:
    """``entries[2].headline.mean`` from a jsonschema error path."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _short(value: Any, limit: int = 80) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _describe(error) -> tuple[str, str]:
    """(field, what was expected) of one jsonschema error, in one short line."""
    path = list(error.absolute_path)
    kind = error.validator
    if kind == "required":
        missing = error.message.split("'")[1] if "'" in error.message else str(error.validator_value)
        return field_name([*path, missing]), "required field is missing"
    if kind == "type":
        expected = error.validator_value
        expected = " or ".join(expected) if isinstance(expected, list) else expected
        return field_name(path), f"expected {expected}, got {_short(error.instance)}"
    if kind == "const":
        return field_name(path), f"expected {_short(error.validator_value)}, got {_short(error.instance)}"
    if kind == "enum":
        return field_name(path), f"expected one of {_short(error.validator_value)}, got {_short(error.instance)}"
    return field_name(path), f"{kind} {_short(error.validator_value)} not met by {_short(error.instance)}"


def validate_board(board: Any, where: str | Path | None = None) -> None:
    """Raise :class:`LeaderboardFormatError` (one line: file, field, expectation) unless ``board`` is valid."""
    if not isinstance(board, dict):
        raise LeaderboardFormatError(f"expected a JSON object, got {type(board).__name__}", where=where)
    if board.get("schema") != SCHEMA_NAME:
        raise LeaderboardFormatError(f"expected {SCHEMA_NAME!r}, got {_short(board.get('schema'))} "
                                     "(not a medbench leaderboard)", where=where, field="schema")
    version = board.get("schema_version")
    if not isinstance(version, int) or isinstance(version, bool) or not schema_file(version).is_file():
        raise LeaderboardFormatError(f"expected {SCHEMA_VERSION} (this medbench reads format version "
                                     f"{SCHEMA_VERSION}), got {_short(version)}; rebuild it with 'medbench leaderboard'",
                                     where=where, field="schema_version")
    if version != SCHEMA_VERSION:
        raise LeaderboardFormatError(f"expected {SCHEMA_VERSION}, got {version}; rebuild it from its runs with "
                                     "'medbench leaderboard'", where=where, field="schema_version")
    errors = [_deepest(e) for e in _validator(version).iter_errors(board)]
    if errors:  # the deepest error names the most precise field
        field, what = _describe(max(errors, key=lambda e: len(e.absolute_path)))
        raise LeaderboardFormatError(what, where=where, field=field)


def _deepest(error):
    while error.context:
        error = max(error.context, key=lambda e: len(e.absolute_path))
    return error


def load_board(path: Path, *, field: str | None = None) -> dict:
    """Read and validate a leaderboard file; errors name the file (and ``field``, the CLI argument)."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise LeaderboardFormatError("no such file; expected a leaderboard JSON file", where=path, field=field) from None
    except OSError as err:
        raise LeaderboardFormatError(f"cannot read it ({err.strerror or err})", where=path, field=field) from None
    from medbench.utils import parse_json

    # malformed or nested past MAX_JSON_DEPTH levels: one line naming the file, not a RecursionError
    board = parse_json(text, where=path, error=LeaderboardFormatError, field=field,
                       expected="a leaderboard JSON file")
    validate_board(board, where=path)
    return board
