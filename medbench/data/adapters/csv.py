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
        patient_pattern: '^(P\\d+)_'   # optional: the patient is this part of the column (named group
                                       # 'patient', else the first group); e.g. COVID-00040a -> COVID-00040
        split_column: fold             # optional: the publisher's split; map names with split_values
        split_values: {training: train, validation: val, testing: test}
        label_column: diagnosis
        classes: {mel: [melanoma, MEL], nv: [nevus]}   # task label -> raw values (default: the label itself)
        missing_values: ["?", "n/a"]   # raw values read as a missing label (blank cells always are)
        sex_column: gender             # M/F/male/female/...; anything else is missing
        age_column: age                # 35, "35Y", "35 years", ...
        view_column: projection
        site_column: hospital          # or site: "Hospital A" for every row

Every other column of the CSV is kept under its own name, so a task may use it as a
subgroup attribute (``attributes: [scanner]``); ``attribute_columns`` only asserts
that the named columns exist. A column named like a canonical column (``path``,
``sex``, ``age``, ``view``, ``site``, ``split``, ...) is not kept under that name:
name it with the option above instead.

Labels from one column per label (multi-label, or a 0/1 column of a binary task)::

        label_columns: {Edema: edema_col, Effusion: effusion_col}
        value_map: {"1": 1, "1.0": 1, "0": 0, "0.0": 0, "-1": null, "": null}

Every label value is declared, never guessed: a value that maps to nothing is an
error naming the file, the column, the values seen and the option that maps them
(``unmatched: drop`` leaves such rows out instead). With ``label_column``, a
multiclass task one-hot encodes the class (``classes`` maps raw values to task
labels); a binary task is 1 for its label's values (``classes: {LABEL: [...]}``,
default the label itself) and 0 for ``negative_values``, which must then be
given: a ``label_column: abnormal`` over a 0/1 column would otherwise read every
row as negative (write ``label_columns: {abnormal: abnormal}`` for a 0/1 column).
Blank cells and ``missing_values`` are missing labels.

``csv`` and ``path_root`` are resolved with :func:`~medbench.data.base.data_path`:
they must stay inside the dataset folder (no absolute path elsewhere, no ``..``
climbing out) unless the user passes ``--allow-outside-data-root``; the image
paths the CSV yields are held to the same rule.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal, Optional

import polars as pl
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from medbench.data.adapters._common import (
    class_labels,
    normalize_sex,
    parse_age,
    parse_options,
    require_root,
)
from medbench.data.base import CANONICAL_SCHEMA, LABEL_PREFIX, DatasetIndex, data_path, label_column, read_csv_checked
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
    patient_pattern: str | None = None
    split_column: str | None = None
    split_values: dict[str, Literal["train", "val", "test", "drop"]] = Field(default_factory=dict)
    label_column: str | None = None
    classes: dict[str, list[str]] = Field(default_factory=dict)
    negative_values: list[str] | None = None
    missing_values: list[str] = Field(default_factory=list)
    label_columns: dict[str, str] | None = None
    value_map: dict[str, Optional[int]] = Field(default_factory=lambda: dict(DEFAULT_VALUE_MAP))
    unmatched: Literal["error", "drop"] = "error"
    sex_column: str | None = None
    age_column: str | None = None
    view_column: str | None = None
    site_column: str | None = None
    site: str | None = None
    attribute_columns: list[str] = Field(default_factory=list)

    @field_validator("patient_pattern")
    @classmethod
    def _regex(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                re.compile(v)
            except re.error as err:
                raise ValueError(f"not a regular expression ({err})") from None
        return v

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
            label_df, keep = _class_column(df[opts.label_column], opts, labels, task_type, csv_path)
        else:
            assert opts.label_columns is not None
            lookup = {str(k).strip(): v for k, v in opts.value_map.items()}
            lookup.update({str(m).strip(): None for m in opts.missing_values})
            cols = {}
            keep = pl.Series([True] * df.height)
            for lab in labels:
                col = opts.label_columns[lab]
                raw = df[col].fill_null("")
                unknown = ~raw.is_in(list(lookup))
                if unknown.any():
                    if opts.unmatched == "error":
                        bad = sorted(set(raw.filter(unknown).to_list()))
                        raise DataError(f"values {_few(bad)} of label {lab!r} are not in value_map {sorted(lookup)}; "
                                        "map each in dataset.options.value_map (1 positive, 0 negative, null "
                                        "missing) or list it in missing_values", where=csv_path, field=col)
                    keep = keep & ~unknown
                cols[label_column(lab)] = raw.replace_strict(lookup, default=None, return_dtype=pl.Int8)
            label_df = pl.DataFrame(cols)

        paths = pl.lit(image_base) + pl.col(opts.path_column) + pl.lit(opts.path_suffix)
        table = df.select(sample_id=paths, path=paths,
                          patient_id=pl.col(opts.patient_column) if opts.patient_column else paths)
        if opts.patient_pattern:
            source = opts.patient_column or opts.path_column
            table = table.with_columns(patient_id=_patients_from_pattern(df[source], opts.patient_pattern, csv_path,
                                                                         source))
        if opts.split_column:
            split = df[opts.split_column]
            split = pl.Series(opts.split_column, [None if v is None or v == "" else v for v in split.to_list()],
                              dtype=pl.Utf8)  # a blank cell: no official split (left out and counted)
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
        for c in df.columns:  # every other column, for subgroup attributes (attribute_columns are among them)
            if c not in extra and c not in table.columns and c not in CANONICAL_SCHEMA \
                    and not c.startswith(LABEL_PREFIX):
                extra[c] = df[c]
        table = pl.concat([table.with_columns(**extra) if extra else table, label_df], how="horizontal").filter(keep)
        blank = table.filter(pl.col("patient_id").is_null() | (pl.col("patient_id") == ""))
        if blank.height:
            raise DataError(f"{blank.height} rows have no patient", where=csv_path, field=opts.patient_column)
        return DatasetIndex(name=f"csv-{csv_path.stem}", table=table, label_names=list(labels), root=root,
                            source_files=[csv_path], notes={"rows_left_out": int((~keep).sum())})


def _few(values: list, n: int = 5) -> str:
    """``['a', 'b', ...]``: the first ``n`` values seen, with how many more."""
    shown = ", ".join(repr(v) for v in values[:n])
    return f"[{shown}{f', ... ({len(values) - n} more)' if len(values) > n else ''}]"


_ZERO_ONE = {"0", "1", "0.0", "1.0"}


def _class_column(values: pl.Series, opts: Options, labels: list[str], task_type: str, csv_path: Path
                  ) -> tuple[pl.DataFrame, pl.Series]:
    """Label columns from one class column, every raw value declared (see the module docstring)."""
    raw = values.fill_null("")
    missing = {str(m).strip() for m in opts.missing_values} | {""}
    seen = sorted(set(raw.to_list()) - missing)
    col = opts.label_column
    if task_type == "binary":
        (lab,) = labels
        positive = {str(v).strip() for v in opts.classes.get(lab, [lab])}
        negative = {str(v).strip() for v in opts.negative_values or []}
        undeclared = [v for v in seen if v not in positive | negative]
        if undeclared and opts.unmatched == "error":
            if set(seen) <= _ZERO_ONE and lab not in seen:
                hint = (f"a 0/1 column is read with label_columns: {{{lab}: {col}}} instead of label_column "
                        "(1 positive, 0 negative)")
            elif opts.negative_values is None:
                hint = (f"declare the negatives with dataset.options.negative_values (positives: classes: "
                        f"{{{lab}: [...]}}, now {sorted(positive)}; missing: missing_values)")
            else:
                hint = (f"add them to dataset.options.negative_values, classes: {{{lab}: [...]}} (positive) or "
                        "missing_values, or set unmatched: drop")
            raise DataError(f"values {_few(undeclared)} are not declared for the binary label {lab!r} "
                            f"(values seen: {_few(seen)}); {hint}", where=csv_path, field=col)
        negatives = sorted(negative) if opts.negative_values is not None else []
    else:
        declared = {str(v).strip() for lab in labels for v in opts.classes.get(lab, [lab])}
        undeclared = [v for v in seen if v not in declared]
        if undeclared and opts.unmatched == "error":
            raise DataError(f"{int(raw.is_in(undeclared).sum())} rows have values {_few(undeclared)} that are none "
                            f"of the task's labels {labels}; map them with dataset.options.classes (task label -> raw "
                            "values), read them as missing with missing_values, or leave the rows out with "
                            "unmatched: drop", where=csv_path, field=col)
        negatives = None
    cleaned = pl.Series(col, [None if v in missing else v for v in raw.to_list()], dtype=pl.Utf8)
    label_df, _ = class_labels(cleaned, labels, task_type, aliases=opts.classes or None, negatives=negatives,
                               unmatched="drop", where=csv_path, field=col)
    keep = ~raw.is_in(undeclared) if undeclared else pl.Series([True] * raw.len())
    return label_df, keep


def _patients_from_pattern(values: pl.Series, pattern: str, csv_path: Path, column: str) -> pl.Series:
    """The patient id as the part of each value ``pattern`` matches (group ``patient``, else the first group,
    else the whole match); a value it does not match is an error naming the column and examples."""
    rx = re.compile(pattern)
    group: int | str = "patient" if "patient" in rx.groupindex else (1 if rx.groups else 0)
    out: list[str | None] = []
    unmatched: list[str] = []
    for v in values.to_list():
        m = rx.search(v) if v else None
        if m is None or not m.group(group):
            unmatched.append(v)
            out.append(None)
        else:
            out.append(m.group(group))
    if unmatched:
        raise DataError(f"patient_pattern '{pattern}' does not match {len(unmatched)} values (e.g. "
                        f"{_few(sorted(set(map(str, unmatched))), 3)}); fix dataset.options.patient_pattern (a "
                        "regular expression; the patient is its group 'patient', else its first group)",
                        where=csv_path, field=column)
    return pl.Series("patient_id", out, dtype=pl.Utf8)


ADAPTER = CsvAdapter()
