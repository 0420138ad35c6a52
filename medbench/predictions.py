"""Per-sample predictions: what every score is computed from, saved with each run.

A predictions table has one row per scored image: ``sample_id``,
``patient_id``, ``split``, the canonical attributes and the task's attribute
columns, the labels (``label:<name>``, 1/0/null), the network's **logits**
(``logit:<name>``, float32 as the network computed them) and, for people and
other tools, the probabilities derived from them (``prob:<name>``; sigmoid per
label for binary/multilabel tasks, softmax over classes for multiclass).
``medbench score`` recomputes every score from these files alone.

**Precision.** Scores are computed from the logits, in float64: the
probabilities (:meth:`Predictions.y_prob`) are the sigmoid / softmax of the
float64 logits, the NLL uses log-sigmoid / log-softmax of the logits
(:meth:`Predictions.log_probs`), temperature scaling divides the logits, and
the AUC ranks the logits (:meth:`Predictions.y_score`; log-softmax for
multiclass), so a very confident score never ties with another one. Prediction
files written before medbench kept logits hold probabilities only, computed
in float32: they are still read, but a sigmoid in float32 is exactly 1.0 above
a logit of about 16.6, so confident predictions tie in the AUC and their NLL
is clipped; a run scored from such a file carries the warning
``probabilities_only``.

**Multiclass labels.** A multiclass row is *labelled* when exactly one of its
classes is 1 and the others 0. Rows with a class outside the scored label set
(every scored class 0: an OOD target whose label map covers some classes, the
in-distribution side of a shift comparison restricted to those classes, a csv
task's ``label_columns``), with several classes, or with a missing value are
*not labelled*: :meth:`Predictions.y_true` returns them as missing (NaN) for
every class, so no metric scores them (never as class 0), and
:meth:`Predictions.label_counts` counts them.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from medbench.data.base import LABEL_PREFIX, label_column
from medbench.utils import atomic_write_bytes, atomic_write_json

PROB_PREFIX = "prob:"
LOGIT_PREFIX = "logit:"
#: probabilities read from a file without logits are clipped to [EPS, 1 - EPS] where a log is taken
EPS = float(np.finfo(np.float64).eps)


def prob_column(name: str) -> str:
    return f"{PROB_PREFIX}{name}"


def logit_column(name: str) -> str:
    return f"{LOGIT_PREFIX}{name}"


def probabilities(task_type: str, logits: np.ndarray) -> np.ndarray:
    """Probabilities in float64 from logits: softmax over classes (multiclass) or sigmoid per label."""
    from scipy.special import expit, softmax

    z = np.asarray(logits, dtype=np.float64)
    if task_type == "multiclass":
        return softmax(z, axis=1) if z.size else z.copy()
    return expit(z)


@dataclass
class Predictions:
    table: pl.DataFrame
    label_names: list[str]
    task_type: str

    @classmethod
    def build(cls, meta: pl.DataFrame, probs: np.ndarray, label_names: list[str], task_type: str) -> "Predictions":
        """Predictions from probabilities alone (as files written before logits were kept; tests)."""
        if probs.shape != (meta.height, len(label_names)):
            raise ValueError(f"probabilities of shape {probs.shape} for {meta.height} rows x {len(label_names)} labels")
        cols = {prob_column(n): pl.Series(probs[:, k].astype(np.float64)) for k, n in enumerate(label_names)}
        return cls(meta.with_columns(**cols), list(label_names), task_type)

    @classmethod
    def from_logits(cls, meta: pl.DataFrame, logits: np.ndarray, label_names: list[str],
                    task_type: str) -> "Predictions":
        """Predictions from the network's logits (kept as given, float32 by default) and the float64
        probabilities derived from them."""
        logits = np.asarray(logits)
        if logits.shape != (meta.height, len(label_names)):
            raise ValueError(f"logits of shape {logits.shape} for {meta.height} rows x {len(label_names)} labels")
        if logits.dtype not in (np.float32, np.float64):
            logits = logits.astype(np.float32)
        probs = probabilities(task_type, logits)
        cols = {logit_column(n): pl.Series(logits[:, k]) for k, n in enumerate(label_names)}
        cols.update({prob_column(n): pl.Series(probs[:, k]) for k, n in enumerate(label_names)})
        return cls(meta.with_columns(**cols), list(label_names), task_type)

    # ------------------------------------------------------------------ labels

    def raw_labels(self) -> np.ndarray:
        """``[N, L]`` float64 as stored, NaN where a label is missing."""
        return self.table.select([label_column(n) for n in self.label_names]).cast(pl.Float64).to_numpy()

    def y_true(self) -> np.ndarray:
        """``[N, L]`` float64, NaN where the label is missing; multiclass: rows that are not labelled (see the
        module docstring) are NaN for every class."""
        y = self.raw_labels()
        if self.task_type == "multiclass" and y.size:
            y = np.where(self.labelled_rows()[:, None], y, np.nan)
        return y

    def labelled_rows(self) -> np.ndarray:
        """Multiclass: rows with exactly one class 1 and the others 0. Binary/multilabel: rows with any label."""
        y = self.raw_labels()
        if self.task_type != "multiclass":
            return ~np.isnan(y).all(1) if y.size else np.zeros(len(self), dtype=bool)
        if not y.size:
            return np.zeros(len(self), dtype=bool)
        return ~np.isnan(y).any(1) & ((y == 1).sum(1) == 1) & (((y == 0) | (y == 1)).all(1))

    def label_counts(self) -> dict[str, int]:
        """How many rows are scored: ``n``, ``labelled``; multiclass also ``missing`` (a missing value),
        ``outside_classes`` (no scored class is 1) and ``several_classes``."""
        y = self.raw_labels()
        n = len(self)
        out = {"n": n, "labelled": int(self.labelled_rows().sum())}
        if self.task_type == "multiclass":
            missing = np.isnan(y).any(1) if y.size else np.zeros(n, dtype=bool)
            ones = (np.nan_to_num(y) == 1).sum(1) if y.size else np.zeros(n)
            out["missing"] = int(missing.sum())
            out["outside_classes"] = int((~missing & (ones == 0)).sum())
            out["several_classes"] = int((~missing & (ones > 1)).sum())
        return out

    # ------------------------------------------------------------------ scores

    @property
    def has_logits(self) -> bool:
        return all(logit_column(n) in self.table.columns for n in self.label_names)

    def logits(self) -> np.ndarray | None:
        """``[N, L]`` float64 logits, or None for a file holding probabilities only."""
        if not self.has_logits:
            return None
        return self.table.select([logit_column(n) for n in self.label_names]).to_numpy().astype(np.float64)

    def stored_probs(self) -> np.ndarray:
        return self.table.select([prob_column(n) for n in self.label_names]).to_numpy().astype(np.float64)

    def y_prob(self) -> np.ndarray:
        """``[N, L]`` float64 probabilities: from the logits when the file has them, else as stored."""
        z = self.logits()
        return probabilities(self.task_type, z) if z is not None else self.stored_probs()

    def y_score(self) -> np.ndarray:
        """``[N, L]`` float64 ranking scores, monotone in each column's probability: the logits
        (binary/multilabel) or log-softmax (multiclass), which never saturate; the probabilities themselves
        for a file without logits."""
        z = self.logits()
        if z is None:
            return self.stored_probs()
        if self.task_type == "multiclass":
            from scipy.special import log_softmax

            return log_softmax(z, axis=1) if z.size else z
        return z

    def log_probs(self) -> tuple[np.ndarray, np.ndarray | None]:
        """Logs of the probabilities for the NLL, in float64: binary/multilabel ``(log p, log (1 - p))`` from
        log-sigmoid of the logits; multiclass ``(log softmax, None)``. Without logits: the logs of the stored
        probabilities clipped to ``[EPS, 1 - EPS]``."""
        z = self.logits()
        if z is not None:
            from scipy.special import log_expit, log_softmax

            if self.task_type == "multiclass":
                return (log_softmax(z, axis=1) if z.size else z), None
            return log_expit(z), log_expit(-z)
        p = np.clip(self.stored_probs(), EPS, 1 - EPS)
        if self.task_type == "multiclass":
            return np.log(p), None
        return np.log(p), np.log1p(-p)

    def logits_or_estimate(self) -> np.ndarray:
        """The logits; for a file without them, ``log(p / (1 - p))`` (or ``log p`` for multiclass: softmax
        is unchanged by a constant per row) of the stored probabilities clipped to ``[EPS, 1 - EPS]``."""
        z = self.logits()
        if z is not None:
            return z
        p = np.clip(self.stored_probs(), EPS, 1 - EPS)
        return np.log(p) if self.task_type == "multiclass" else np.log(p) - np.log1p(-p)

    def with_logits(self, logits: np.ndarray) -> "Predictions":
        """The same rows with other logits (and the probabilities derived from them)."""
        meta = self.table.drop([c for c in self.table.columns if c.startswith((PROB_PREFIX, LOGIT_PREFIX))])
        return Predictions.from_logits(meta, np.asarray(logits, dtype=np.float64), self.label_names, self.task_type)

    def select_labels(self, labels: list[str]) -> "Predictions":
        """The predictions on a subset of their labels. Multiclass: the softmax over the subset's logits,
        i.e. the probabilities renormalized over the subset; rows whose class is outside the subset are then
        not labelled (see the module docstring)."""
        if list(labels) == list(self.label_names):
            return self
        keep = [c for c in self.table.columns if not c.startswith((PROB_PREFIX, LOGIT_PREFIX, LABEL_PREFIX))]
        meta = self.table.select(keep + [label_column(n) for n in labels])
        idx = [self.label_names.index(n) for n in labels]
        if self.has_logits:
            return Predictions.from_logits(meta, self.logits()[:, idx], list(labels), self.task_type)
        p = self.stored_probs()[:, idx]
        if self.task_type == "multiclass":
            total = p.sum(1, keepdims=True)
            p = np.divide(p, total, out=np.full_like(p, 1.0 / len(idx)), where=total > 0)
        return Predictions.build(meta, p, list(labels), self.task_type)

    # ------------------------------------------------------------------ rows and files

    def filter(self, mask: np.ndarray | pl.Series | pl.Expr) -> "Predictions":
        if isinstance(mask, pl.Expr):
            return Predictions(self.table.filter(mask), self.label_names, self.task_type)
        return Predictions(self.table.filter(pl.Series(np.asarray(mask, dtype=bool))), self.label_names, self.task_type)

    def take(self, rows: np.ndarray) -> "Predictions":
        """The rows at these indices, in this order (repeats allowed: a bootstrap resample)."""
        return Predictions(self.table[np.asarray(rows, dtype=np.int64).tolist()], self.label_names, self.task_type)

    def __len__(self) -> int:
        return self.table.height

    def save(self, path: Path) -> None:
        """``path`` (parquet) and ``path.with_suffix('.json')`` (label names, task type), each atomic."""
        buf = io.BytesIO()
        self.table.write_parquet(buf)
        atomic_write_bytes(path, buf.getvalue())
        atomic_write_json(path.with_suffix(".json"), {"label_names": self.label_names, "task_type": self.task_type,
                                                      "logits": self.has_logits})

    @classmethod
    def load(cls, path: Path) -> "Predictions":
        return cls.parse(path.read_bytes(), path.with_suffix(".json").read_bytes(), where=path)

    @classmethod
    def parse(cls, table_bytes: bytes, meta_bytes: bytes, *, where: Path | str) -> "Predictions":
        """Predictions from the bytes of their parquet file and JSON sidecar; a damaged or foreign file is one
        :class:`~medbench.errors.IntegrityError` line naming ``where`` (never a polars error naming nothing)."""
        from medbench.errors import IntegrityError
        from medbench.utils import parse_json

        sidecar = Path(where).with_suffix(".json")
        meta = parse_json(meta_bytes, where=sidecar, expected="the predictions sidecar medbench wrote")
        names = meta.get("label_names") if isinstance(meta, dict) else None
        task_type = meta.get("task_type") if isinstance(meta, dict) else None
        if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names) \
                or task_type not in ("binary", "multiclass", "multilabel"):
            raise IntegrityError("expected label_names (a list of names) and task_type (binary, multiclass or "
                                 "multilabel)", where=sidecar)
        try:
            table = pl.read_parquet(io.BytesIO(table_bytes))
        except Exception as err:  # polars raises several types for damaged files (and panics as exceptions)
            detail = " ".join(str(err).split()[:20])
            raise IntegrityError(f"not a readable predictions table ({type(err).__name__}: {detail})",
                                 where=where) from None
        wanted = [label_column(n) for n in names] + [prob_column(n) for n in names]
        missing = [c for c in wanted if c not in table.columns]
        if missing:
            raise IntegrityError(f"column {missing[0]!r} is missing; expected the predictions of labels {names}",
                                 where=where)
        for col in wanted:
            if not table[col].dtype.is_numeric():
                raise IntegrityError(f"column {col!r} holds {table[col].dtype}, expected numbers", where=where)
        return cls(table, list(names), task_type)


def label_names_in(table: pl.DataFrame) -> list[str]:
    return [c.removeprefix(LABEL_PREFIX) for c in table.columns if c.startswith(LABEL_PREFIX)]
