"""User-facing errors.

Every error a user can cause (a wrong spec, a missing dataset, a corrupt image,
a bad argument) is raised as a :class:`MedbenchError`. The CLI prints its
one-line message and exits with code 2; ``--debug`` shows the traceback.
A message names where the problem is (file, field) and what was expected.
"""

from __future__ import annotations

from pathlib import Path


class MedbenchError(Exception):
    """An error caused by input the user can fix. ``str(err)`` is one line."""

    exit_code = 2

    def __init__(self, message: str, *, where: str | Path | None = None, field: str | None = None):
        self.message = " ".join(str(message).split())
        self.where = str(where) if where is not None else None
        self.field = field
        super().__init__(self.__str__())

    def __str__(self) -> str:  # noqa: D105
        parts = [p for p in (self.where, self.field) if p]
        prefix = ": ".join(parts)
        return f"{prefix}: {self.message}" if prefix else self.message


class SpecError(MedbenchError):
    """A task or suite YAML file is invalid."""


class DataError(MedbenchError):
    """A dataset is missing, incomplete or malformed."""


class BackboneError(MedbenchError):
    """A backbone name, its weights or its initialisation cannot be resolved."""


class UsageError(MedbenchError):
    """A command-line argument is invalid."""


class OutputError(MedbenchError):
    """The output folder (or a cache) cannot be written: read-only, full, missing.

    Always stops the suite: nothing later could be saved either. Files written
    before are intact (every write is atomic).
    """


class IntegrityError(MedbenchError):
    """A stored file (a run's result, scores, predictions or replicates, a preprocessing cache entry, a
    leaderboard) is unreadable, truncated, nested beyond the bound medbench reads, or no longer what was
    recorded when it was written. The message names the file and what to do (usually: recompute it)."""


class RunFailed(MedbenchError):
    """One run of a suite failed; recorded, the suite goes on unless --fail-fast."""

    exit_code = 1
