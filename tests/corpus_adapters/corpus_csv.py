"""A minimal CSV + image-folder adapter used only by the malformed-input tests.

It is built the way every shipped adapter is: options validated by a pydantic
model through ``parse_options`` (errors name ``dataset.options.<field>``), the
dataset folder checked with ``require_root``, path options resolved with
``data_path`` (kept inside the dataset folder unless the user allows otherwise),
the label file read with ``read_csv_checked``, and a ``DatasetIndex`` whose
checks (label values, sample ids, image paths) do the rest. The tests append
this folder to ``medbench.data.adapters.__path__`` so ``adapter: corpus-csv``
resolves in-process; it is not shipped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl
from pydantic import BaseModel, ConfigDict

from medbench.data.adapters._common import parse_options, require_root
from medbench.data.base import DatasetIndex, data_path, label_column, read_csv_checked


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")

    csv: str = "labels.csv"
    images: str = "images"


class CorpusCsvAdapter:
    name = "corpus-csv"
    description = "file,patient,label[,age] CSV beside an image folder (tests only)"
    how_to_get = "the test writes it"

    def load(self, root: Path | None, options: dict[str, Any], labels: list[str], task_type: str) -> DatasetIndex:
        opts = parse_options(Options, options, self.name)
        root = require_root(root, self.name)
        csv = data_path(root, opts.csv, field="dataset.options.csv")
        images = data_path(root, opts.images, field="dataset.options.images")
        df = read_csv_checked(csv, required=["file", "patient", "label"], dataset="corpus")
        rel = images.relative_to(root) if images.is_relative_to(root) else images
        table = df.select(
            pl.col("file").alias("sample_id"),
            pl.col("patient").alias("patient_id"),
            (pl.lit(f"{rel.as_posix()}/") + pl.col("file")).alias("path"),
            pl.col("label").alias(label_column(labels[0])),
            *([pl.col("age")] if "age" in df.columns else []),
        ).with_columns(pl.col("patient_id").replace("", None))
        return DatasetIndex(name="corpus", table=table, label_names=list(labels), root=root, source_files=[csv])


ADAPTER = CorpusCsvAdapter()
