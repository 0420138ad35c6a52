"""The run store: one folder per run, written so that a partial run never looks complete.

Layout under the output folder::

    runs/<task>/<backbone>/<init>-seed<k>[-<variant>]-<key[:10]>/   (variant e.g. frac10, res64, freeze-head,
                                                                      linear, shots5-knn, linear-cls+mean)
        config.json          what defines the run (resolved task spec, backbone, plan, ...)
        predictions/val.parquet, test.parquet, ood-<target>.parquet  (+ .json sidecars): labels, logits
                             (float32) and the probabilities derived from them (see medbench.predictions)
        splits.parquet       the split every sample was in
        history.json         training loss, lr and validation curve
        metrics.json         scores computed from the predictions (with scoring.scoring_version and warnings)
        bootstrap.parquet    the bootstrap replicates of every score
        similarity.json/.png per-layer similarity initial vs fine-tuned (only with --similarity)
        result.json          written last: the run is complete iff it exists with status "ok";
                             status "failed" records an error (line, kind, traceback) instead
        checkpoint/          while training: the last checkpoint (see medbench.train.checkpoint);
                             removed once the run is complete
        .lock                held (flock) by the process training the run
        .<file>.<random>.<pid>@<host>.tmp   a file being written (utils.atomic_path); one left by a
                             killed writer is removed when the run is next claimed (see RunDir.claim)
    features/            the probes' feature cache (see medbench.store.features)
    leaderboard.json
    micro-batch/<setting>.json   --micro-batch auto: the micro-batch chosen for one (task, backbone, crop,
                         device type, precision, ZeRO stage, world size, freezing, layout), how (memory
                         model, trial steps) and every halving after an out-of-memory error

**The key.** ``<key>`` is :func:`medbench.run.request.run_key`: a sha256 of
everything that fixes the run's numbers: every field of the run request (task,
backbone, resolved init, the *content* hash of the weights file, seed, step
cap, engine settings, and any field added later), the task's content hash,
the data fingerprint of the task and of each OOD target (rows, labels, metadata
and each image file's stamp: size and mtime, or its sha256 with
``--verify-pixels``; see :mod:`medbench.data.fingerprint`), the resolved training
plan and input geometry, the world size, the training-numerics version, the
execution options that pick other kernels when they are on (channels-last,
``--compile``; absent when off, as on CPU) and the store format. Changing any
of them makes a new run; nothing else does (checkpoint settings, thread count,
output paths, ``medbench.__version__``, the input workers, the loss read-back
interval). The micro-batch enters as requested (a number, ``auto`` or none);
what ``auto`` chose is recorded in the run and under ``micro-batch/``, so a
run halved after an out-of-memory error keeps its key and resumes. The code
revision (git sha), library versions and the device are recorded in each
result's provenance, not in the key.

**Code changes: two versions.** What a code change invalidates depends on
what it changes, and two constants say so (bump them in the commit that makes
the change):

* ``medbench.train.numerics.TRAINING_NUMERICS``: bumped by any change to the
  numbers training produces for the same request (optimizer, schedule,
  augmentation, initialisation, preprocessing that reaches the network, the
  evaluation pass, what the prediction files hold). It is part of the key, so
  after a bump ``medbench run`` trains new runs rather than reusing old ones;
  each run records it in ``config.json`` (``training_numerics``; absent in
  runs from before it existed) and ``medbench leaderboard`` refuses to put runs
  of different training numerics in one board, naming two of them.
* ``medbench.scoring.version.SCORING_VERSION``: bumped by any change to what a
  score means or how it is computed from saved predictions. It is *not* in the
  key: ``metrics.json`` records it (``scoring.scoring_version``; absent = 0),
  and a run scored by another version is re-scored from its saved predictions
  (seconds, no training), with the settings it was scored with, when
  ``medbench run`` reuses it and when ``medbench leaderboard`` or
  ``medbench paired`` reads it; the console says which runs were re-scored.

``medbench.__version__`` is neither: a release may change nothing numeric, and
a fix between releases may change either.

**Completion and failures.** ``result.json`` is written last, atomically,
after every other file; a folder without it (or with ``status: failed``) is
not complete: the next ``medbench run`` trains it again, resuming from its
checkpoint when there is one. Every file is written through
:func:`medbench.utils.atomic_path` (temporary file, fsync, rename), so a kill
at any instant leaves each file old-or-whole.

**Integrity.** A complete run's ``result.json`` records the sha256 of every
other file of the folder (``files``: relative path -> digest; the lock,
checkpoints and temporary files excepted) when the run completes, and
``medbench score`` records them again after recomputing the scores. Every
later read of a recorded file (:meth:`RunDir.read_bytes`, :meth:`RunDir.read_json`:
the leaderboard, ``paired``, ``score`` itself) checks it: a file edited or
damaged since is one :class:`~medbench.errors.IntegrityError` line naming it,
never a silently different number. This guards against accidents and casual
edits, not against someone who rewrites ``result.json`` too (it is no
signature). Runs completed before the record existed have no ``files``: they
are read unchecked until ``medbench score`` records them.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from medbench.errors import IntegrityError
from medbench.utils import atomic_write_json, parse_json, safe_name, writer_gone

RESULT = "result.json"
CONFIG = "config.json"
METRICS = "metrics.json"
HISTORY = "history.json"
PREDICTIONS = "predictions"
CHECKPOINT = "checkpoint"
LOCK = ".lock"
#: bumped when the layout or the meaning of a stored file changes (part of the run key)
STORE_FORMAT = 2
#: the ``result.json`` key holding the sha256 of the run's other files
FILES = "files"
#: what to do about a recorded file that changed, by the command that can write it again
_REMEDY = {
    METRICS: "rerun 'medbench score {run}' to recompute the scores from the predictions",
    "bootstrap.parquet": "rerun 'medbench score {run}' to recompute the scores from the predictions",
}
_RETRAIN = ("the run's own outputs changed since it completed: delete the run folder and rerun the same "
            "command to train it again")
#: a temporary file whose writer cannot be checked from here (written on another host, or by a medbench
#: that did not tag its temporary files) counts as left behind when nothing has written to it for this long
#: while the run's lock is held: an atomic write renames its file within seconds of its last write
STALE_TEMP_SECONDS = 15 * 60


@dataclass(frozen=True)
class RunDir:
    path: Path

    @property
    def predictions(self) -> Path:
        return self.path / PREDICTIONS

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / CHECKPOINT

    def prediction_file(self, name: str) -> Path:
        return self.predictions / f"{safe_name(name)}.parquet"

    def write_json(self, name: str, obj: Any) -> None:
        atomic_write_json(self.path / name, obj)

    def read_json(self, name: str) -> Any:
        """A JSON file of the run, checked against the digest ``result.json`` recorded (see the module
        docstring) and read with the nesting bound of :func:`medbench.utils.parse_json`."""
        return parse_json(self.read_bytes(name), where=self.path / name,
                          expected=f"the {name} medbench wrote", error=IntegrityError)

    def read_bytes(self, name: str) -> bytes:
        """The bytes of ``name`` (relative to the run folder); when ``result.json`` recorded its sha256 they
        must still have it, and a recorded file must still exist (:class:`IntegrityError` naming the file)."""
        path = self.path / name
        recorded = self.recorded_digests()
        expected = recorded.get(Path(name).as_posix()) if recorded else None
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            told = f"missing, but {RESULT} recorded it when the run completed" if expected is not None else \
                "missing; expected the file medbench writes in a run folder"
            raise IntegrityError(f"{told}; {self._remedy(name)}", where=path) from None
        except OSError as err:
            raise IntegrityError(f"cannot read it ({err.strerror or err})", where=path) from None
        if expected is not None and hashlib.sha256(data).hexdigest() != expected:
            raise IntegrityError(f"sha256 differs from the one {RESULT} recorded (edited or damaged since the run "
                                 f"was scored); {self._remedy(name)}", where=path)
        return data

    def _remedy(self, name: str) -> str:
        return _REMEDY.get(Path(name).as_posix(), _RETRAIN).format(run=self.path)

    def scores(self) -> dict:
        """The run's scores: ``metrics.json`` (checked; kept current by ``medbench score``), or the copy in
        ``result.json`` for a run that has no ``metrics.json`` and never recorded one."""
        recorded = self.recorded_digests() or {}
        if (self.path / METRICS).is_file() or METRICS in recorded:
            scores = self.read_json(METRICS)
        else:
            scores = (self.result() or {}).get("metrics", {})
        if not isinstance(scores, dict):
            raise IntegrityError("expected a mapping of scores", where=self.path / METRICS)
        return scores

    def recorded_digests(self) -> dict[str, str] | None:
        """The ``files`` record of a complete run's ``result.json`` (None: not complete, or completed by a
        medbench that did not record them)."""
        r = self.result()
        files = r.get(FILES) if r and r.get("status") == "ok" else None
        return files if isinstance(files, dict) else None

    def digests(self) -> dict[str, str]:
        """sha256 of every file of the folder later commands may read: relative path -> hex digest (not
        ``result.json``, the lock, checkpoints, temporary or hidden files). Folder links are not followed."""
        out: dict[str, str] = {}
        for dirpath, dirnames, filenames in os.walk(self.path):
            rel_dir = Path(dirpath).relative_to(self.path)
            dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and not (rel_dir == Path(".")
                                                                                       and d == CHECKPOINT))
            for f in sorted(filenames):
                rel = (rel_dir / f).as_posix()
                if f.startswith(".") or rel == RESULT or not os.path.isfile(os.path.join(dirpath, f)):
                    continue
                h = hashlib.sha256()
                with open(os.path.join(dirpath, f), "rb") as fh:
                    while block := fh.read(1 << 20):
                        h.update(block)
                out[rel] = h.hexdigest()
        return out

    def result(self) -> dict | None:
        """The parsed ``result.json`` (complete or failed run), or None (absent, unreadable)."""
        p = self.path / RESULT
        if not p.is_file():
            return None
        try:
            r = parse_json(p.read_bytes(), where=p)
        except (OSError, IntegrityError):
            return None
        return r if isinstance(r, dict) else None

    def result_problem(self) -> IntegrityError | None:
        """Why an existing ``result.json`` cannot be read (not JSON, too deep, not an object), or None."""
        p = self.path / RESULT
        try:
            r = parse_json(p.read_bytes(), where=p, expected="the result.json medbench wrote")
        except FileNotFoundError:
            return None
        except OSError as err:
            return IntegrityError(f"cannot read it ({err.strerror or err})", where=p)
        except IntegrityError as err:
            return err
        if not isinstance(r, dict) or r.get("status") not in ("ok", "failed"):
            return IntegrityError("not a run result (no 'status: ok' or 'failed'); expected the result.json "
                                  "medbench wrote", where=p)
        return None

    @property
    def status(self) -> str | None:
        """``"ok"``, ``"failed"``, or None (never finished: running, interrupted or not started)."""
        r = self.result()
        return r.get("status") if r else None

    @property
    def complete(self) -> bool:
        return self.status == "ok"

    def write_result(self, result: dict) -> None:
        """The completion marker: call after every other file of the run is written. Records the sha256 of
        every other file (:meth:`digests`), which later reads check."""
        assert result.get("status") == "ok"
        self.write_json(RESULT, {**result, FILES: self.digests()})

    def record_rescore(self, scores: dict, when: str) -> None:
        """After ``medbench score`` rewrote the scores of a complete run: its ``result.json`` takes the new
        scores and the new digests of every file, written last and atomically like the completion marker."""
        result = self.result()
        assert result is not None and result.get("status") == "ok"
        headline = dict(result.get("headline") or {})
        if headline.get("metric") is not None:
            headline["value"] = (scores.get("test") or {}).get(headline["metric"])
        self.write_json(RESULT, {**result, "headline": headline, "warnings": scores.get("warnings", []),
                                 "metrics": scores, "rescored": when, FILES: self.digests()})

    def write_failure(self, record: dict) -> None:
        """Record a failed attempt (``status: failed``); the run stays incomplete and is retried."""
        assert record.get("status") == "failed"
        previous = self.result() or {}
        attempt = int(previous.get("attempt", 1)) + 1 if previous.get("status") == "failed" else 1
        self.write_json(RESULT, {**record, "attempt": attempt})

    def clear_checkpoint(self) -> None:
        shutil.rmtree(self.checkpoint_dir, ignore_errors=True)

    def remove_stale_temp_files(self, *, unknown_after: float | None = STALE_TEMP_SECONDS) -> list[Path]:
        """Remove the temporary files (``.<name>...tmp`` of :func:`medbench.utils.atomic_path`) that a
        killed writer left anywhere in the run folder; returns them.

        Only files whose writer is gone: written on this host by a process that has exited. A file
        whose writer cannot be checked (another host, or an untagged name) is removed when it has not
        been written for ``unknown_after`` seconds (None: kept). Call while holding the run's lock.
        """
        removed: list[Path] = []
        now = time.time()
        for dirpath, _dirs, files in os.walk(self.path):
            for name in files:
                if not (name.startswith(".") and name.endswith(".tmp")):
                    continue
                path = Path(dirpath) / name
                gone = writer_gone(name)
                if gone is None and unknown_after is not None:
                    try:
                        gone = now - path.stat().st_mtime > unknown_after
                    except OSError:
                        continue
                if gone:
                    try:
                        path.unlink()
                    except OSError:
                        continue
                    removed.append(path)
        return removed

    @contextlib.contextmanager
    def claim(self) -> Iterator[bool]:
        """Hold the run's lock while training it: yields False when another process holds it.

        An advisory ``flock`` on ``<run>/.lock``: released by the kernel when the
        holder exits, even by SIGKILL, so a stale lock never blocks a rerun. On
        file systems without working flock (some NFS setups) two processes can
        still train the same run; their numbers are identical and every write is
        atomic, so the store stays consistent.

        Temporary files a killed writer left in the folder are removed when the
        lock is taken and again before it is released (by then the earlier
        writer's files are old enough to be told apart even when it ran on
        another host): see :meth:`remove_stale_temp_files`. Without working
        flock only files of exited writers on this host are removed.
        """
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            yield True
            return
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            except OSError:  # flock unsupported here: proceed unlocked
                self.remove_stale_temp_files(unknown_after=None)
                yield True
                return
            try:
                self.remove_stale_temp_files()
                yield True
                self.remove_stale_temp_files()
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


class RunStore:
    def __init__(self, out_dir: Path):
        self.out = Path(out_dir)

    def run_dir(self, task: str, backbone: str, init: str, seed: int, key: str, variant: str = "") -> RunDir:
        leaf = f"{safe_name(init)}-seed{seed}{('-' + safe_name(variant)) if variant else ''}-{key[:10]}"
        return RunDir(self.out / "runs" / safe_name(task) / safe_name(backbone) / leaf)

    def leaderboard_path(self) -> Path:
        return self.out / "leaderboard.json"

    def micro_batch_file(self, setting_key: str) -> Path:
        """The ``--micro-batch auto`` choice of one setting on one device type (medbench.run.runner)."""
        return self.out / "micro-batch" / f"{setting_key}.json"

    def runs(self) -> list[RunDir]:
        """Every run folder (complete or not)."""
        return [RunDir(p) for p in sorted((self.out / "runs").glob("*/*/*")) if p.is_dir()]

    def completed(self) -> list[RunDir]:
        return [r for r in self.runs() if r.complete]

    def failed(self) -> list[RunDir]:
        return [r for r in self.runs() if r.status == "failed"]


def find_run_dirs(paths: list[Path]) -> list[RunDir]:
    """Complete runs under each path (a run folder or any folder above run folders). A ``result.json`` that
    cannot be read (damaged: medbench writes it atomically) is one :class:`IntegrityError` line naming it,
    not a run silently left out."""
    out: list[RunDir] = []
    for p in paths:
        p = Path(p)
        if (p / RESULT).is_file():
            candidates = [RunDir(p)]
        else:
            candidates = [RunDir(r.parent) for r in sorted(p.rglob(RESULT))]
        for c in candidates:
            problem = c.result_problem()
            if problem is not None:
                raise problem
        out.extend(c for c in candidates if c.complete)
    seen: set[Path] = set()
    unique = []
    for r in out:
        if r.path.resolve() not in seen:
            seen.add(r.path.resolve())
            unique.append(r)
    return unique
