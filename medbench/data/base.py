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

import contextlib
import contextvars
import hashlib
import importlib
import os
import pkgutil
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, runtime_checkable

import numpy as np
import polars as pl

from medbench.errors import DataError
from medbench.paths import is_inside

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


# --------------------------------------------------------------------------- paths stay inside the data root

_OUTSIDE_ROOT_ALLOWED: contextvars.ContextVar[bool] = contextvars.ContextVar("medbench_outside_root", default=False)
_ALLOW_HINT = "pass --allow-outside-data-root (or MEDBENCH_ALLOW_OUTSIDE_DATA_ROOT=1) to allow it"


@contextlib.contextmanager
def paths_outside_root_allowed(allowed: bool) -> Iterator[None]:
    """Within the block, :func:`data_path` and :class:`DatasetIndex` accept paths outside the data root
    when ``allowed`` (the user's ``--allow-outside-data-root``; set by ``load_task_data``)."""
    token = _OUTSIDE_ROOT_ALLOWED.set(allowed)
    try:
        yield
    finally:
        _OUTSIDE_ROOT_ALLOWED.reset(token)


def _inside(root: Path, path: Path) -> bool:
    return is_inside(root, path)


def data_path(root: Path, value: str | Path, *, field: str, where: str | Path | None = None) -> Path:
    """A path a task declares (a CSV file name, an image folder, ...) resolved against the dataset folder.

    It must stay inside ``root``: an absolute path elsewhere or a ``..`` that
    climbs out is refused (a task file from a plug-in or a shared folder must
    not read other files), unless the user allowed it (see
    :func:`paths_outside_root_allowed`). Symbolic links inside the folder are
    the user's own choice and are followed. Every adapter resolves its
    path-like options through this function, naming the option as ``field``
    (``dataset.options.csv``).
    """
    raw = str(value)
    path = Path(os.path.expanduser(raw)) if raw.startswith("~") else Path(raw)
    full = path if path.is_absolute() else Path(root) / path
    if not _OUTSIDE_ROOT_ALLOWED.get() and not _inside(Path(root), full):
        raise DataError(f"path {raw!r} leaves the dataset folder {root}; expected a path inside it; {_ALLOW_HINT}",
                        where=where, field=field)
    return full


_ABSOLUTE = r"^([/\\]|[A-Za-z]:[/\\])"
_PARENT = r"(^|[/\\])\.\.([/\\]|$)"


def check_row_paths(table: pl.DataFrame, root: Path, *, where: str) -> None:
    """Every row's ``path`` stays inside ``root`` (unless allowed): a label file cannot point elsewhere."""
    if "path" not in table.columns or _OUTSIDE_ROOT_ALLOWED.get():
        return
    col = pl.col("path")
    suspect = table.filter(col.is_not_null() & (col.str.contains(_ABSOLUTE) | col.str.contains(_PARENT)))
    for sample_id, rel in suspect.select("sample_id", "path").iter_rows():
        if not _inside(root, Path(root) / rel):
            raise DataError(f"image path {rel!r} of sample {sample_id!r} leaves the dataset folder {root}; "
                            f"expected a path inside it; {_ALLOW_HINT}", where=where, field="path")


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
        where = str(self.source_files[0]) if len(self.source_files) == 1 else self.name  # name the label file
        self.table = conform_table(self.table, self.label_names, where=where)
        if self.root is not None:
            check_row_paths(self.table, self.root, where=where)
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

    def read_image(self, row: int, *, reduce_to: int | None = None) -> np.ndarray:
        """Pixels of one row: ``[H, W]`` or ``[H, W, C]``, uint8/uint16/float. ``reduce_to``: the size the image
        will be resized to (a JPEG may then be decoded at reduced scale, see :func:`~medbench.data.image_io.read_image`)."""
        if self.pixels is not None:
            return np.asarray(self.pixels[row])
        from medbench.data.image_io import read_image

        rel = self.table["path"][row]
        if rel is None:
            raise DataError("row has neither a path nor in-memory pixels", where=self.name, field=f"row {row}")
        base = self.root if self.root is not None else Path(".")
        return read_image(base / rel, reduce_to=reduce_to)

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

    def fingerprint(self, pixels: str | None = None) -> str:
        """Content hash of what defines this dataset: file list, labels, metadata, and with ``pixels`` the
        image files' content.

        ``pixels`` is the digest of the image files' stamps (:mod:`medbench.data.fingerprint`: size and
        mtime per file, or their sha256 on request), which ``medbench.run.prepare`` passes for the run key;
        without it (the stored split's key) image files are not looked at. In-memory pixels are hashed.
        """
        h = hashlib.sha256()
        h.update(self.name.encode())
        cols = ["sample_id", "patient_id", "path", "split", *self.label_columns]
        h.update(self.table.select(cols).write_csv().encode())
        if pixels is not None:
            h.update(f"|files:{pixels}".encode())
        if self.pixels is not None:
            h.update(str(self.pixels.shape).encode())
            h.update(str(self.pixels.dtype).encode())
            h.update(np.ascontiguousarray(self.pixels).view(np.uint8).data)
        return h.hexdigest()


def _first_uncastable(table: pl.DataFrame, column: str, dtype: pl.DataType) -> tuple[Any, Any] | None:
    """(sample_id, value) of the first non-null value of ``column`` that does not cast to ``dtype``."""
    src = table[column]
    lost = src.is_not_null() & src.cast(dtype, strict=False).is_null()
    if not lost.any():
        return None
    i = int(lost.arg_true()[0])
    return table["sample_id"][i], src[i]


def conform_table(table: pl.DataFrame, label_names: list[str], *, where: str) -> pl.DataFrame:
    """Check and cast an adapter's table to the canonical schema.

    A value that does not fit (an age ``"abc"``, a label ``"yes"`` or ``2``) is a
    :class:`DataError` naming the column, the value and the sample.
    """
    missing = [c for c in ("sample_id", "patient_id") if c not in table.columns]
    if missing:
        raise DataError(f"adapter produced no column {missing[0]!r}", where=where, field="table")
    table = table.with_columns(pl.col("sample_id").cast(pl.Utf8))
    exprs = []
    for name, dtype in CANONICAL_SCHEMA.items():
        if name in table.columns:
            bad_value = _first_uncastable(table, name, dtype)
            if bad_value is not None:
                raise DataError(f"value {bad_value[1]!r} of sample {bad_value[0]!r} is not a valid {dtype}",
                                where=where, field=name)
            exprs.append(pl.col(name).cast(dtype))
        else:
            exprs.append(pl.lit(None, dtype=dtype).alias(name))
    for lab in label_names:
        col = label_column(lab)
        if col not in table.columns:
            raise DataError(f"adapter produced no column for label {lab!r}", where=where, field="labels")
        src = table[col]
        as_int = src.cast(pl.Int8, strict=False)
        bad = (src.is_not_null() & as_int.is_null()) | (as_int.is_not_null() & ~as_int.is_in([0, 1]))
        if bad.any():
            i = int(bad.arg_true()[0])
            raise DataError(f"label values must be 1, 0 or missing; got {src[i]!r} for sample "
                            f"{table['sample_id'][i]!r}", where=where, field=col)
        exprs.append(as_int.alias(col))
    extra = [
        pl.col(c)
        for c in table.columns
        if c not in CANONICAL_SCHEMA and not c.startswith(LABEL_PREFIX)
    ]
    out = table.select(exprs + extra)
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


def _ragged_line(path: Path, separator: str) -> str | None:
    """``line N has K fields, the header has H`` for the first row whose field count differs."""
    import csv

    reader = None
    try:
        with open(path, newline="", encoding="utf-8", errors="replace") as f:
            reader = csv.reader(f, delimiter=separator, strict=True)
            header = next(reader, None)
            if header is None:
                return None
            for row in reader:
                if row and len(row) != len(header):
                    return f"line {reader.line_num} has {len(row)} fields, the header has {len(header)}"
    except csv.Error as err:
        return f"line {reader.line_num if reader else '?'}: {err}"
    except OSError:
        return None
    return None


def read_csv_checked(
    path: Path,
    *,
    required: list[str],
    dataset: str,
    separator: str = ",",
    schema_overrides: dict[str, pl.DataType] | None = None,
    transform: Callable[[pl.DataFrame], pl.DataFrame] | None = None,
    allowed: list[str] | None = None,
    min_rows: int = 1,
) -> pl.DataFrame:
    """Read a publisher's CSV as strings, failing with the file and column named.

    ``required`` columns must be present, once each (a duplicated header
    would make the column ambiguous). ``allowed``, for files whose layout is
    fixed, lists every column the file may have: another one means the file
    is not what the adapter expects. A row with more or fewer fields than the
    header is reported with its line number. A file with fewer than
    ``min_rows`` data rows (a header alone) is refused, naming the file.
    """
    if not path.is_file():
        raise DataError(f"file not found (dataset {dataset!r})", where=path)
    if path.stat().st_size == 0:
        raise DataError(f"file is empty (0 bytes); expected a CSV with columns {required}", where=path)
    try:
        df = pl.read_csv(
            path,
            separator=separator,
            infer_schema=False,
            schema_overrides=schema_overrides,
            truncate_ragged_lines=False,
            glob=False,  # the file named, never a pattern: '[' or '*' in a file name is part of the name
        )
    except Exception as err:  # polars raises several error types for malformed CSV
        ragged = _ragged_line(path, separator)
        detail = ragged or str(err).splitlines()[0]
        raise DataError(f"not a readable CSV: {detail}", where=path) from err
    duplicated = [c for c in df.columns if re.search(r"_duplicated_\d+$", c)]
    for col in duplicated:
        base = re.sub(r"_duplicated_\d+$", "", col)
        if base in required:
            raise DataError(f"column {base!r} appears more than once in the header; expected it once",
                            where=path, field=base)
    absent = [c for c in required if c not in df.columns]
    if absent:
        found = ", ".join(repr(c) for c in df.columns[:8]) + (", ..." if len(df.columns) > 8 else "")
        raise DataError(
            f"column {absent[0]!r} is missing; expected columns {required}; the file has {found}",
            where=path, field=absent[0]
        )
    if allowed is not None:
        unexpected = [c for c in df.columns if c not in allowed]
        if unexpected:
            raise DataError(f"unexpected column {unexpected[0]!r}; expected only {allowed}", where=path,
                            field=unexpected[0])
    if df.height < min_rows:
        raise DataError(f"{df.height} data rows under the header; expected at least {min_rows}", where=path)
    return transform(df) if transform else df
