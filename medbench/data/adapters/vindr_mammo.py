"""VinDr-Mammo (Nguyen et al. 2023, Sci Data 10:277; PhysioNet vindr-mammo 1.0.0, credentialed).

Layout as PhysioNet ships it (found up to four folders down, e.g. under ``physionet.org/files/vindr-mammo/1.0.0/``)::

    vindr-mammo/breast-level_annotations.csv
    vindr-mammo/finding_annotations.csv          # not needed here
    vindr-mammo/metadata.csv                     # not needed here
    vindr-mammo/images/<study_id>/<image_id>.dicom

``breast-level_annotations.csv``: ``study_id, series_id, image_id, laterality (L/R),
view_position (CC/MLO), height, width, breast_birads ("BI-RADS 1".."BI-RADS 5"),
breast_density ("DENSITY A".."DENSITY D"), split ("training"/"test")``. One row per
image; the publisher's split is used. The release has no patient identifier: each
study (a four-view exam of one woman) is the group. The DICOMs use several
transfer syntaxes, compressed ones included (JPEG 2000 and others): decoding needs
the pylibjpeg plugins medbench depends on.

Targets: ``birads`` (binary: the task's label is 1 for ``positive_birads``, 0 for
``negative_birads``, other categories left out; multiclass: labels ``BI-RADS 1`` ..
``BI-RADS 5``) or ``density`` (multiclass: ``DENSITY A`` .. ``DENSITY D``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import polars as pl
from pydantic import BaseModel, ConfigDict, Field, model_validator

from medbench.data.adapters._common import (
    check_task_labels,
    class_labels,
    find_file,
    parse_options,
    require_root,
)
from medbench.data.base import DatasetIndex, label_column, read_csv_checked
from medbench.errors import DataError

CSV_NAME = "breast-level_annotations.csv"
REQUIRED = ["study_id", "series_id", "image_id", "laterality", "view_position", "breast_birads", "breast_density",
            "split"]
BIRADS = [f"BI-RADS {k}" for k in range(1, 6)]
DENSITY = [f"DENSITY {c}" for c in "ABCD"]
SPLIT_NAMES = {"training": "train", "train": "train", "test": "test"}


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")

    target: Literal["birads", "density"] = "birads"
    #: binary birads task: categories read as positive / negative (others are left out)
    positive_birads: list[int] = Field(default_factory=lambda: [4, 5])
    negative_birads: list[int] = Field(default_factory=lambda: [1, 2, 3])

    @model_validator(mode="after")
    def _disjoint(self) -> "Options":
        both = set(self.positive_birads) & set(self.negative_birads)
        if both:
            raise ValueError(f"BI-RADS {sorted(both)} cannot be both positive and negative")
        if not set(self.positive_birads) | set(self.negative_birads) <= {1, 2, 3, 4, 5}:
            raise ValueError("BI-RADS categories are 1..5")
        return self


def _normalized(col: str, prefix: str) -> pl.Expr:
    """``"BI-RADS 4"``, ``"BI-RADS4"``, ``"bi-rads 4"`` -> ``"BI-RADS 4"`` (likewise for density)."""
    return (pl.lit(prefix + " ") + pl.col(col).str.strip_chars().str.to_uppercase()
            .str.extract(r"([1-5A-D])\s*$", 1)).alias(col)


class VindrMammoAdapter:
    name = "vindr-mammo"
    description = "VinDr-Mammo: breast-level_annotations.csv (BI-RADS, density, split) + images/<study>/<image>.dicom"
    how_to_get = ("https://physionet.org/content/vindr-mammo/1.0.0/ (PhysioNet credentialed access); expected layout: "
                  "vindr-mammo/breast-level_annotations.csv and vindr-mammo/images/<study_id>/<image_id>.dicom")

    def load(self, root: Path | None, options: dict[str, Any], labels: list[str], task_type: str) -> DatasetIndex:
        opts = parse_options(Options, options, self.name)
        root = require_root(root, self.name)
        csv_path = find_file(root, [CSV_NAME], max_depth=4)
        if csv_path is None:
            raise DataError(f"{CSV_NAME} not found; {self.how_to_get}", where=root, field="dataset.name")
        base = csv_path.parent
        df = read_csv_checked(csv_path, required=REQUIRED, dataset=self.name)
        df = df.with_columns(pl.col(c).str.strip_chars() for c in REQUIRED).with_columns(
            _normalized("breast_birads", "BI-RADS"), _normalized("breast_density", "DENSITY"))
        bad_split = df.with_row_index("row").filter(~pl.col("split").str.to_lowercase().is_in(list(SPLIT_NAMES))
                                                    .fill_null(False))
        if bad_split.height:
            raise DataError(f"split {bad_split['split'][0]!r}; expected training or test", where=csv_path,
                            field=f"row {bad_split['row'][0] + 2}")
        column = "breast_birads" if opts.target == "birads" else "breast_density"
        if task_type == "binary":
            if opts.target != "birads":
                raise DataError("a binary VinDr-Mammo task reads BI-RADS (target: birads)", where="vindr-mammo adapter",
                                field="dataset.options.target")
            alias = {labels[0]: [f"BI-RADS {k}" for k in opts.positive_birads]}
            label_df, keep = class_labels(df[column], labels, "binary", aliases=alias,
                                          negatives=[f"BI-RADS {k}" for k in opts.negative_birads], where=csv_path,
                                          field=column)
            keep = label_df[label_column(labels[0])].is_not_null()
        elif task_type == "multiclass":
            allowed = BIRADS if opts.target == "birads" else DENSITY
            check_task_labels(labels, task_type, allowed, adapter=self.name)
            label_df, keep = class_labels(df[column], labels, task_type, unmatched="drop", where=csv_path, field=column)
        else:
            raise DataError("VinDr-Mammo tasks are binary or multiclass", where="vindr-mammo adapter", field="type")
        prefix = base.relative_to(root).as_posix()
        prefix = "" if prefix == "." else prefix + "/"
        table = pl.concat([
            df.select(
                sample_id=pl.col("image_id"),
                patient_id=pl.col("study_id"),
                path=pl.lit(prefix + "images/") + pl.col("study_id") + "/" + pl.col("image_id") + ".dicom",
                view=pl.col("view_position").str.to_uppercase(),
                site=pl.lit("VinDr"),
                split=pl.col("split").str.to_lowercase().replace_strict(SPLIT_NAMES, return_dtype=pl.Utf8),
                laterality=pl.col("laterality").str.to_uppercase(),
                breast_birads=pl.col("breast_birads"),
                breast_density=pl.col("breast_density"),
            ),
            label_df,
        ], how="horizontal").filter(keep)
        return DatasetIndex(name="vindr-mammo", table=table, label_names=list(labels), root=root,
                            source_files=[csv_path], notes={"rows_left_out": int((~keep).sum())})


ADAPTER = VindrMammoAdapter()
