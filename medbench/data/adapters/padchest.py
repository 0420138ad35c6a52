"""PadChest (Bustos et al. 2020, Hospital San Juan, Alicante), as BIMCV ships it.

Layout (``--data padchest=DIR``)::

    DIR/PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv[.gz]
    DIR/<ImageDir>/<ImageID>      16-bit PNGs in the release's numbered folders 0/ ... 54/
      or DIR/images/<ImageID>     (all PNGs in one folder)

Columns used: ``ImageID``, ``ImageDir``, ``PatientID``, ``PatientSex_DICOM``,
``PatientBirth`` (a year, written ``1930.0``), ``StudyDate_DICOM``
(``YYYYMMDD``), ``Projection`` and ``Labels``: a Python-list-like string of
findings, e.g. ``['pleural effusion', ' pneumonia']``. ``Labels`` is parsed
with a strict pattern (never evaluated): each entry is a quoted string; entries
are stripped of the release's stray leading spaces and empty entries (``''``)
are dropped.

Quirks of the release, handled: the literal text ``nan`` in ``Labels`` (103
rows), ``PatientSex_DICOM`` (``nan``; ``O`` is read as unknown) and blank
``PatientBirth``; ``Projection`` ``EXCLUDE``/``UNK`` (view unknown).

Rows left out (counted in ``notes['dropped']``): no label at all (``nan`` or
only empty entries: the report was not labelled), and images labelled
``exclude`` (the annotators marked the report unusable).

Labels (``mode: multilabel``): one column per task label; the label's terms are
its own name or ``label_terms[label]`` (e.g. ``atelectasis`` with its
sub-types); positive when any term is listed, else negative. A label none of
whose terms occurs in the file is an error (a typo would otherwise be an
all-negative label); terms that do not occur are listed in
``notes['absent_terms']``. ``mode: single-label`` (PadChest-cl): images with exactly one distinct
finding, kept when that finding is one of the task's classes (multiclass,
one-hot).

Metadata: patient ``PatientID``; sex ``M``/``F``; age = study year - birth
year; view from ``Projection``: ``PA``, ``AP``, ``AP_HORIZONTAL`` (supine),
``LATERAL`` (``L``), ``COSTAL``; site ``Hospital San Juan``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import polars as pl
from pydantic import BaseModel, ConfigDict, Field

from medbench.data.adapters._chest import (
    first_bad_row,
    parse_options,
    require_root,
    sex_column,
)
from medbench.data.base import DatasetIndex, data_path, label_column, read_csv_checked
from medbench.errors import DataError

LABEL_FILE_GLOB = "PADCHEST_chest_x_ray_images_labels_*.csv*"
REQUIRED = ["ImageID", "ImageDir", "StudyDate_DICOM", "PatientID", "PatientBirth", "PatientSex_DICOM", "Projection",
            "Labels"]
PROJECTIONS = {"PA": "PA", "AP": "AP", "AP_HORIZONTAL": "AP_HORIZONTAL", "L": "LATERAL", "COSTAL": "COSTAL"}
_QUOTED = r"""(?:'[^']*'|"[^"]*")"""
LIST_PATTERN = rf"^\[\s*(?:{_QUOTED}\s*(?:,\s*{_QUOTED}\s*)*)?\]$"
EXCLUDE = "exclude"


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")

    #: ``multilabel`` over the task's labels, or ``single-label`` (PadChest-cl: images with exactly one finding)
    mode: Literal["multilabel", "single-label"] = "multilabel"
    #: canonical views to keep (PA, AP, AP_HORIZONTAL, LATERAL, COSTAL); null: all
    views: list[Literal["PA", "AP", "AP_HORIZONTAL", "LATERAL", "COSTAL"]] | None = None
    #: task label -> PadChest terms counted as that label (default: the label's own name)
    label_terms: dict[str, list[str]] = Field(default_factory=dict)
    #: label file name inside the dataset folder; null: the one PADCHEST_chest_x_ray_images_labels_*.csv[.gz]
    labels_file: str | None = None


def label_file(root: Path, name: str | None) -> Path:
    if name:
        path = data_path(root, name, field="dataset.options.labels_file")
        if not path.is_file():
            raise DataError("label file not found (dataset 'padchest', option labels_file)", where=path)
        return path
    found = sorted(root.glob(LABEL_FILE_GLOB))
    if not found:
        raise DataError("label file not found: expected PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv[.gz] "
                        "(dataset 'padchest')", where=root)
    if len(found) > 1:
        raise DataError(f"{len(found)} label files match {LABEL_FILE_GLOB}; choose one with dataset.options."
                        "labels_file", where=root)
    return found[0]


def parse_label_lists(labels: pl.Series, *, file: Path) -> pl.Series:
    """``Labels`` cells -> lists of stripped, non-empty, distinct findings; null where the cell is empty/``nan``."""
    raw = labels.str.strip_chars()
    empty = raw.is_null() | raw.is_in(["", "nan", "None"])
    malformed = ~empty & ~raw.str.contains(LIST_PATTERN)
    if malformed.any():
        raise DataError(f"value {raw.filter(malformed)[0][:80]!r} on line {first_bad_row(malformed)}; expected a "
                        "list of quoted findings such as ['pneumonia', 'pleural effusion']", where=file, field="Labels")
    items = (raw.str.extract_all(_QUOTED)
             .list.eval(pl.element().str.slice(1, pl.element().str.len_chars() - 2).str.strip_chars())
             .list.eval(pl.element().filter(pl.element() != ""))
             .list.unique(maintain_order=True))
    return pl.select(pl.when(empty).then(None).otherwise(items).alias("terms")).to_series()


def image_paths(root: Path, dirs: pl.Series, ids: pl.Series) -> pl.Series:
    """``<ImageDir>/<ImageID>`` (release layout) unless only a flat ``images/`` folder exists."""
    numbered = any((root / str(d)).is_dir() for d in dirs.unique().drop_nulls().to_list()[:64])
    if not numbered and (root / "images").is_dir():
        return ("images/" + ids).alias("path")
    return (dirs.cast(pl.Utf8) + "/" + ids).alias("path")


class PadChestAdapter:
    name = "padchest"
    description = "PadChest (BIMCV): 160K images, report-derived findings in a list-like Labels column, 16-bit PNG"
    how_to_get = ("request PadChest at https://bimcv.cipf.es/bimcv-projects/padchest/ (BIMCV); point --data "
                  "padchest=DIR at the folder holding PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv[.gz] and "
                  "the unzipped image folders 0/ ... 54/ (<ImageDir>/<ImageID>.png) or one images/ folder")

    def load(self, root: Path | None, options: dict[str, Any], labels: list[str], task_type: str) -> DatasetIndex:
        opts = parse_options(Options, options, self.name)
        single = opts.mode == "single-label"
        if single and task_type != "multiclass":
            raise DataError("mode single-label (PadChest-cl) needs type multiclass", where=f"{self.name} adapter",
                            field="dataset.options.mode")
        if not single and task_type == "multiclass":
            raise DataError("a multiclass PadChest task needs dataset.options.mode: single-label",
                            where=f"{self.name} adapter", field="dataset.options.mode")
        unknown = sorted(set(opts.label_terms) - set(labels))
        if unknown:
            raise DataError(f"label_terms names {unknown[0]!r}, which is not a task label",
                            where=f"{self.name} adapter", field="dataset.options.label_terms")
        root = require_root(root, self.name)
        path = label_file(root, opts.labels_file)
        df = read_csv_checked(path, required=REQUIRED, dataset=self.name)
        terms = parse_label_lists(df["Labels"], file=path)

        projection = df["Projection"].str.strip_chars().str.to_uppercase()
        view = projection.replace_strict(PROJECTIONS, default=None, return_dtype=pl.Utf8)
        study_year = df["StudyDate_DICOM"].str.strip_chars().str.slice(0, 4).cast(pl.Float64, strict=False)
        birth_year = df["PatientBirth"].str.strip_chars().cast(pl.Float64, strict=False)
        age = study_year - birth_year
        table = pl.DataFrame({
            "sample_id": df["ImageID"].str.strip_chars(),
            "patient_id": df["PatientID"].str.strip_chars(),
            "path": image_paths(root, df["ImageDir"].str.strip_chars(), df["ImageID"].str.strip_chars()),
            "sex": sex_column(df["PatientSex_DICOM"], {"M": "M", "F": "F"}),
            "age": pl.select(pl.when((age >= 0) & (age <= 120)).then(age)).to_series(),
            "view": view,
            "site": pl.Series(["Hospital San Juan"] * df.height, dtype=pl.Utf8),
            "terms": terms,
        })

        vocabulary = set(table["terms"].explode().drop_nulls().unique().to_list())
        label_terms = {lab: opts.label_terms.get(lab, [lab]) for lab in labels}
        absent_terms = sorted(t for ts in label_terms.values() for t in ts if t not in vocabulary)
        for lab, ts in label_terms.items():
            if not any(t in vocabulary for t in ts):
                from medbench.utils import did_you_mean

                raise DataError(f"finding {ts[0]!r}{did_you_mean(ts[0], sorted(vocabulary))} never occurs in the "
                                f"Labels column (task label {lab!r})", where=path, field="labels")

        dropped: dict[str, int] = {}

        def keep(mask: pl.Series | pl.Expr, reason: str) -> None:
            nonlocal table
            n = table.height
            table = table.filter(mask)
            if n - table.height:
                dropped[reason] = dropped.get(reason, 0) + n - table.height

        keep(pl.col("terms").is_not_null() & (pl.col("terms").list.len() > 0), "no labels (nan or empty)")
        keep(~pl.col("terms").list.contains(EXCLUDE), "labelled 'exclude'")
        if opts.views is not None:
            keep(pl.col("view").is_in(opts.views), "view not in options.views")
        if single:
            term_to_class = {t: lab for lab, ts in label_terms.items() for t in ts}
            keep(pl.col("terms").list.len() == 1, "not exactly one finding (single-label)")
            keep(pl.col("terms").list.first().is_in(list(term_to_class)), "finding not among the task's classes")
            cls = table["terms"].list.first().replace_strict(term_to_class, return_dtype=pl.Utf8)
            table = table.with_columns(**{label_column(lab): (cls == lab).cast(pl.Int8) for lab in labels})
        else:
            table = table.with_columns(**{
                label_column(lab): pl.col("terms").list.eval(pl.element().is_in(ts)).list.any().cast(pl.Int8)
                for lab, ts in label_terms.items()})
        table = table.with_columns(findings=pl.col("terms").list.join("|")).drop("terms")
        return DatasetIndex(name=self.name, table=table, label_names=list(labels), root=root, source_files=[path],
                            notes={"mode": opts.mode, "label_terms": label_terms, "absent_terms": absent_terms,
                                   "dropped": dropped})


ADAPTER = PadChestAdapter()
