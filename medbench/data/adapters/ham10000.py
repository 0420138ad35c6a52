"""HAM10000 (Tschandl et al. 2018, Sci Data 5:180161; Harvard Dataverse doi:10.7910/DVN/DBW86T).

Layout as released::

    ham10000/HAM10000_metadata.csv          # Kaggle copy; Dataverse serves HAM10000_metadata.tab
    ham10000/HAM10000_images_part_1/ISIC_0024306.jpg ...
    ham10000/HAM10000_images_part_2/ISIC_0029306.jpg ...

``HAM10000_metadata``: ``lesion_id,image_id,dx,dx_type,age,sex,localization`` (later
Dataverse versions add ``dataset``, the source collection, used as ``site``). ``dx``
is one of ``akiec, bcc, bkl, df, mel, nv, vasc``. Blank ages and ``unknown``
sex/localization occur and are read as missing. Several images show the same
lesion, so ``lesion_id`` is the group that stays on one side of a split. The image
folders may be lower-case (Kaggle) or merged into one folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl
from pydantic import BaseModel, ConfigDict

from medbench.data.adapters._common import (
    check_task_labels,
    class_labels,
    find_file,
    index_files,
    normalize_sex,
    parse_age,
    parse_options,
    relative,
    require_root,
    subdirs_ci,
)
from medbench.data.base import DatasetIndex, data_path, read_csv_checked
from medbench.errors import DataError

DX = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
COLUMNS = ["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization"]
METADATA_NAMES = ["HAM10000_metadata.csv", "HAM10000_metadata.tab", "HAM10000_metadata"]
IMAGE_DIRS = ["HAM10000_images_part_1", "HAM10000_images_part_2", "HAM10000_images", "images"]
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")

    #: metadata file inside the dataset folder (relative to it); null: HAM10000_metadata{.csv,.tab,}
    metadata: str | None = None


def separator_of(path: Path) -> str:
    if path.suffix.lower() == ".tab":
        return "\t"
    with open(path, "rb") as f:
        head = f.readline().decode("utf-8-sig", errors="replace")
    return "\t" if head.count("\t") > head.count(",") else ","


def image_index(root: Path, folders: list[str]) -> dict[str, Path]:
    dirs = subdirs_ci(root, folders)
    index = index_files(dirs, IMAGE_SUFFIXES)
    if not index:  # images unpacked straight into the dataset folder
        index = {p.stem: p for p in sorted(root.iterdir()) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES}
    return index


def default_image_dir(root: Path, folders: list[str]) -> str:
    dirs = subdirs_ci(root, folders)
    return dirs[0].name if dirs else folders[0]


class Ham10000Adapter:
    name = "ham10000"
    description = "HAM10000 dermoscopy: HAM10000_metadata.csv + HAM10000_images_part_{1,2}/, split by lesion_id"
    how_to_get = ("https://doi.org/10.7910/DVN/DBW86T (Harvard Dataverse, CC BY-NC-SA 4.0) or Kaggle "
                  "kmader/skin-cancer-mnist-ham10000; expected layout: ham10000/HAM10000_metadata.csv "
                  "(lesion_id,image_id,dx,dx_type,age,sex,localization), ham10000/HAM10000_images_part_1/*.jpg, "
                  "ham10000/HAM10000_images_part_2/*.jpg")

    def load(self, root: Path | None, options: dict[str, Any], labels: list[str], task_type: str) -> DatasetIndex:
        opts = parse_options(Options, options, self.name)
        root = require_root(root, self.name)
        if opts.metadata:
            meta_path = data_path(root, opts.metadata, field="dataset.options.metadata")
            if not meta_path.is_file():
                raise DataError("metadata file not found", where=meta_path, field="dataset.options.metadata")
        else:
            meta_path = find_file(root, METADATA_NAMES, max_depth=1)
            if meta_path is None:
                raise DataError(f"HAM10000_metadata.csv not found; {self.how_to_get}", where=root,
                                field="dataset.name")
        if task_type not in ("multiclass", "binary"):
            raise DataError("HAM10000 tasks are multiclass (dx) or binary (one dx vs the rest)",
                            where="ham10000 adapter", field="type")
        check_task_labels(labels, task_type, DX, adapter=self.name, what="dx classes")
        df = read_csv_checked(meta_path, required=COLUMNS, dataset=self.name, separator=separator_of(meta_path))
        df = df.with_columns(pl.col(c).str.strip_chars().str.strip_chars('"') for c in df.columns)
        unknown = sorted(set(df["dx"].drop_nulls().to_list()) - set(DX) - {""})
        if unknown:
            raise DataError(f"unknown dx values {unknown[:5]}; expected one of {DX}", where=meta_path, field="dx")
        # a task over some of the classes leaves the other classes' images out
        label_df, keep = class_labels(df["dx"], labels, task_type, unmatched="drop", where=meta_path, field="dx")
        index = image_index(root, IMAGE_DIRS)
        fallback = default_image_dir(root, IMAGE_DIRS)
        paths = relative([index.get(i) for i in df["image_id"].to_list()], root)
        paths = [p if p is not None else f"{fallback}/{i}.jpg" for p, i in zip(paths, df["image_id"].to_list())]
        site = df["dataset"] if "dataset" in df.columns else pl.Series(["HAM10000"] * df.height)
        table = pl.concat([
            pl.DataFrame({
                "sample_id": df["image_id"],
                "patient_id": df["lesion_id"],
                "path": paths,
                "sex": [normalize_sex(v) for v in df["sex"].to_list()],
                "age": pl.Series([parse_age(v) for v in df["age"].to_list()], dtype=pl.Float64),
                "view": ["dermoscopy"] * df.height,
                "site": site,
                "dx": df["dx"],
                "dx_type": df["dx_type"],
                "localization": df["localization"].replace({"unknown": None, "": None}),
            }),
            label_df,
        ], how="horizontal").filter(keep)
        return DatasetIndex(name="ham10000", table=table, label_names=list(labels), root=root,
                            source_files=[meta_path],
                            notes={"rows_with_other_dx": int((~keep).sum()),
                                   "images_found": sum(p is not None for p in index.values())})


ADAPTER = Ham10000Adapter()
