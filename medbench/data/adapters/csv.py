"""A dataset declared entirely in the task YAML: one CSV (or TSV) of image paths, labels and attributes.

Example (labels from one class column)::

    dataset:
      name: my-derm                    # --data my-derm=/path/to/folder
      adapter: csv
      options:
        csv: labels.csv                # inside the dataset folder (see below)
        path_column: file              # image path per row ...
        path_root: images              # ... relative to <folder>/images
        path_suffix: ".png"            # appended when the column holds ids, not file names
        patient_column: patient        # the group kept on one side of a split (default: one per image)
        split_column: fold             # optional: the publisher's split; map names with split_values
        split_values: {training: train, validation: val, testing: test}
        label_column: diagnosis
        classes: {mel: [melanoma, MEL], nv: [nevus]}   # task label -> raw values (default: the label itself)
        sex_column: gender             # M/F/male/female/...; anything else is missing
        age_column: age                # 35, "35Y", "35 years", ...
        view_column: projection
        site_column: hospital          # or site: "Hospital A" for every row
        attribute_columns: [scanner]   # more columns kept for subgroup metrics

Labels from one column per label (multi-label, one-hot, CheXpert-style)::

        label_columns: {Edema: edema_col, Effusion: effusion_col}
        value_map: {"1": 1, "1.0": 1, "0": 0, "0.0": 0, "-1": null, "": null}

With ``label_column``, a multiclass task one-hot encodes the class; a binary task
is 1 for its label's values and 0 for ``negative_values`` (default: every other
non-blank value). A value that maps to nothing is an error naming the file, the
column and the value (``unmatched: drop`` leaves such rows out instead). Blank
cells are missing labels.

``csv`` and ``path_root`` are resolved with :func:`~medbench.data.base.data_path`:
they must stay inside the dataset folder (no absolute path elsewhere, no ``..``
climbing out) unless the user passes ``--allow-outside-data-root``; the image
paths the CSV yields are held to the same rule.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional

import polars as pl
from pydantic import BaseModel, ConfigDict, Field, model_validator

from medbench.data.adapters._common import (
    class_labels,
    normalize_sex,
    parse_age,
    parse_options,
    require_root,
)
from medbench.data.base import DatasetIndex, data_path, label_column, read_csv_checked
from medbench.errors import DataError

DEFAULT_VALUE_MAP: dict[str, Optional[int]] = {"1": 1, "1.0": 1, "0": 0, "0.0": 0, "": None}


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")

    csv: str = Field(min_length=1)
    separator: str = Field(",", min_length=1, max_length=1)
    path_column: str
    path_root: str = ""
    path_suffix: str = ""
    patient_column: str | None = None
    split_column: str | None = None
    split_values: dict[str, Literal["train", "val", "test", "drop"]] = Field(default_factory=dict)
    label_column: str | None = None
    classes: dict[str, list[str]] = Field(default_factory=dict)
    negative_values: list[str] | None = None
    label_columns: dict[str, str] | None = None
    value_map: dict[str, Optional[int]] = Field(default_factory=lambda: dict(DEFAULT_VALUE_MAP))
    unmatched: Literal["error", "drop"] = "error"
    sex_column: str | None = None
    age_column: str | None = None
    view_column: str | None = None
    site_column: str | None = None
    site: str | None = None
    attribute_columns: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _one_label_source(self) -> "Options":
        if (self.label_column is None) == (self.label_columns is None):
            raise ValueError("give exactly one of label_column (a class column) or label_columns (one per label)")
        if any(v not in (0, 1, None) for v in self.value_map.values()):
            raise ValueError("value_map values must be 1, 0 or null")
        if self.site is not None and self.site_column is not None:
            raise ValueError("give site or site_column, not both")
        return self


class CsvAdapter:
    name = "csv"
    description = "any dataset described by one CSV: path, label, patient, split and attribute columns named in YAML"
    how_to_get = "the folder named by --data NAME=PATH holding the CSV given in dataset.options.csv and its images"

    def load(self, root: Path | None, options: dict[str, Any], labels: list[str], task_type: str) -> DatasetIndex:
        opts = parse_options(Options, options, self.name)
        root = require_root(root, self.name)
        csv_path = data_path(root, opts.csv, field="dataset.options.csv")
        image_base = ""
        if opts.path_root:
            base = data_path(root, opts.path_root, field="dataset.options.path_root")
            image_base = (base.relative_to(root) if base.is_relative_to(root) else base).as_posix().rstrip("/") + "/"
        label_cols = list(opts.label_columns.values()) if opts.label_columns else [opts.label_column]
        if opts.label_columns is not None:
            missing = [lab for lab in labels if lab not in opts.label_columns]
            if missing:
                raise DataError(f"no column given for label {missing[0]!r}", where="csv adapter",
                                field="dataset.options.label_columns")
        named = [opts.path_column, opts.patient_column, opts.split_column, *label_cols, opts.sex_column,
                 opts.age_column, opts.view_column, opts.site_column, *opts.attribute_columns]
        required = list(dict.fromkeys(c for c in named if c))
        df = read_csv_checked(csv_path, required=required, dataset=self.name, separator=opts.separator)
        df = df.with_columns(pl.col(c).str.strip_chars() for c in required)

        if opts.label_column is not None:
            label_df, keep = class_labels(df[opts.label_column], labels, task_type, aliases=opts.classes or None,
                                          negatives=opts.negative_values, unmatched=opts.unmatched, where=csv_path,
                                          field=opts.label_column)
        else:
            assert opts.label_columns is not None
            lookup = {str(k).strip(): v for k, v in opts.value_map.items()}
            cols = {}
            keep = pl.Series([True] * df.height)
            for lab in labels:
                col = opts.label_columns[lab]
                raw = df[col].fill_null("")
                unknown = ~raw.is_in(list(lookup))
                if unknown.any():
                    if opts.unmatched == "error":
                        bad = sorted(set(raw.filter(unknown).to_list()))
                        raise DataError(f"values {bad[:5]} are not in value_map {sorted(lookup)}", where=csv_path,
                                        field=col)
                    keep = keep & ~unknown
                cols[label_column(lab)] = raw.replace_strict(lookup, default=None, return_dtype=pl.Int8)
            label_df = pl.DataFrame(cols)

        paths = pl.lit(image_base) + pl.col(opts.path_column) + pl.lit(opts.path_suffix)
        table = df.select(sample_id=paths, path=paths,
                          patient_id=pl.col(opts.patient_column) if opts.patient_column else paths)
        if opts.split_column:
            split = df[opts.split_column]
            if opts.split_values:
                split = split.replace(opts.split_values)
            table = table.with_columns(split=split)
        extra: dict[str, Any] = {}
        if opts.sex_column:
            extra["sex"] = pl.Series([normalize_sex(v) for v in df[opts.sex_column].to_list()], dtype=pl.Utf8)
        if opts.age_column:
            extra["age"] = pl.Series([parse_age(v) for v in df[opts.age_column].to_list()], dtype=pl.Float64)
        if opts.view_column:
            extra["view"] = df[opts.view_column].str.to_uppercase()
        if opts.site_column:
            extra["site"] = df[opts.site_column]
        elif opts.site is not None:
            extra["site"] = pl.Series([opts.site] * df.height, dtype=pl.Utf8)
        for c in opts.attribute_columns:
            if c not in extra and c not in table.columns:
                extra[c] = df[c]
        table = pl.concat([table.with_columns(**extra) if extra else table, label_df], how="horizontal").filter(keep)
        blank = table.filter(pl.col("patient_id").is_null() | (pl.col("patient_id") == ""))
        if blank.height:
            raise DataError(f"{blank.height} rows have no patient", where=csv_path, field=opts.patient_column)
        return DatasetIndex(name=f"csv-{csv_path.stem}", table=table, label_names=list(labels), root=root,
                            source_files=[csv_path], notes={"rows_left_out": int((~keep).sum())})


ADAPTER = CsvAdapter()
