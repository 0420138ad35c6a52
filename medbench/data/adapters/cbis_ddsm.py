"""CBIS-DDSM (Lee et al. 2017, Sci Data 4:170177; TCIA collection CBIS-DDSM).

Layout as TCIA ships it (the NBIA Data Retriever writes the DICOM tree, the four
description CSVs are separate downloads)::

    cbis-ddsm/mass_case_description_train_set.csv
    cbis-ddsm/mass_case_description_test_set.csv
    cbis-ddsm/calc_case_description_train_set.csv
    cbis-ddsm/calc_case_description_test_set.csv
    cbis-ddsm/CBIS-DDSM/Mass-Training_P_00001_LEFT_CC/<study>/<series>/1-1.dcm
    ...

CSV columns: ``patient_id, breast_density`` (calc files spell it ``breast density``),
``left or right breast, image view, abnormality id, abnormality type, mass
shape/calc type, mass margins/calc distribution, assessment, pathology,
subtlety, image file path, cropped image file path, ROI mask file path``.
``pathology`` is ``MALIGNANT``, ``BENIGN`` or ``BENIGN_WITHOUT_CALLBACK``.

One row is one abnormality; a mammogram with several abnormalities has several
rows. medbench reads one sample per mammogram (patient, breast, view), malignant
when any of its abnormalities is. The ``image file path`` names DICOM folders by
UIDs that the NBIA retriever does not reproduce (it writes dated, described folder
names and ``1-1.dcm``); the path is used when it exists, otherwise the DICOM file
is found under the series folder named by its first component. Paths may carry
stray whitespace or newlines, which are stripped. The DICOMs are 16-bit
MONOCHROME2, in the releases seen so far RLE-compressed or uncompressed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import polars as pl
from pydantic import BaseModel, ConfigDict, Field

from medbench.data.adapters._common import (
    drop_train_groups_in_test,
    find_file,
    parse_options,
    require_root,
)
from medbench.data.base import DatasetIndex, label_column, read_csv_checked
from medbench.errors import DataError
from medbench.paths import walk

CSV_FILES = {
    ("mass", "train"): "mass_case_description_train_set.csv",
    ("mass", "test"): "mass_case_description_test_set.csv",
    ("calc", "train"): "calc_case_description_train_set.csv",
    ("calc", "test"): "calc_case_description_test_set.csv",
}
REQUIRED = ["patient_id", "left or right breast", "image view", "abnormality id", "abnormality type", "assessment",
            "pathology", "subtlety", "image file path"]
PATHOLOGY = {"MALIGNANT": 1, "BENIGN": 0, "BENIGN_WITHOUT_CALLBACK": 0}
IMAGE_ROOTS = ("CBIS-DDSM", ".")


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")

    #: which abnormality sets to read
    abnormality: list[Literal["mass", "calc"]] = Field(default_factory=lambda: ["mass", "calc"], min_length=1)
    #: leave out training mammograms of patients that also have test mammograms
    drop_test_patients_from_train: bool = True


def read_description(path: Path, kind: str, split: str) -> pl.DataFrame:
    # one of up to four case files: a header alone is a set with no cases (all four empty is refused below)
    df = read_csv_checked(path, required=REQUIRED, dataset="cbis-ddsm", min_rows=0)
    density = next((c for c in ("breast_density", "breast density") if c in df.columns), None)
    ok = pl.col("pathology").str.strip_chars().is_in(list(PATHOLOGY)).fill_null(False)
    bad = df.with_row_index("row").filter(~ok)
    if bad.height:
        raise DataError(f"pathology {bad['pathology'][0]!r}; expected MALIGNANT, BENIGN or BENIGN_WITHOUT_CALLBACK",
                        where=path, field=f"row {bad['row'][0] + 2}")
    return df.select(
        patient=pl.col("patient_id").str.strip_chars(),
        side=pl.col("left or right breast").str.strip_chars().str.to_uppercase(),
        view=pl.col("image view").str.strip_chars().str.to_uppercase(),
        density=pl.col(density).str.strip_chars() if density else pl.lit(None, dtype=pl.Utf8),
        assessment=pl.col("assessment").str.strip_chars().cast(pl.Int64, strict=False),
        subtlety=pl.col("subtlety").str.strip_chars().cast(pl.Int64, strict=False),
        malignant=pl.col("pathology").str.strip_chars().replace_strict(PATHOLOGY, return_dtype=pl.Int8),
        image_file=pl.col("image file path").str.strip_chars().str.replace_all(r"\\", "/"),
        kind=pl.lit(kind),
        split=pl.lit(split),
        csv=pl.lit(path.name),
    )


def series_files(root: Path, series: set[str]) -> dict[str, Path]:
    """``{series folder name: DICOM file}`` for the named top-level series folders."""
    out: dict[str, Path] = {}
    for base in IMAGE_ROOTS:
        folder = root / base if base != "." else root
        if not folder.is_dir():
            continue
        for name in sorted(series & {p.name for p in folder.iterdir() if p.is_dir()}):
            if name in out:
                continue
            dcms = []
            for dirpath, dirnames, filenames in walk(folder / name):
                dirnames.sort()
                dcms += [Path(dirpath) / f for f in sorted(filenames) if f.lower().endswith(".dcm")]
            if dcms:
                full = [p for p in dcms if "full mammogram" in str(p).lower()]
                out[name] = (full or dcms)[0]
    return out


class CbisDdsmAdapter:
    name = "cbis-ddsm"
    description = "CBIS-DDSM: mass/calc case description CSVs (pathology) + DICOM mammograms, one sample per image"
    how_to_get = ("https://www.cancerimagingarchive.net/collection/cbis-ddsm/ (TCIA; DICOMs via the NBIA Data "
                  "Retriever); expected layout: cbis-ddsm/{mass,calc}_case_description_{train,test}_set.csv and "
                  "cbis-ddsm/CBIS-DDSM/<Mass|Calc>-<Training|Test>_P_#####_<LEFT|RIGHT>_<CC|MLO>/.../1-1.dcm")

    def load(self, root: Path | None, options: dict[str, Any], labels: list[str], task_type: str) -> DatasetIndex:
        opts = parse_options(Options, options, self.name)
        root = require_root(root, self.name)
        if task_type != "binary":
            raise DataError(f"malignant vs benign is binary, the task says {task_type}", where="cbis-ddsm adapter",
                            field="type")
        parts, sources = [], []
        for kind in opts.abnormality:
            for split in ("train", "test"):
                name = CSV_FILES[(kind, split)]
                path = find_file(root, [name], max_depth=2)
                if path is None:
                    raise DataError(f"{name} not found; {self.how_to_get}", where=root,
                                    field="dataset.options.abnormality")
                parts.append(read_description(path, kind, split))
                sources.append(path)
        rows = pl.concat(parts)
        if rows.height == 0:
            raise DataError(f"0 cases in {', '.join(p.name for p in sources)}; expected at least one row",
                            where=root, field="dataset.options.abnormality")
        rows = rows.with_columns(series=pl.col("image_file").str.split("/").list.first(),
                                 image=pl.col("patient") + "_" + pl.col("side") + "_" + pl.col("view"))
        files = series_files(root, set(rows["series"].to_list()))
        # one sample per mammogram; mass and calc series of one breast view are the same image
        images = (rows.sort(["image", "kind", "series"])  # "calc" < "mass": any stable choice of series
                  .group_by("image", maintain_order=True)
                  .agg(patient=pl.col("patient").first(), side=pl.col("side").first(), view=pl.col("view").first(),
                       # the same mammogram listed in a train and a test file goes to test
                       split=pl.when((pl.col("split") == "test").any()).then(pl.lit("test")).otherwise(pl.lit("train")),
                       series=pl.col("series").first(),
                       image_file=pl.col("image_file").first(), malignant=pl.col("malignant").max(),
                       density=pl.col("density").drop_nulls().first(), assessment=pl.col("assessment").max(),
                       subtlety=pl.col("subtlety").min(),
                       abnormality=pl.col("kind").unique().sort().str.join("+"),
                       n_abnormalities=pl.len()))
        paths = []
        for series, image_file in zip(images["series"].to_list(), images["image_file"].to_list()):
            direct = next((root / b / image_file for b in IMAGE_ROOTS if (root / b / image_file).is_file()), None)
            found = direct or files.get(series)
            paths.append(found.relative_to(root).as_posix() if found is not None
                         else f"CBIS-DDSM/{image_file}")
        table = images.select(
            sample_id=pl.col("image"),
            patient_id=pl.col("patient"),
            path=pl.Series(paths),
            view=pl.col("view"),
            site=pl.lit("DDSM"),
            split=pl.col("split"),
            laterality=pl.col("side").str.slice(0, 1),
            breast_density=pl.col("density"),
            abnormality=pl.col("abnormality"),
            assessment=pl.col("assessment"),
            subtlety=pl.col("subtlety"),
            n_abnormalities=pl.col("n_abnormalities").cast(pl.Int64),
            **{label_column(labels[0]): pl.col("malignant")},
        )
        table, dropped = drop_train_groups_in_test(table) if opts.drop_test_patients_from_train else (table, 0)
        return DatasetIndex(name="cbis-ddsm", table=table, label_names=list(labels), root=root, source_files=sources,
                            notes={"train_rows_dropped_patient_in_test": dropped,
                                   "abnormality_rows": rows.height,
                                   "images_found": sum(1 for p in table["path"] if (root / p).is_file())})


ADAPTER = CbisDdsmAdapter()
