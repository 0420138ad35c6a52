"""The one dataset interface every later stage sees.

An adapter turns a dataset laid out as its publisher ships it into a
:class:`DatasetIndex`: a polars table with one row per image and canonical
columns, plus a way to read each image's pixels. Nothing downstream of the
adapter knows which dataset it is looking at.

Canonical columns (all present; unknown values are null):

================  =======  ====================================================
column            dtype    meaning
================  =======  ====================================================
``sample_id``     Utf8     unique per row within the dataset (e.g. image name)
``patient_id``    Utf8     the unit that must stay on one side of a split
                           (patient; lesion for dermatology)
``path``          Utf8     image file relative to the dataset root; null when
                           pixels come from an in-memory array
``sex``           Utf8     ``"M"`` / ``"F"``
``age``           Float64  years
``view``          Utf8     projection: ``PA``, ``AP``, ``LATERAL``, ``CC``,
                           ``MLO``, ... (upper case)
``site``          Utf8     source / hospital / sub-dataset
``split``         Utf8     the publisher's split (``train``/``val``/``test``)
                           when there is one
================  =======  ====================================================

Labels are one column per label of the task's label set, named
``label:<name>``, dtype Int8, values 1 / 0 / null (missing or masked).
Multiclass tasks use one-hot label columns (exactly one 1 per labelled row).
Adapters may add further attribute columns (e.g. ``localization``); a task
may name any column as a subgroup attribute.
"""

from __future__ import annotations

import hashlib
import importlib
import pkgutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, runtime_checkable

import numpy as np
import polars as pl

from medbench.errors import DataError

LABEL_PREFIX = "label:"

CANONICAL_SCHEMA: dict[str, pl.DataType] = {
    "sample_id": pl.Utf8,
    "patient_id": pl.Utf8,
    "path": pl.Utf8,
    "sex": pl.Utf8,
    "age": pl.Float64,
    "view": pl.Utf8,
    "site": pl.Utf8,
    "split": pl.Utf8,
}


def label_column(name: str) -> str:
    return f"{LABEL_PREFIX}{name}"


@dataclass
class DatasetIndex:
    """A dataset as medbench sees it: canonical table + pixel access.

    ``pixels``, when given, holds the images in memory, row-aligned with
    ``table`` (shape ``[N, H, W]`` or ``[N, H, W, C]``); otherwise each row's
    ``path`` is read from ``root``.
    """

    name: str
    table: pl.DataFrame
    label_names: list[str]
    root: Path | None = None
    pixels: np.ndarray | None = None
    source_files: list[Path] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.table = conform_table(self.table, self.label_names, where=self.name)
        if self.pixels is not None and len(self.pixels) != self.table.height:
            raise DataError(
                f"{len(self.pixels)} in-memory images for {self.table.height} rows",
                where=self.name,
                field="pixels",
            )

    def __len__(self) -> int:
        return self.table.height

    @property
    def label_columns(self) -> list[str]:
        return [label_column(n) for n in self.label_names]

    def labels(self, table: pl.DataFrame | None = None) -> np.ndarray:
        """Labels as float32 ``[N, L]`` with NaN for missing."""
        t = self.table if table is None else table
        return (
            t.select(self.label_columns).cast(pl.Float32).to_numpy().astype(np.float32, copy=False)
        )

    def read_image(self, row: int) -> np.ndarray:
        """Pixels of one row: ``[H, W]`` or ``[H, W, C]``, uint8/uint16/float."""
        if self.pixels is not None:
            return np.asarray(self.pixels[row])
        from medbench.data.image_io import read_image

        rel = self.table["path"][row]
        if rel is None:
            raise DataError("row has neither a path nor in-memory pixels", where=self.name, field=f"row {row}")
        base = self.root if self.root is not None else Path(".")
        return read_image(base / rel)

    def image_path(self, row: int) -> Path | None:
        rel = self.table["path"][row]
        if rel is None:
            return None
        return (self.root or Path(".")) / rel

    def subset(self, mask: pl.Series | np.ndarray) -> "DatasetIndex":
        """Rows where ``mask`` is true, with pixels kept aligned."""
        mask_np = np.asarray(mask, dtype=bool)
        pixels = self.pixels[mask_np] if self.pixels is not None else None
        return DatasetIndex(
            name=self.name,
            table=self.table.filter(pl.Series(mask_np)),
            label_names=list(self.label_names),
            root=self.root,
            pixels=pixels,
            source_files=list(self.source_files),
            notes=dict(self.notes),
        )

    def fingerprint(self) -> str:
        """Content hash of what defines this dataset: file list, labels, metadata.

        Image bytes are not read (that would cost a full pass over the data);
        in-memory pixels are hashed.
        """
        h = hashlib.sha256()
        h.update(self.name.encode())
        cols = ["sample_id", "patient_id", "path", "split", *self.label_columns]
        h.update(self.table.select(cols).write_csv().encode())
        if self.pixels is not None:
            h.update(str(self.pixels.shape).encode())
            h.update(str(self.pixels.dtype).encode())
            h.update(np.ascontiguousarray(self.pixels).view(np.uint8).data)
        return h.hexdigest()


def conform_table(table: pl.DataFrame, label_names: list[str], *, where: str) -> pl.DataFrame:
    """Check and cast an adapter's table to the canonical schema."""
    missing = [c for c in ("sample_id", "patient_id") if c not in table.columns]
    if missing:
        raise DataError(f"adapter produced no column {missing[0]!r}", where=where, field="table")
    exprs = []
    for name, dtype in CANONICAL_SCHEMA.items():
        if name in table.columns:
            exprs.append(pl.col(name).cast(dtype))
        else:
            exprs.append(pl.lit(None, dtype=dtype).alias(name))
    for lab in label_names:
        col = label_column(lab)
        if col not in table.columns:
            raise DataError(f"adapter produced no column for label {lab!r}", where=where, field="labels")
        exprs.append(pl.col(col).cast(pl.Int8))
    extra = [
        pl.col(c)
        for c in table.columns
        if c not in CANONICAL_SCHEMA and not c.startswith(LABEL_PREFIX)
    ]
    out = table.select(exprs + extra)
    bad = out.select(
        [
            (pl.col(label_column(lab)).is_not_null() & ~pl.col(label_column(lab)).is_in([0, 1]))
            .any()
            .alias(lab)
            for lab in label_names
        ]
    )
    for lab in label_names:
        if bad[lab][0]:
            raise DataError("label values must be 1, 0 or missing", where=where, field=label_column(lab))
    dup = out["sample_id"].is_duplicated()
    if dup.any():
        first = out.filter(dup)["sample_id"][0]
        raise DataError(f"sample_id {first!r} occurs more than once", where=where, field="sample_id")
    return out


@runtime_checkable
class DatasetAdapter(Protocol):
    """Reads one dataset layout. One module per adapter under
    ``medbench.data.adapters``; the module exposes ``ADAPTER``.

    ``options`` is the task spec's ``dataset.options`` mapping; an adapter
    validates it with its own pydantic model (``Options``), so an unknown or
    ill-typed option names the field. ``labels`` is the task's label set;
    ``task_type`` is ``binary``/``multiclass``/``multilabel``.
    """

    name: str
    #: a line for ``medbench data`` listings and missing-data messages
    description: str
    #: where to get the data and what the folder must look like
    how_to_get: str

    def load(self, root: Path | None, options: dict[str, Any], labels: list[str], task_type: str) -> DatasetIndex:
        ...


def _module_name(adapter: str) -> str:
    return adapter.replace("-", "_")


def list_adapters() -> list[str]:
    import medbench.data.adapters as pkg

    return sorted(
        m.name.replace("_", "-") for m in pkgutil.iter_modules(pkg.__path__) if not m.name.startswith("_")
    )


def get_adapter(name: str, *, where: str | None = None) -> DatasetAdapter:
    """The adapter registered under ``name`` (module ``medbench.data.adapters.<name>``)."""
    available = list_adapters()
    if name not in available:
        from medbench.utils import did_you_mean

        raise DataError(
            f"unknown dataset adapter {name!r}{did_you_mean(name, available)}; expected one of: {', '.join(available)}",
            where=where,
            field="dataset.adapter",
        )
    module = importlib.import_module(f"medbench.data.adapters.{_module_name(name)}")
    adapter = getattr(module, "ADAPTER")
    return adapter


def read_csv_checked(
    path: Path,
    *,
    required: list[str],
    dataset: str,
    separator: str = ",",
    schema_overrides: dict[str, pl.DataType] | None = None,
    transform: Callable[[pl.DataFrame], pl.DataFrame] | None = None,
) -> pl.DataFrame:
    """Read a publisher's CSV as strings, failing with the file and column named."""
    if not path.is_file():
        raise DataError(f"file not found (dataset {dataset!r})", where=path)
    try:
        df = pl.read_csv(
            path,
            separator=separator,
            infer_schema=False,
            schema_overrides=schema_overrides,
            truncate_ragged_lines=False,
        )
    except Exception as err:  # polars raises several error types for malformed CSV
        raise DataError(f"not a readable CSV: {str(err).splitlines()[0]}", where=path) from err
    absent = [c for c in required if c not in df.columns]
    if absent:
        raise DataError(
            f"column {absent[0]!r} is missing; expected columns {required}", where=path, field=absent[0]
        )
    return transform(df) if transform else df
