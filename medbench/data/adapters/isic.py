"""ISIC challenge training sets, 2019 and 2020 (challenge.isic-archive.com/data).

``edition: 2019`` (ISIC 2019, CC BY-NC)::

    isic/ISIC_2019_Training_GroundTruth.csv   # image,MEL,NV,BCC,AK,BKL,DF,VASC,SCC,UNK (one-hot, "1.0"/"0.0")
    isic/ISIC_2019_Training_Metadata.csv      # image,age_approx,anatom_site_general,lesion_id,sex
    isic/ISIC_2019_Training_Input/<image>.jpg

Several images may show one lesion: the group is ``lesion_id`` where the metadata
gives one, else the image itself. A multiclass task over some of the classes
leaves out images of the other classes (counted); a binary task reads one class
against all others.

``edition: 2020`` (SIIM-ISIC 2020, CC BY-NC)::

    isic/train.csv                            # Kaggle; ISIC ships ISIC_2020_Training_GroundTruth[_v2].csv
        image_name,patient_id,[lesion_id,]sex,age_approx,anatom_site_general_challenge,diagnosis,
        benign_malignant,target
    isic/jpeg/train/<image_name>.jpg          # or train/<image_name>.dcm, ISIC_2020_Training_JPEG/train/

The label ``melanoma`` is ``target`` (1 = melanoma); the group is ``patient_id``.
Blank sex/age are missing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import polars as pl
from pydantic import BaseModel, ConfigDict

from medbench.data.adapters._common import (
    check_task_labels,
    find_file,
    index_files,
    normalize_sex,
    parse_age,
    parse_options,
    relative,
    require_root,
)
from medbench.data.base import DatasetIndex, label_column, read_csv_checked
from medbench.errors import DataError

CLASSES_2019 = ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK"]
GT_2019 = "ISIC_2019_Training_GroundTruth.csv"
META_2019 = "ISIC_2019_Training_Metadata.csv"
IMAGES_2019 = ["ISIC_2019_Training_Input"]
CSV_2020 = ["train.csv", "ISIC_2020_Training_GroundTruth_v2.csv", "ISIC_2020_Training_GroundTruth.csv"]
COLUMNS_2020 = ["image_name", "patient_id", "sex", "age_approx", "anatom_site_general_challenge", "diagnosis",
                "benign_malignant", "target"]
IMAGES_2020 = ["jpeg/train", "ISIC_2020_Training_JPEG/train", "ISIC_2020_Training_JPEG", "train"]
SUFFIXES = (".jpg", ".jpeg", ".png", ".dcm")


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")

    edition: Literal[2019, 2020]


def _one_or_zero(col: str) -> pl.Expr:
    return (pl.col(col).str.strip_chars().cast(pl.Float64, strict=False).round(0).cast(pl.Int8, strict=False)
            .alias(col))


class IsicAdapter:
    name = "isic"
    description = "ISIC 2019 (one-hot ground truth + metadata CSV) or ISIC 2020 (train.csv with patient_id, target)"
    how_to_get = ("https://challenge.isic-archive.com/data/ (CC BY-NC; 2019 also via medbench data download isic); "
                  "expected layout: isic/ISIC_2019_Training_GroundTruth.csv, isic/ISIC_2019_Training_Metadata.csv, "
                  "isic/ISIC_2019_Training_Input/*.jpg (2019) or isic/train.csv + isic/jpeg/train/*.jpg (2020)")

    def load(self, root: Path | None, options: dict[str, Any], labels: list[str], task_type: str) -> DatasetIndex:
        opts = parse_options(Options, options, self.name)
        root = require_root(root, self.name)
        if opts.edition == 2019:
            return self._load_2019(root, labels, task_type)
        return self._load_2020(root, labels, task_type)

    def _load_2019(self, root: Path, labels: list[str], task_type: str) -> DatasetIndex:
        if task_type not in ("multiclass", "binary"):
            raise DataError("ISIC 2019 tasks are multiclass or binary", where="isic adapter", field="type")
        check_task_labels(labels, task_type, CLASSES_2019, adapter=self.name, what="ISIC 2019 classes")
        gt_path = find_file(root, [GT_2019], max_depth=1)
        if gt_path is None:
            raise DataError(f"{GT_2019} not found; {self.how_to_get}", where=root, field="dataset.name")
        gt = read_csv_checked(gt_path, required=["image", *CLASSES_2019[:-1]], dataset=self.name)
        classes = [c for c in CLASSES_2019 if c in gt.columns]
        gt = gt.with_columns(pl.col("image").str.strip_chars(), *[_one_or_zero(c) for c in classes])
        bad = gt.select(pl.sum_horizontal(classes).alias("s"))["s"]
        if (bad != 1).any():
            row = int((bad != 1).arg_true()[0])
            raise DataError(f"image {gt['image'][row]!r} has {bad[row]} classes set; expected exactly one",
                            where=gt_path, field=f"row {row + 2}")
        meta_path = find_file(root, [META_2019], max_depth=1)
        if meta_path is not None:
            meta = read_csv_checked(meta_path, required=["image", "age_approx", "anatom_site_general", "lesion_id",
                                                         "sex"], dataset=self.name)
            meta = meta.with_columns(pl.col("image").str.strip_chars())
            gt = gt.join(meta, on="image", how="left")
        else:
            gt = gt.with_columns(*(pl.lit(None, dtype=pl.Utf8).alias(c)
                                   for c in ("age_approx", "anatom_site_general", "lesion_id", "sex")))
        if task_type == "multiclass":
            keep = gt.select(pl.sum_horizontal(labels).alias("s"))["s"] == 1
        else:
            keep = pl.Series([True] * gt.height)
        lesion = gt["lesion_id"].str.strip_chars()
        group = pl.DataFrame({"l": lesion, "i": gt["image"]}).select(
            pl.when(pl.col("l").is_null() | (pl.col("l") == "")).then(pl.col("i")).otherwise(pl.col("l")))
        index = index_files([root / d for d in IMAGES_2019], SUFFIXES)
        images = gt["image"].to_list()
        paths = [p if p is not None else f"{IMAGES_2019[0]}/{i}.jpg"
                 for p, i in zip(relative([index.get(i) for i in images], root), images)]
        diagnosis = gt.select(pl.coalesce([pl.when(pl.col(c) == 1).then(pl.lit(c)) for c in classes]).alias("d"))["d"]
        table = pl.DataFrame({
            "sample_id": gt["image"],
            "patient_id": group.to_series(),
            "path": paths,
            "sex": [normalize_sex(v) for v in gt["sex"].to_list()],
            "age": pl.Series([parse_age(v) for v in gt["age_approx"].to_list()], dtype=pl.Float64),
            "view": ["dermoscopy"] * gt.height,
            "anatom_site_general": gt["anatom_site_general"],
            "diagnosis": diagnosis,
            **{label_column(lab): gt[lab] for lab in labels},
        }).filter(keep)
        return DatasetIndex(name="isic-2019", table=table, label_names=list(labels), root=root,
                            source_files=[p for p in (gt_path, meta_path) if p is not None],
                            notes={"rows_of_other_classes": int((~keep).sum())})

    def _load_2020(self, root: Path, labels: list[str], task_type: str) -> DatasetIndex:
        if task_type != "binary" or labels != ["melanoma"]:
            raise DataError("ISIC 2020 is binary with the label 'melanoma' (target)", where="isic adapter",
                            field="labels")
        csv_path = find_file(root, CSV_2020, max_depth=1)
        if csv_path is None:
            raise DataError(f"train.csv / ISIC_2020_Training_GroundTruth.csv not found; {self.how_to_get}", where=root,
                            field="dataset.name")
        df = read_csv_checked(csv_path, required=COLUMNS_2020, dataset=self.name)
        df = df.with_columns(pl.col(c).str.strip_chars() for c in COLUMNS_2020)
        target = df["target"].cast(pl.Int8, strict=False)
        if target.null_count() or not set(target.unique().to_list()) <= {0, 1}:
            row = int((target.is_null() | ~target.is_in([0, 1])).arg_true()[0])
            raise DataError(f"target {df['target'][row]!r} is not 0 or 1", where=csv_path, field=f"row {row + 2}")
        index = index_files([root / d for d in IMAGES_2020], SUFFIXES)
        names = df["image_name"].to_list()
        paths = [p if p is not None else f"{IMAGES_2020[0]}/{i}.jpg"
                 for p, i in zip(relative([index.get(i) for i in names], root), names)]
        table = pl.DataFrame({
            "sample_id": df["image_name"],
            "patient_id": df["patient_id"],
            "path": paths,
            "sex": [normalize_sex(v) for v in df["sex"].to_list()],
            "age": pl.Series([parse_age(v) for v in df["age_approx"].to_list()], dtype=pl.Float64),
            "view": ["dermoscopy"] * df.height,
            "anatom_site_general": df["anatom_site_general_challenge"],
            "diagnosis": df["diagnosis"],
            label_column("melanoma"): target,
        })
        return DatasetIndex(name="isic-2020", table=table, label_names=["melanoma"], root=root,
                            source_files=[csv_path])


ADAPTER = IsicAdapter()
