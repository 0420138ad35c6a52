"""What can be wrong with a task's data before anything trains, found from the labels alone.

:func:`task_data_problems` lists every problem of a loaded task (a
:class:`~medbench.data.task_data.TaskData`) as a :class:`~medbench.errors.DataError`: one line naming
the task file and the field, what was seen (a few values) and the option that fixes it.
``Runner.preflight`` raises the first (exit 2, before any training); ``medbench data inspect``
prints them all under its summary. The checks:

* **attributes**: every subgroup attribute names a column of the dataset table ("did you mean");
  its test split has at least two known groups (binned as the task bins it), since a gap or a
  worst group of one group means nothing;
* **one-class splits**: in the training and the test split (only test for an evaluation-only task)
  every label has positive and negative images (binary, multilabel) and every class has images
  (multiclass): a label never seen positive cannot be learned, and a label with one class in test
  has no AUC, so the headline (the mean over labels) would silently cover fewer labels. A
  validation split (when there is one) needs both classes (binary), two classes (multiclass) or
  one label with both classes (multilabel): with fewer, temperature scaling, fairness thresholds
  and the convergence curve have nothing to work on; a multilabel label with one class there is
  reported per label by the scores (``temperature_status: one_class``).

Label values that do not match the declared map are the adapter's to refuse while reading (the
``csv`` adapter names the column, the values seen and the option that maps them).
"""

from __future__ import annotations

import polars as pl

from medbench.data.base import LABEL_PREFIX
from medbench.errors import DataError
from medbench.spec import AttributeSpec

SPLIT_ORDER = ("train", "val", "test")
UNKNOWN = "unknown"
OUTSIDE_BINS = "outside bins"
#: table columns that are not attributes (ids, paths, the split)
NOT_ATTRIBUTES = {"sample_id", "patient_id", "path", "split"}
#: where each canonical attribute column of a csv dataset comes from
CSV_OPTION_OF = {"sex": "sex_column", "age": "age_column", "view": "view_column", "site": "site_column"}


def _edge(v: float) -> str:
    return f"{v:g}"


def attribute_counts(table: pl.DataFrame, attr: AttributeSpec) -> dict[str, int]:
    """Rows per value of ``attr``: binned ``[lo, hi)`` when the attribute has bins; nulls are ``unknown``."""
    col = attr.source_column
    if col not in table.columns:
        return {UNKNOWN: table.height} if table.height else {}
    if attr.bins is None:
        values = table[col].cast(pl.Utf8)
    else:
        edges = attr.bins
        x = table[col].cast(pl.Float64, strict=False)
        names = [f"[{_edge(lo)}, {_edge(hi)})" for lo, hi in zip(edges, edges[1:])]
        expr = pl.when(pl.col("x").is_null() | pl.col("x").is_nan()).then(pl.lit(UNKNOWN))
        for lo, hi, name in zip(edges, edges[1:], names):
            expr = expr.when((pl.col("x") >= lo) & (pl.col("x") < hi)).then(pl.lit(name))
        values = pl.DataFrame({"x": x}).select(expr.otherwise(pl.lit(OUTSIDE_BINS)).alias("v"))["v"]
    counts = values.fill_null(UNKNOWN).value_counts()
    return dict(sorted(zip(counts[counts.columns[0]].to_list(), counts["count"].to_list())))


def _few(counts: dict[str, int], n: int = 4) -> str:
    items = sorted(counts.items(), key=lambda kv: -kv[1])
    shown = ", ".join(f"{k!r}: {v}" for k, v in items[:n])
    return "{" + shown + (", ..." if len(items) > n else "") + "}"


def attribute_problems(table: pl.DataFrame, attributes: list[AttributeSpec], *, where: str, adapter: str
                       ) -> list[DataError]:
    """Attributes without a column, or with fewer than two known groups in the test split."""
    from medbench.utils import did_you_mean

    out = []
    columns = [c for c in table.columns if c not in NOT_ATTRIBUTES and not c.startswith(LABEL_PREFIX)]
    test = table.filter(pl.col("split") == "test")
    for i, attr in enumerate(attributes):
        col = attr.source_column
        field = f"attributes[{i}]"
        if col not in table.columns:
            what = f"column {col!r}" + (f" (of attribute {attr.name!r})" if attr.column else "")
            hint = ("; a csv dataset keeps every column of its CSV under its own name" if adapter == "csv" else "")
            out.append(DataError(f"{what} is not in the dataset{did_you_mean(col, columns)}; expected one of: "
                                 f"{', '.join(columns)}{hint}", where=where, field=field))
            continue
        counts = attribute_counts(test, attr)
        known = {k: v for k, v in counts.items() if k not in (UNKNOWN, OUTSIDE_BINS)}
        if len(known) >= 2 or not test.height:
            continue
        seen = _few(counts)
        if not known:
            fix = (f"name its column with dataset.options.{CSV_OPTION_OF[col]}" if adapter == "csv" and
                   col in CSV_OPTION_OF else "check its column") + ", or remove it from attributes"
            msg = f"attribute {attr.name!r} has no known value in the test split (column {col!r}: {seen}); {fix}"
        else:
            fix = "give bins that split it, or remove it from attributes" if attr.bins else \
                "remove it from attributes (or point it at a column with two or more values)"
            msg = (f"attribute {attr.name!r} has one group in the test split (column {col!r}: {seen}); subgroup "
                   f"scores need two or more: {fix}")
        out.append(DataError(msg, where=where, field=field))
    return out


def _split_hint(method: str, splits) -> str:
    if method == "official":
        return ("the publisher's split has none: split it yourself (splits.method: grouped, label-stratified) or "
                "remove the label from labels")
    if not splits.stratify:
        return "splits.stratify: true spreads each label over the splits (or remove the label from labels)"
    return ("too few patients carry it for this split: raise that split's splits.fractions, add images, or "
            "remove the label from labels")


def one_class_problems(table: pl.DataFrame, labels: list[str], task_type: str, splits, *, where: str,
                       method: str = "grouped") -> list[DataError]:
    """Splits where a label has one class (see the module docstring for what each split needs)."""
    out = []
    names = ["test"] if splits.evaluation_only else list(SPLIT_ORDER)
    for split in names:
        part = table.filter(pl.col("split") == split)
        if split == "val" and part.height == 0:
            continue  # no validation split (fractions without val): nothing is scored on it
        if task_type == "multiclass":
            counts = {lab: int((part[LABEL_PREFIX + lab] == 1).sum()) for lab in labels}
            absent = [lab for lab, n in counts.items() if n == 0]
            if split == "val" and len(labels) - len(absent) >= 2:
                continue
            if absent:
                whole = [lab for lab in absent if not (table[LABEL_PREFIX + lab] == 1).any()]
                hint = (f"no image of the dataset has class {whole[0]!r}: check the label mapping of dataset.options "
                        "or remove it from labels" if whole else _split_hint(method, splits))
                out.append(DataError(f"the {split} split ({part.height} images) has no image of class "
                                     f"{', '.join(repr(a) for a in absent)} (images per class: {counts}); {hint}",
                                     where=where, field="labels"))
            continue
        found = []
        for lab in labels:
            col = part[LABEL_PREFIX + lab]
            pos, neg, missing = int((col == 1).sum()), int((col == 0).sum()), int(col.null_count())
            if pos and neg:
                continue
            everywhere = table[LABEL_PREFIX + lab]
            lacking = "positive" if not pos else "negative"
            if not (everywhere == (1 if not pos else 0)).any():
                hint = (f"no image of the dataset is {lacking} for it: check how its values map "
                        "(dataset.options: label_columns/value_map, classes, negative_values) or remove it from labels")
            else:
                hint = _split_hint(method, splits)
            found.append(DataError(f"label {lab!r} has one class in the {split} split ({pos} positive, {neg} "
                                   f"negative, {missing} missing of {part.height} images); {hint}", where=where,
                                   field="labels"))
        if split == "val" and task_type == "multilabel" and len(found) < len(labels):
            continue  # reported per label by the scores; some label still calibrates and draws the curve
        out.extend(found)
    return out


def task_data_problems(data) -> list[DataError]:
    """Every problem of a loaded task's data (a :class:`~medbench.data.task_data.TaskData`), in check order."""
    spec = data.task.spec
    where = str(data.task.path)
    table = data.index.table
    return [*attribute_problems(table, spec.attributes, where=where, adapter=spec.dataset.adapter),
            *one_class_problems(table, list(spec.labels), spec.type, spec.splits, where=where,
                                method=data.split_method)]


def check_task_data(data) -> None:
    """Raise the first of :func:`task_data_problems` (the run's preflight)."""
    problems = task_data_problems(data)
    if problems:
        raise problems[0]
