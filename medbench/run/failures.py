"""When a run fails or is stopped: what is recorded, and how a suite stops cleanly.

A run that raises is recorded in its folder as ``result.json`` with
``status: "failed"`` (see :func:`failure_record`), and the suite goes on
(``--fail-fast`` stops it). Errors are classified so the record says what to
do: ``out-of-memory`` (``--micro-batch auto`` or a lower ``--micro-batch``), ``device`` (a CUDA/NCCL
failure: the device may be unusable for later runs too), ``input`` (a
:class:`~medbench.errors.MedbenchError`: fix the named file or field), or
``crash`` (anything else: a bug; the traceback is in the record).

:class:`GracefulStop` turns the first SIGINT/SIGTERM during training into a
stop at the next step boundary, after a checkpoint; a second signal stops at
once. Outside training a signal stops at once (completed runs are on disk).
"""

from __future__ import annotations

import contextlib
import signal
import threading
import traceback
from typing import Any, Iterator

from medbench.errors import MedbenchError

_OOM_MARKERS = ("out of memory", "can't allocate memory", "cannot allocate memory", "failed to allocate")
_DEVICE_MARKERS = ("cuda error", "cudnn_status", "cublas_status", "nccl", "device-side assert", "hip error",
                   "illegal memory access", "ecc error", "cuda driver")


def one_line(err: BaseException) -> str:
    """The error as one line: a MedbenchError's own message, else ``Type: first line``."""
    if isinstance(err, MedbenchError):
        return str(err)
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def classify(err: BaseException) -> tuple[str, str]:
    """(kind, what to do) for a run's exception."""
    if isinstance(err, MedbenchError):
        return "input", "fix the file or option named in the error and rerun the same command"
    text = str(err).lower()
    oom_types = tuple(t for t in (_torch_oom_type(),) if t is not None) + (MemoryError,)
    if isinstance(err, oom_types) or any(m in text for m in _OOM_MARKERS):
        return "out-of-memory", ("the run did not fit in memory: rerun with --micro-batch auto (the largest that "
                                 "fits, halved on out-of-memory) or a smaller --micro-batch (gradient accumulation "
                                 "keeps the batch size), or a smaller input size")
    if isinstance(err, RuntimeError) and any(m in text for m in _DEVICE_MARKERS):
        return "device", ("the device failed; later runs on it may fail too: check the GPU (nvidia-smi) "
                          "and rerun the same command to retry the failed runs")
    return "crash", "an unexpected error (a bug?): the traceback is in this file; rerun the same command to retry"


def _torch_oom_type() -> type | None:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return None
    return getattr(torch, "OutOfMemoryError", None) or getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None)


def failure_record(err: BaseException, **context: Any) -> dict:
    """The ``result.json`` of a failed run: status, error line, kind, hint, traceback, and ``context``."""
    kind, hint = classify(err)
    return {
        "status": "failed",
        **context,
        "error": one_line(err),
        "error_type": type(err).__name__,
        "kind": kind,
        "hint": hint,
        "traceback": "".join(traceback.format_exception(type(err), err, err.__traceback__)),
    }


def release_memory() -> None:
    """Give memory held by a failed run back (CUDA caching allocator included)."""
    import gc

    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # pragma: no cover - a broken device must not hide the run's own error
        pass


class StopRequested(KeyboardInterrupt):
    """Raised at a step boundary (after a checkpoint) or between runs, after SIGINT/SIGTERM."""

    def __init__(self, signum: int, where: str = ""):
        self.signum = signum
        self.where = where
        super().__init__(f"stopped by {signal.Signals(signum).name}{(' ' + where) if where else ''}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class GracefulStop:
    """SIGINT/SIGTERM handling for a suite (installed only in the main thread).

    Inside :meth:`deferred` (while a run trains and writes its files) the first
    signal only sets :attr:`signum`; the run loop checks it after each step,
    saves a checkpoint and raises :class:`StopRequested`. A second signal, or a
    signal outside :meth:`deferred`, raises at once.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._deferring = False
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame: Any) -> None:
        if self._deferring and self.signum is None:
            self.signum = signum
            return
        raise StopRequested(signum, "(immediately)")

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        self._deferring = True
        try:
            yield
        finally:
            self._deferring = False

    def check(self, where: str = "") -> None:
        """Raise :class:`StopRequested` if a signal arrived."""
        if self.signum is not None:
            raise StopRequested(self.signum, where)
