"""Per-sample predictions: what every score is computed from, saved with each run.

A predictions table has one row per scored image: ``sample_id``,
``patient_id``, ``split``, the canonical attributes and the task's attribute
columns, the labels (``label:<name>``, 1/0/null) and the predicted
probabilities (``prob:<name>``; sigmoid per label for binary/multilabel tasks,
softmax over classes for multiclass). ``medbench score`` recomputes every
score from these files alone.
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


def prob_column(name: str) -> str:
    return f"{PROB_PREFIX}{name}"


@dataclass
class Predictions:
    table: pl.DataFrame
    label_names: list[str]
    task_type: str

    @classmethod
    def build(cls, meta: pl.DataFrame, probs: np.ndarray, label_names: list[str], task_type: str) -> "Predictions":
        if probs.shape != (meta.height, len(label_names)):
            raise ValueError(f"probabilities of shape {probs.shape} for {meta.height} rows x {len(label_names)} labels")
        cols = {prob_column(n): pl.Series(probs[:, k].astype(np.float64)) for k, n in enumerate(label_names)}
        return cls(meta.with_columns(**cols), list(label_names), task_type)

    def y_true(self) -> np.ndarray:
        """``[N, L]`` float64, NaN where the label is missing."""
        return self.table.select([label_column(n) for n in self.label_names]).cast(pl.Float64).to_numpy()

    def y_prob(self) -> np.ndarray:
        return self.table.select([prob_column(n) for n in self.label_names]).to_numpy().astype(np.float64)

    def filter(self, mask: np.ndarray | pl.Series | pl.Expr) -> "Predictions":
        if isinstance(mask, pl.Expr):
            return Predictions(self.table.filter(mask), self.label_names, self.task_type)
        return Predictions(self.table.filter(pl.Series(np.asarray(mask, dtype=bool))), self.label_names, self.task_type)

    def __len__(self) -> int:
        return self.table.height

    def save(self, path: Path) -> None:
        """``path`` (parquet) and ``path.with_suffix('.json')`` (label names, task type), each atomic."""
        buf = io.BytesIO()
        self.table.write_parquet(buf)
        atomic_write_bytes(path, buf.getvalue())
        atomic_write_json(path.with_suffix(".json"), {"label_names": self.label_names, "task_type": self.task_type})

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
