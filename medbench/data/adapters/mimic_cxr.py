"""MIMIC-CXR-JPG 2.x (Johnson et al. 2019, Beth Israel Deaconess), as PhysioNet ships it.

Layout (``--data mimic-cxr=DIR``; DIR is ``physionet.org/files/mimic-cxr-jpg/2.0.0/``
or ``2.1.0/``; ``.csv`` or ``.csv.gz``)::

    DIR/mimic-cxr-2.0.0-chexpert.csv.gz   subject_id,study_id,<14 observations>  (one row per study)
    DIR/mimic-cxr-2.0.0-negbio.csv.gz     same columns, NegBio labeler (options.labeler: negbio)
    DIR/mimic-cxr-2.0.0-metadata.csv.gz   dicom_id,subject_id,study_id,PerformedProcedureStepDescription,
                                          ViewPosition,Rows,Columns,StudyDate,StudyTime,...
    DIR/mimic-cxr-2.0.0-split.csv.gz      dicom_id,study_id,subject_id,split   (train / validate / test)
    DIR/files/p10/p10000032/s50414267/02aa804e-bde0afdd-112c0b34-7bc16630-4e384014.jpg

Labels are per study (report); every image of a study gets its study's labels,
with the CheXpert policy of :mod:`medbench.data.adapters.chexpert`: blank is a
negative, ``-1.0`` follows ``options.uncertainty`` (U-Ignore: missing). Images
whose study has no label row (reports without findings/impression sections)
are left out and counted in ``notes['dropped']``.

Metadata: ``patient_id`` = ``subject_id``; view = ``ViewPosition`` (upper case;
blank -> null); site ``BIDMC``; split from the split file (tasks rename
``validate`` to ``val``). Sex and age come from MIMIC-IV's ``patients.csv``
(``subject_id,gender,anchor_age,anchor_year,...``) when given: sex = ``gender``;
age at the study = ``anchor_age`` + (study year - ``anchor_year``), the two
databases sharing each patient's date shift. The file is ``options.patients_csv``
(a path inside DIR), else ``patients.csv[.gz]`` or ``hosp/patients.csv[.gz]`` in
DIR. MIMIC-IV is a separate PhysioNet project: link its folder into DIR (``ln -s
/data/mimic-iv/3.1/hosp DIR/hosp``; links inside DIR are followed) or pass
``--allow-outside-data-root`` to name the file where it is.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import polars as pl
from pydantic import BaseModel, ConfigDict

from medbench.data.adapters._chest import (
    CHEXPERT_OBSERVATIONS,
    check_labels_known,
    first_bad_row,
    labeler_column,
    parse_options,
    plausible_age,
    require_root,
    sex_column,
)
from medbench.data.base import DatasetIndex, data_path, label_column, read_csv_checked
from medbench.errors import DataError

META_REQUIRED = ["dicom_id", "subject_id", "study_id", "ViewPosition", "StudyDate"]
SPLIT_REQUIRED = ["dicom_id", "study_id", "subject_id", "split"]
PATIENTS_REQUIRED = ["subject_id", "gender", "anchor_age", "anchor_year"]


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")

    #: what an uncertain (-1) label becomes: missing (U-Ignore), 0 (U-Zeros) or 1 (U-Ones)
    uncertainty: Literal["U-Ignore", "U-Zeros", "U-Ones"] = "U-Ignore"
    #: which label file: the CheXpert labeler's or NegBio's
    labeler: Literal["chexpert", "negbio"] = "chexpert"
    #: ViewPosition values to keep (e.g. [PA, AP]); null: all images, blank views included
    views: list[str] | None = None
    #: MIMIC-IV patients.csv[.gz] inside the dataset folder (relative to it; a symbolic link to your MIMIC-IV
    #: copy is fine); null: look for patients.csv[.gz] or hosp/patients.csv[.gz] in the folder
    patients_csv: str | None = None


def versioned_file(root: Path, kind: str) -> Path:
    """``mimic-cxr-<version>-<kind>.csv[.gz]``, the highest version present."""
    pattern = re.compile(rf"^mimic-cxr-(\d+)\.(\d+)\.(\d+)-{re.escape(kind)}\.csv(\.gz)?$")
    found = [(tuple(int(x) for x in m.groups()[:3]), p) for p in root.iterdir()
             if (m := pattern.match(p.name)) and p.is_file()]
    if not found:
        raise DataError(f"file not found: expected mimic-cxr-2.0.0-{kind}.csv[.gz] (dataset 'mimic-cxr')", where=root)
    return max(found)[1]


def patients_file(root: Path, option: str | None) -> Path | None:
    if option:
        path = data_path(root, option, field="dataset.options.patients_csv")
        if not path.is_file():
            raise DataError("MIMIC-IV patients file not found (dataset.options.patients_csv)", where=path)
        return path
    for rel in ("patients.csv", "patients.csv.gz", "hosp/patients.csv", "hosp/patients.csv.gz"):
        if (root / rel).is_file():
            return root / rel
    return None


def _ids(df: pl.DataFrame, column: str, file: Path) -> pl.Series:
    out = df[column].str.strip_chars().cast(pl.Int64, strict=False)
    bad = out.is_null()
    if bad.any():
        raise DataError(f"value {df[column].filter(bad)[0]!r} on line {first_bad_row(bad)}; expected an integer id",
                        where=file, field=column)
    return out


class MimicCxrAdapter:
    name = "mimic-cxr"
    description = "MIMIC-CXR-JPG 2.x (PhysioNet): per-study CheXpert/NegBio labels, metadata, official split"
    how_to_get = ("credentialed access at https://physionet.org/content/mimic-cxr-jpg/ (PhysioNet); point --data "
                  "mimic-cxr=DIR at the version folder holding mimic-cxr-2.0.0-{chexpert,metadata,split}.csv.gz and "
                  "files/pXX/pSUBJECT/sSTUDY/DICOM_ID.jpg; add MIMIC-IV hosp/patients.csv.gz for sex and age")

    def load(self, root: Path | None, options: dict[str, Any], labels: list[str], task_type: str) -> DatasetIndex:
        opts = parse_options(Options, options, self.name)
        check_labels_known(labels, CHEXPERT_OBSERVATIONS, dataset=self.name)
        if task_type == "multiclass":
            raise DataError("MIMIC-CXR labels are independent findings; use type multilabel or binary",
                            where=f"{self.name} adapter", field="type")
        root = require_root(root, self.name)
        patients_path = patients_file(root, opts.patients_csv)  # first: a bad option fails before any reading
        label_path = versioned_file(root, opts.labeler)
        meta_path = versioned_file(root, "metadata")
        split_path = versioned_file(root, "split")

        lab = read_csv_checked(label_path, required=["subject_id", "study_id", *labels], dataset=self.name)
        studies = pl.DataFrame({"subject_id": _ids(lab, "subject_id", label_path),
                                "study_id": _ids(lab, "study_id", label_path)}).with_columns(
            **{label_column(name): labeler_column(lab, name, opts.uncertainty, file=label_path) for name in labels})
        dup = studies.select("study_id").is_duplicated()
        if dup.any():
            raise DataError(f"study {studies['study_id'].filter(dup)[0]} has more than one label row (line "
                            f"{first_bad_row(dup)})", where=label_path, field="study_id")

        meta = read_csv_checked(meta_path, required=META_REQUIRED, dataset=self.name)
        images = pl.DataFrame({
            "dicom_id": meta["dicom_id"].str.strip_chars(),
            "subject_id": _ids(meta, "subject_id", meta_path),
            "study_id": _ids(meta, "study_id", meta_path),
            "view": meta["ViewPosition"].str.strip_chars().str.to_uppercase().replace("", None),
            "study_year": meta["StudyDate"].str.strip_chars().str.slice(0, 4).cast(pl.Int64, strict=False),
        })
        sp = read_csv_checked(split_path, required=SPLIT_REQUIRED, dataset=self.name)
        splits = pl.DataFrame({"dicom_id": sp["dicom_id"].str.strip_chars(),
                               "split_subject": _ids(sp, "subject_id", split_path),
                               "split": sp["split"].str.strip_chars()})

        dropped: dict[str, int] = {}
        n = images.height
        table = images.join(splits, on="dicom_id", how="inner")
        if n - table.height:
            dropped["image not in the split file"] = n - table.height
        clash = table["subject_id"] != table["split_subject"]
        if clash.any():
            raise DataError(f"image {table['dicom_id'].filter(clash)[0]!r} has another subject_id in the split file",
                            where=split_path, field="subject_id")
        n = table.height
        table = table.join(studies.drop("subject_id"), on="study_id", how="inner")
        if n - table.height:
            dropped["study has no label row"] = n - table.height
        if opts.views is not None:
            n = table.height
            table = table.filter(pl.col("view").is_in([v.upper() for v in opts.views]))
            dropped["view not in options.views"] = n - table.height

        sources = [label_path, meta_path, split_path]
        if patients_path is not None:
            pat = read_csv_checked(patients_path, required=PATIENTS_REQUIRED, dataset=self.name)
            people = pl.DataFrame({
                "subject_id": _ids(pat, "subject_id", patients_path),
                "sex": sex_column(pat["gender"], {"M": "M", "F": "F"}),
                "anchor_age": pat["anchor_age"].cast(pl.Float64, strict=False),
                "anchor_year": pat["anchor_year"].cast(pl.Float64, strict=False),
            }).unique("subject_id", keep="first")
            table = table.join(people, on="subject_id", how="left")
            years = table.select(pl.col("anchor_age") + pl.col("study_year") - pl.col("anchor_year")).to_series()
            table = table.with_columns(age=plausible_age(years)).drop("anchor_age", "anchor_year")
            sources.append(patients_path)

        sid = pl.col("subject_id").cast(pl.Utf8)
        table = table.with_columns(
            sample_id=pl.col("dicom_id"),
            patient_id=sid,
            path=pl.format("files/p{}/p{}/s{}/{}.jpg", sid.str.slice(0, 2), sid, pl.col("study_id"),
                           pl.col("dicom_id")),
            site=pl.lit("BIDMC"),
            study_id=pl.col("study_id").cast(pl.Utf8),
        ).drop("split_subject", "study_year", "subject_id")
        return DatasetIndex(name=self.name, table=table, label_names=list(labels), root=root, source_files=sources,
                            notes={"uncertainty": opts.uncertainty, "blank": "negative", "labeler": opts.labeler,
                                   "demographics": patients_path.name if patients_path else "none (no patients.csv)",
                                   "dropped": dropped})


ADAPTER = MimicCxrAdapter()
