"""Small helpers shared by several stages: hashing, atomic writes, suggestions."""

from __future__ import annotations

import contextlib
import difflib
import errno
import hashlib
import json
import os
import re
import socket
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:
    from medbench.errors import MedbenchError, OutputError

#: nesting levels of a JSON file medbench reads (a leaderboard or a metrics.json has about 12); deeper
#: input is refused with one line naming the file, instead of exhausting Python's recursion later
MAX_JSON_DEPTH = 64


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


#: files written atomically get the permissions ``open()`` would give them (mkstemp makes 0600)
_FILE_MODE = 0o666 & ~_current_umask()


def writer_tag() -> str:
    """``<pid>@<host>`` of this process, put in the names of its temporary files (see :func:`writer_gone`)."""
    host = re.sub(r"[^A-Za-z0-9-]", "_", socket.gethostname())[:40] or "unknown"
    return f"{os.getpid()}@{host}"


_WRITER_RE = re.compile(r"\.(\d+)@([A-Za-z0-9_-]+)\.(?:tmp|partial)$")


def writer_gone(name: str) -> bool | None:
    """Has the process that wrote the temporary file ``name`` exited? True / False, or None when that
    cannot be told here (written on another host, or with no :func:`writer_tag` in its name)."""
    m = _WRITER_RE.search(name)
    if m is None:
        return None
    pid, host = int(m.group(1)), m.group(2)
    if host != writer_tag().split("@", 1)[1]:
        return None
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # PermissionError: alive, someone else's
        return False
    return False


def usable_cores() -> int:
    """Cores this process may run on: its CPU affinity (taskset, cgroups, a SLURM allocation), else the machine's
    count. The one rule for every thread and worker count medbench chooses (torch's threads per rank, the cache
    build's workers, local jobs sharing a machine, the bootstrap's product)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def safe_name(name: str) -> str:
    """A name as one path component: ``timm/resnet50`` -> ``timm--resnet50``, ``transfusion:1`` -> ``transfusion-1``."""
    return name.replace("/", "--").replace(":", "-")


#: numpy's warnings about undefined numbers (empty or all-NaN slices, 0/0): scoring reports such a value as
#: None / ``n_undefined`` / a status, so the console gets no second, unhelpful copy of the condition
NUMPY_UNDEFINED_WARNINGS = ("Mean of empty slice", "All-NaN slice encountered", "invalid value encountered",
                            "divide by zero encountered", "Degrees of freedom <= 0")


@contextlib.contextmanager
def undefined_numbers_reported() -> Iterator[None]:
    """Within the block, numpy's RuntimeWarnings about undefined numbers are not printed (the scores record
    them); any other warning is."""
    import warnings

    import numpy as np

    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
        for text in NUMPY_UNDEFINED_WARNINGS:
            warnings.filterwarnings("ignore", message=f".*{re.escape(text)}", category=RuntimeWarning)
        yield


def did_you_mean(name: str, choices: list[str] | tuple[str, ...]) -> str:
    """`` (did you mean 'x'?)`` when a close match exists, else ``""``."""
    close = difflib.get_close_matches(name, list(choices), n=3, cutoff=0.6)
    if not close:
        return ""
    return " (did you mean " + " or ".join(repr(c) for c in close) + "?)"


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace: the input of every content hash."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def output_error(path: Path, err: OSError) -> "OutputError":
    """A one-line :class:`~medbench.errors.OutputError` for a failed write of ``path``."""
    from medbench.errors import OutputError

    reason = err.strerror or str(err) or type(err).__name__
    if err.errno == errno.ENOSPC or err.errno == errno.EDQUOT:
        what = f"the disk is full ({reason}); free space and rerun the same command"
    elif err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        what = f"the folder is not writable ({reason}); choose another --out or fix its permissions"
    else:
        what = reason
    return OutputError(f"cannot write: {what}; files written before are intact", where=path)


def _durable_replace(tmp: Path, path: Path) -> None:
    """fsync ``tmp``, rename it onto ``path``, fsync the folder (the rename survives a crash)."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass  # some file systems refuse fsync on folders; the rename itself is atomic
    finally:
        os.close(dir_fd)


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary file beside ``path`` to write to; renamed onto ``path`` when the block succeeds.

    Readers see the old file or the whole new one, never a part. On any error
    the temporary file is removed; an ``OSError`` (disk full, read-only
    folder) becomes a one-line :class:`~medbench.errors.OutputError` naming ``path``. The temporary
    file is ``.<name>.<random>.<pid>@<host>.tmp``: one left by a killed writer is recognised as
    stale by :func:`writer_gone` (see ``RunDir.remove_stale_temp_files``).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".{writer_tag()}.tmp", dir=path.parent)
        try:
            os.fchmod(fd, _FILE_MODE)
        finally:
            os.close(fd)
    except OSError as err:
        raise output_error(path, err) from err
    tmp = Path(name)
    try:
        yield tmp
        _durable_replace(tmp, path)
    except BaseException as err:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(err, OSError):
            raise output_error(path, err) from err
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def _nested_deeper_than(obj: Any, limit: int) -> bool:
    stack = [(obj, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        children = node.values() if isinstance(node, dict) else node
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return False


def parse_json(text: str | bytes, *, where: str | Path | None, error: "type[MedbenchError] | None" = None,
               field: str | None = None, expected: str = "a JSON file") -> Any:
    """``json.loads`` for files medbench reads back (run results, scores, leaderboards): malformed or
    over-nested input (more than :data:`MAX_JSON_DEPTH` levels) is one ``error`` line naming ``where``
    (default :class:`~medbench.errors.IntegrityError`)."""
    from medbench.errors import IntegrityError

    error = error or IntegrityError
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        raise error(f"not JSON (line {err.lineno}, column {err.colno}: {err.msg}); expected {expected}",
                    where=where, field=field) from None
    except UnicodeDecodeError as err:
        raise error(f"not UTF-8 text (byte {err.start}); expected {expected}", where=where, field=field) from None
    except RecursionError:
        raise error(f"nested deeper than {MAX_JSON_DEPTH} levels; expected {expected}", where=where,
                    field=field) from None
    if isinstance(obj, (dict, list)) and _nested_deeper_than(obj, MAX_JSON_DEPTH):
        raise error(f"nested deeper than {MAX_JSON_DEPTH} levels; expected {expected}", where=where, field=field)
    return obj


def read_json(path: Path, *, where: str | Path | None = None, error: "type[MedbenchError] | None" = None,
              field: str | None = None, expected: str = "a JSON file") -> Any:
    """The JSON file ``path`` through :func:`parse_json`; a missing or unreadable file is one line too."""
    from medbench.errors import IntegrityError

    error = error or IntegrityError
    where = path if where is None else where
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise error(f"file not found; expected {expected}", where=where, field=field) from None
    except OSError as err:
        raise error(f"cannot read it ({err.strerror or err}); expected {expected}", where=where,
                    field=field) from None
    return parse_json(raw, where=where, error=error, field=field, expected=expected)
