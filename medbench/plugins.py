"""Entry-point plug-ins (backbones, tasks): one warning line per broken plug-in, the others still load."""

from __future__ import annotations

import sys
from typing import Any

from medbench.errors import MedbenchError

#: plug-in failures already warned about in this process (group, name, value)
_WARNED: set[tuple[str, str, str]] = set()


def plugin_failure(group: str, ep: Any, err: BaseException) -> str:
    """One line naming the entry point (group, name, value, distribution) and its error."""
    dist = getattr(getattr(ep, "dist", None), "name", None)
    of = f" of {dist}" if dist else ""
    detail = " ".join(str(err).split())
    if not isinstance(err, MedbenchError):  # ours are self-explanatory; name a foreign exception's type
        detail = f"{type(err).__name__}: {detail}" if detail else type(err).__name__
    return f"entry point {ep.name!r} ({group} = {ep.value!r}{of}) failed to load: {detail}"


def warn_plugin(group: str, ep: Any, line: str) -> None:
    """Print ``line`` (a :func:`plugin_failure`) once per process as a ``medbench: warning:`` line on stderr."""
    key = (group, ep.name, ep.value)
    if key not in _WARNED:
        _WARNED.add(key)
        print(f"medbench: warning: {line}; skipped", file=sys.stderr)
