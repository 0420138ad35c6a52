"""Chest X-ray adapters on files generated in the publishers' exact layouts, quirks included.

MIMIC-CXR-JPG has no real sample here: its four CSVs (gzip, as PhysioNet ships
them) and the ``files/pXX/pSUBJECT/sSTUDY/DICOM_ID.jpg`` tree are generated.
NIH's multi-folder release layout (``images_001/images/``) and its 2017 label
file are built around the real 1000-image sample; PadChest's 16-bit PNGs in
numbered ``ImageDir`` folders and CheXpert's label policy use small generated
files.
"""

from __future__ import annotations

import ast
import csv
import gzip
import json
import os
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from conftest import run_cli, shared_data
from PIL import Image

from medbench.data.adapters._chest import CHEXPERT_OBSERVATIONS
from medbench.data.base import get_adapter
from medbench.data.cache import build_cache
from medbench.data.locate import DataLocations
from medbench.data.task_data import load_task_data
from medbench.errors import DataError
from medbench.spec.catalog import Catalog

FIVE = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"]


def write_csv(path: Path, header: list[str], rows: list[list], *, trailing_comma: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", newline="", encoding="utf-8") as f:
        if trailing_comma:  # NIH's 2017 file ends every line with a comma
            f.write(",".join(header) + ",\n")
            for r in rows:
                f.write(",".join(str(v) for v in r) + ",\n")
        else:
            w = csv.writer(f, lineterminator="\n")
            w.writerow(header)
            w.writerows(rows)
    return path


def grey_jpeg(path: Path, seed: int, size: tuple[int, int] = (40, 32)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, size[::-1], dtype=np.uint8)).save(path, quality=90)


# --------------------------------------------------------------------------------------------- MIMIC-CXR-JPG

MIMIC_LABEL_HEADER = ["subject_id", "study_id", *sorted(CHEXPERT_OBSERVATIONS)]  # alphabetical, as released
MIMIC_META_HEADER = ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition",
                     "Rows", "Columns", "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning",
                     "ViewCodeSequence_CodeMeaning", "PatientOrientationCodeSequence_CodeMeaning"]

# subject, study, split, StudyDate, [(ViewPosition, ...)], labels of the five (None: the study has no label row)
MIMIC_STUDIES = [
    (10000032, 50414267, "train", "21800506", ["PA", "LATERAL"], ["", "1.0", "", "-1.0", "1.0"]),
    (10000032, 53189527, "train", "21820626", ["AP"], ["1.0", "0.0", "-1.0", "", "0.0"]),
    (10000764, 57375967, "validate", "21321015", ["AP", "LL"], ["0.0", "", "1.0", "1.0", ""]),
    (10001217, 58913004, "test", "21571104", ["PA", "", "LATERAL"], ["-1.0", "-1.0", "", "0.0", "1.0"]),
    (10002428, 51055900, "train", "21560607", ["AP"], None),  # report without findings: no label row
    (11000183, 52000001, "train", "21200101", ["PA", "AP AXIAL"], ["", "", "", "", ""]),
    (12000001, 59999999, "test", "21900310", ["AP"], ["1.0", "1.0", "1.0", "1.0", "1.0"]),
    (19999987, 55555555, "train", "21450909", ["PA"], ["0.0", "0.0", "0.0", "0.0", "-1.0"]),
]
# MIMIC-IV hosp/patients.csv.gz; subject 12000001 is absent (sex and age unknown)
MIMIC_PATIENTS = [(10000032, "F", 52, 2180, "2014 - 2016", ""), (10000764, "M", 86, 2132, "2014 - 2016", "2133-05-01"),
                  (10001217, "F", 55, 2157, "2011 - 2013", ""), (10002428, "F", 80, 2155, "2011 - 2013", ""),
                  (11000183, "M", 30, 2120, "2008 - 2010", ""), (19999987, "M", 91, 2145, "2008 - 2010", "")]


def dicom_id(study: int, k: int) -> str:
    h = f"{study:08x}{k:08x}" * 3
    return "-".join([h[0:8], h[8:16], h[16:24], h[24:32], h[32:40]])


def make_mimic(root: Path, *, patients: bool = True) -> Path:
    labels, meta, split = [], [], []
    for subject, study, part, date, views, five in MIMIC_STUDIES:
        if five is not None:
            cells = dict.fromkeys(CHEXPERT_OBSERVATIONS, "")
            cells.update(dict(zip(FIVE, five)))
            cells["Support Devices"] = "1.0"
            labels.append([subject, study, *[cells[c] for c in MIMIC_LABEL_HEADER[2:]]])
        for k, view in enumerate(views):
            did = dicom_id(study, k)
            meta.append([did, subject, study, "CHEST (PA AND LAT)", view, 3056, 2544, date, "213014.531",
                         "CHEST (PA AND LAT)", "postero-anterior" if view == "PA" else "", "Erect"])
            split.append([did, study, subject, part])
            grey_jpeg(root / "files" / f"p{str(subject)[:2]}" / f"p{subject}" / f"s{study}" / f"{did}.jpg", study + k)
    write_csv(root / "mimic-cxr-2.0.0-chexpert.csv.gz", MIMIC_LABEL_HEADER, labels)
    write_csv(root / "mimic-cxr-2.0.0-metadata.csv.gz", MIMIC_META_HEADER, meta)
    write_csv(root / "mimic-cxr-2.0.0-split.csv.gz", ["dicom_id", "study_id", "subject_id", "split"], split)
    if patients:
        write_csv(root / "hosp" / "patients.csv.gz",
                  ["subject_id", "gender", "anchor_age", "anchor_year", "anchor_year_group", "dod"],
                  [list(p) for p in MIMIC_PATIENTS])
    return root


def expected_mimic(views: set[str]) -> dict:
    """Independent expectation for the mimic-cxr task: AP/PA images of labelled studies, U-Ignore, blank = 0."""
    people = {p[0]: p for p in MIMIC_PATIENTS}
    out: dict = {"train": {"n": 0, "pos": [0] * 5, "missing": [0] * 5, "sex": {}, "ages": []},
                 "val": {"n": 0, "pos": [0] * 5, "missing": [0] * 5, "sex": {}, "ages": []},
                 "test": {"n": 0, "pos": [0] * 5, "missing": [0] * 5, "sex": {}, "ages": []}}
    for subject, study, part, date, vs, five in MIMIC_STUDIES:
        if five is None:
            continue
        name = {"validate": "val"}.get(part, part)
        for v in vs:
            if v not in views:
                continue
            o = out[name]
            o["n"] += 1
            for k, cell in enumerate(five):
                o["pos"][k] += cell == "1.0"
                o["missing"][k] += cell == "-1.0"
            p = people.get(subject)
            sex = p[1] if p else "unknown"
            o["sex"][sex] = o["sex"].get(sex, 0) + 1
            if p:
                o["ages"].append(p[2] + int(date[:4]) - p[3])
    return out


@pytest.fixture(scope="session")
def mimic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_mimic(tmp_path_factory.mktemp("mimic-cxr-jpg") / "2.0.0")


def test_mimic_official_layout_through_inspect(mimic_root: Path) -> None:
    proc = run_cli("data", "inspect", "mimic-cxr", "--data", f"mimic-cxr={mimic_root}", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    want = expected_mimic({"PA", "AP"})
    for split in ("train", "val", "test"):
        got = out["splits"][split]
        assert got["n"] == want[split]["n"], split
        for k, lab in enumerate(FIVE):
            counts = got["labels"][lab]
            assert counts["pos"] == want[split]["pos"][k], (split, lab)
            assert counts["missing"] == want[split]["missing"][k], (split, lab)  # U-Ignore
            assert counts["pos"] + counts["neg"] + counts["missing"] == got["n"]  # blank counted negative
        sex = {k: v for k, v in got["attributes"]["sex"].items()}
        assert sex == dict(sorted(want[split]["sex"].items())), split
        assert set(got["attributes"]["view"]) <= {"PA", "AP"}
    assert out["missing_files"] == 0 and out["files_checked"] == sum(w["n"] for w in want.values())
    assert out["notes"]["dropped"]["study has no label row"] == 1
    assert out["notes"]["demographics"] == "patients.csv.gz"


def test_mimic_table_details(mimic_root: Path) -> None:
    index = get_adapter("mimic-cxr").load(mimic_root, {"uncertainty": "U-Ones"}, FIVE, "multilabel")
    t = index.table
    # every view kept (blank ViewPosition is null), one study without a label row left out
    assert t.height == sum(len(s[4]) for s in MIMIC_STUDIES if s[5] is not None)
    assert t["view"].null_count() == 1 and "LL" in t["view"].to_list()
    row = t.filter(pl.col("sample_id") == dicom_id(50414267, 0)).to_dicts()[0]
    assert row["path"] == f"files/p10/p10000032/s50414267/{dicom_id(50414267, 0)}.jpg"
    assert row["patient_id"] == "10000032" and row["split"] == "train" and row["sex"] == "F"
    assert row["age"] == 52.0  # anchor_age 52 in anchor_year 2180, study in 2180
    assert row["label:Edema"] == 1  # -1.0 under U-Ones
    later = t.filter(pl.col("sample_id") == dicom_id(53189527, 0)).to_dicts()[0]
    assert later["age"] == 54.0 and later["label:Consolidation"] == 1 and later["label:Edema"] == 0
    unknown = t.filter(pl.col("patient_id") == "12000001").to_dicts()[0]
    assert unknown["sex"] is None and unknown["age"] is None
    assert index.read_image(0).shape == (32, 40)
    zeros = get_adapter("mimic-cxr").load(mimic_root, {"uncertainty": "U-Zeros"}, FIVE, "multilabel").table
    assert zeros.filter(pl.col("sample_id") == dicom_id(50414267, 0))["label:Edema"][0] == 0
    no_demo = get_adapter("mimic-cxr").load(mimic_root, {"patients_csv": None}, FIVE, "multilabel")
    assert no_demo.notes["demographics"] == "patients.csv.gz"  # found in hosp/ by itself


def test_mimic_bad_inputs_name_file_and_field(tmp_path: Path) -> None:
    root = make_mimic(tmp_path / "m", patients=False)
    index = get_adapter("mimic-cxr").load(root, {}, FIVE, "multilabel")
    assert index.table["sex"].null_count() == index.table.height  # no patients.csv: unknown, not an error
    with pytest.raises(DataError, match=r"mimic-cxr adapter: dataset.options.labeler: "):
        get_adapter("mimic-cxr").load(root, {"labeler": "chexbert"}, FIVE, "multilabel")
    (root / "mimic-cxr-2.0.0-split.csv.gz").unlink()
    with pytest.raises(DataError, match=r"expected mimic-cxr-2.0.0-split.csv\[.gz\]"):
        get_adapter("mimic-cxr").load(root, {}, FIVE, "multilabel")
    rows = [[dicom_id(1, 0), 1, 1]]
    write_csv(root / "mimic-cxr-2.0.0-split.csv.gz", ["dicom_id", "study_id", "subject_id"], rows)
    with pytest.raises(DataError) as err:
        get_adapter("mimic-cxr").load(root, {}, FIVE, "multilabel")
    assert str(err.value) == (f"{root / 'mimic-cxr-2.0.0-split.csv.gz'}: split: column 'split' is missing; expected "
                              "columns ['dicom_id', 'study_id', 'subject_id', 'split']; the file has 'dicom_id', "
                              "'study_id', 'subject_id'")


def test_mimic_patients_csv_stays_inside_the_dataset_folder_unless_allowed(tmp_path: Path) -> None:
    """MIMIC-IV lives in its own PhysioNet folder: naming it outside the MIMIC-CXR folder needs the user's switch
    (a link inside the folder is the user's own choice and is followed)."""
    from medbench.data.base import paths_outside_root_allowed

    root = make_mimic(tmp_path / "mimic-cxr", patients=False)
    mimic_iv = make_mimic(tmp_path / "mimic-iv") / "hosp"  # only its patients.csv.gz is used
    for value in (str(mimic_iv / "patients.csv.gz"), "../mimic-iv/hosp/patients.csv.gz"):
        with pytest.raises(DataError) as err:
            get_adapter("mimic-cxr").load(root, {"patients_csv": value}, FIVE, "multilabel")
        assert str(err.value).startswith(f"dataset.options.patients_csv: path {value!r} leaves the dataset folder "
                                         f"{root}; expected a path inside it; pass --allow-outside-data-root")
        assert "\n" not in str(err.value)
        with paths_outside_root_allowed(True):
            index = get_adapter("mimic-cxr").load(root, {"patients_csv": value}, FIVE, "multilabel")
        assert index.notes["demographics"] == "patients.csv.gz" and index.table["sex"].null_count() < index.table.height
    os.symlink(mimic_iv, root / "hosp")
    linked = get_adapter("mimic-cxr").load(root, {"patients_csv": "hosp/patients.csv.gz"}, FIVE, "multilabel")
    assert linked.table["sex"].drop_nulls().len() > 0
    with pytest.raises(DataError, match=r"patients.csv: MIMIC-IV patients file not found \(dataset.options.patients_csv"):
        get_adapter("mimic-cxr").load(root, {"patients_csv": "patients.csv"}, FIVE, "multilabel")


# --------------------------------------------------------------------------------------------- NIH multi-folder

NIH_2017_HEADER = ["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age", "Patient Gender",
                   "View Position", "OriginalImage[Width", "Height]", "OriginalImagePixelSpacing[x", "y]"]


@pytest.fixture(scope="session")
def nih_release(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The release layout (images_001/images/, images_002/images/), 2017 label file, official lists,
    around the first 300 images of the real sample (symlinked, never copied)."""
    sample = shared_data("nih-cxr-1000")
    with open(sample / "Data_Entry_2017_v2020.csv", newline="") as f:
        rows = list(csv.reader(f))[1:301]
    root = tmp_path_factory.mktemp("nih-release")
    out_rows = []
    for i, r in enumerate(rows):
        folder = root / ("images_001" if i < 150 else "images_002") / "images"
        folder.mkdir(parents=True, exist_ok=True)
        os.symlink(sample / "images" / r[0], folder / r[0])
        r = list(r)
        if i % 3 == 0:
            r[4] = f"{int(r[4]):03d}Y"  # the 2017 file's DICOM-style ages
        if i == 7:
            r[4] = "414"  # an impossible age, as in the 2017 file
        out_rows.append(r)
    write_csv(root / "Data_Entry_2017.csv", NIH_2017_HEADER, out_rows, trailing_comma=True)
    test = [r[0] for r in out_rows if int(r[3]) % 4 == 0]
    train = [r[0] for r in out_rows if int(r[3]) % 4 != 0]
    (root / "train_val_list.txt").write_text("\n".join(train) + "\n")
    (root / "test_list.txt").write_text("\n".join(test) + "\n")
    return root


def test_nih_release_layout_and_official_lists(nih_release: Path) -> None:
    proc = run_cli("data", "inspect", "nih", "--data", f"nih={nih_release}", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["n"] == 300 and out["missing_files"] == 0 and out["files_checked"] == 300
    test_names = set((nih_release / "test_list.txt").read_text().split())
    assert out["splits"]["test"]["n"] == len(test_names)
    assert out["splits"]["train"]["n"] + out["splits"]["val"]["n"] == 300 - len(test_names)
    assert out["splits"]["val"]["n"] > 0  # carved from train_val by patient
    assert out["notes"]["label_file"] == "Data_Entry_2017.csv"
    assert sum(p["attributes"]["age_group"].get("unknown", 0) for p in out["splits"].values()) == 1

    data = load_task_data(Catalog().task("nih"), DataLocations(None, {"nih": nih_release}))
    t = data.index.table
    assert set(t.filter(pl.col("split") == "test")["sample_id"]) == test_names
    sides = t.group_by("patient_id").agg(pl.col("split").n_unique())
    assert sides["split"].max() == 1
    assert t["path"].str.starts_with("images_00").all()
    assert t.filter(pl.col("sample_id") == "00000001_000.png")["age"][0] == 57.0  # written 057Y
    assert data.index.read_image(0).shape[:2] == (64, 64)


def test_nih_lists_come_as_a_pair(nih_release: Path, tmp_path: Path) -> None:
    root = tmp_path / "nih"
    root.mkdir()
    os.symlink(nih_release / "Data_Entry_2017.csv", root / "Data_Entry_2017.csv")
    (root / "test_list.txt").write_text("00000001_000.png\n")
    with pytest.raises(DataError, match=r"train_val_list.txt: .*come as a pair"):
        get_adapter("nih").load(root, {}, ["Effusion"], "multilabel")
    index = get_adapter("nih").load(root, {"official_split": False}, ["Effusion"], "multilabel")
    assert index.table["split"].null_count() == index.table.height


# --------------------------------------------------------------------------------------------- PadChest 16-bit

PADCHEST_HEADER = ["", "ImageID", "ImageDir", "StudyDate_DICOM", "StudyID", "PatientID", "PatientBirth",
                   "PatientSex_DICOM", "ViewPosition_DICOM", "Projection", "MethodProjection", "Pediatric",
                   "Modality_DICOM", "Manufacturer_DICOM", "PhotometricInterpretation_DICOM",
                   "PixelRepresentation_DICOM", "PixelAspectRatio_DICOM", "SpatialResolution_DICOM",
                   "BitsStored_DICOM", "WindowCenter_DICOM", "WindowWidth_DICOM", "Rows_DICOM", "Columns_DICOM",
                   "XRayTubeCurrent_DICOM", "Exposure_DICOM", "ExposureInuAs_DICOM", "ExposureTime",
                   "RelativeXRayExposure_DICOM", "ReportID", "Report", "MethodLabel", "Labels", "Localizations",
                   "LabelsLocalizationsBySentence", "labelCUIS", "LocalizationsCUIS"]
PADCHEST_LABELS = [
    "['normal']", "['pleural effusion', ' cardiomegaly']", "['laminar atelectasis', '']", "['', 'pneumonia']",
    "['cardiomegaly', 'unchanged']", "nan", "['']", "['exclude']", "['pulmonary edema', ' pleural effusion']",
    "['consolidation']", "['COPD signs']", "['normal']",
] + [f"['{c}']" for c in ("scoliosis", "cardiomegaly", "aortic elongation", "air trapping", "pleural effusion",
                          "laminar atelectasis", "chronic changes", "nodule", "infiltrates", "pneumonia",
                          "costophrenic angle blunting", "vertebral degenerative changes")]  # every padchest-cl class
PADCHEST_PROJECTIONS = ["PA", "L", "AP_horizontal", "AP", "PA", "PA", "UNK", "PA", "AP_horizontal", "PA", "COSTAL",
                        "PA"]


def make_padchest(root: Path, n_patients: int = 48) -> Path:
    rows = []
    rng = np.random.default_rng(0)
    for i in range(n_patients * 2):
        pid = f"{10**30 + i // 2:d}"
        image = f"{10**37 + i:d}_{i:06x}.png"
        folder = str(i % 3)
        sex = "nan" if i == 5 else ("M" if i % 2 else "F")
        birth = "" if i == 9 else f"{1930 + i % 50}.0"
        labels = PADCHEST_LABELS[i % len(PADCHEST_LABELS)]  # 24 patterns x 12 projections
        projection = PADCHEST_PROJECTIONS[i % len(PADCHEST_PROJECTIONS)]
        rows.append([i, image, folder, f"20{10 + i % 8}0915", f"s{i}", pid, birth, sex, "POSTEROANTERIOR",
                     projection, "Manual review of DICOM fields", "No", "CR", "Philips", "MONOCHROME2", 0, "None",
                     "None", 12, 2092, 2251, 48, 40, 250, 2, 2500, 10, -1.42, 4765777, " report text .", "Physician",
                     labels, "[]", "[]", "[]", "[]"])
        img = (rng.random((48, 40)) * 4095).astype(np.uint16)  # 12-bit values in a 16-bit PNG, as released
        (root / folder).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(root / folder / image)
    write_csv(root / "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv.gz", PADCHEST_HEADER, rows)
    return root


def test_padchest_16bit_pngs_in_imagedir_folders(tmp_path: Path) -> None:
    root = make_padchest(tmp_path / "padchest")
    data = load_task_data(Catalog().task("padchest"), DataLocations(None, {"padchest": root}))
    index = data.index
    t = index.table
    # kept: labelled, not 'exclude', frontal (PA, AP, AP_horizontal)
    n = 96
    labels = [PADCHEST_LABELS[i % len(PADCHEST_LABELS)] for i in range(n)]
    views = [PADCHEST_PROJECTIONS[i % len(PADCHEST_PROJECTIONS)] for i in range(n)]
    kept = [i for i in range(n) if labels[i] not in ("nan", "['']", "['exclude']")
            and views[i] in ("PA", "AP", "AP_horizontal")]
    assert t.height == len(kept)
    assert index.notes["dropped"]["no labels (nan or empty)"] == sum(v in ("nan", "['']") for v in labels)
    atel = t.filter(pl.col("findings") == "laminar atelectasis")
    assert (atel["label:atelectasis"] == 1).all()  # sub-type counted under the harmonized label
    both = t.filter(pl.col("findings") == "pleural effusion|cardiomegaly")  # ' cardiomegaly' stripped
    assert (both["label:cardiomegaly"] == 1).all() and (both["label:pleural effusion"] == 1).all()
    assert set(t["view"].unique()) <= {"PA", "AP", "AP_HORIZONTAL"}
    assert t.filter(pl.col("sample_id").str.ends_with("_000005.png"))["sex"].to_list() in ([], [None])
    raw = index.read_image(0)
    assert raw.dtype == np.uint16 and raw.shape == (48, 40) and raw.max() > 255
    cached = build_cache(index, 32, 3, workers=1, root=tmp_path / "cache")
    # grey radiographs for a 3-channel network are cached with one channel (broadcast on the device)
    assert cached.pixels.shape == (t.height, 1, 32, 32) and cached.pixels.dtype == np.uint8
    assert cached.pixels[0].std() > 10  # 16-bit range scaled, not clipped to black/white
    cl = load_task_data(Catalog().task("padchest-cl"), DataLocations(None, {"padchest": root})).index.table
    classes = Catalog().task("padchest-cl").spec.labels
    terms = [sorted({t.strip() for t in ast.literal_eval(v)} - {""}) if v != "nan" else [] for v in labels]
    single = [terms[i][0] for i in range(n) if views[i] in ("PA", "AP", "AP_horizontal") and len(terms[i]) == 1
              and terms[i][0] in classes]
    assert "laminar atelectasis" in single and "pneumonia" in single  # "['', 'pneumonia']" is one finding
    assert sorted(cl["findings"].to_list()) == sorted(single)
    assert (cl.select(pl.sum_horizontal(pl.col("^label:.*$")).alias("k"))["k"] == 1).all()  # one-hot


def test_padchest_bad_labels_cell_names_file_and_column(tmp_path: Path) -> None:
    root = make_padchest(tmp_path / "padchest", n_patients=12)
    path = root / "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv.gz"
    df = pl.read_csv(path, infer_schema=False)
    df = df.with_columns(pl.when(pl.col("ImageID").str.ends_with("_000002.png")).then(pl.lit("pneumonia, nodule"))
                         .otherwise(pl.col("Labels")).alias("Labels"))
    with gzip.open(path, "wt") as f:
        f.write(df.write_csv())
    with pytest.raises(DataError) as err:
        get_adapter("padchest").load(root, {}, ["pneumonia"], "multilabel")
    assert str(err.value).startswith(f"{path}: Labels: value 'pneumonia, nodule' on line 4;")
    with pytest.raises(DataError, match=r"finding 'pleural efusion' \(did you mean 'pleural effusion'\?\) never"):
        make_padchest(tmp_path / "p2", n_patients=12)
        get_adapter("padchest").load(tmp_path / "p2", {}, ["pleural efusion"], "multilabel")


# --------------------------------------------------------------------------------------------- CheXpert policy

CHEXPERT_HEADER = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_OBSERVATIONS]


def chexpert_row(path: str, fl: str, appa: str, five: list[str], sex: str = "Female", age: str = "68") -> list[str]:
    cells = dict.fromkeys(CHEXPERT_OBSERVATIONS, "")
    cells.update(dict(zip(FIVE, five)))
    return [path, sex, age, fl, appa, *[cells[c] for c in CHEXPERT_OBSERVATIONS]]


def make_chexpert(parent: Path) -> Path:
    release = parent / "CheXpert-v1.0-small"
    p = "CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg"
    write_csv(release / "train.csv", CHEXPERT_HEADER, [
        chexpert_row(p, "Frontal", "AP", ["1.0", "0.0", "-1.0", "", "-1.0"]),
        chexpert_row(p.replace("view1_frontal", "view2_lateral"), "Lateral", "", ["", "", "", "1.0", ""], "Male"),
        chexpert_row("CheXpert-v1.0-small/train/patient00002/study2/view1_frontal.jpg", "Frontal", "PA",
                     ["-1.0", "1.0", "", "0.0", "1.0"], "Unknown", "0"),
    ])
    write_csv(release / "valid.csv", CHEXPERT_HEADER, [
        chexpert_row("CheXpert-v1.0-small/valid/patient64541/study1/view1_frontal.jpg", "Frontal", "AP",
                     ["1.0", "0.0", "0.0", "0.0", "1.0"]),
    ])
    return release


def test_chexpert_uncertainty_policies_and_blank_negatives(tmp_path: Path) -> None:
    make_chexpert(tmp_path)
    adapter = get_adapter("chexpert")
    # the folder above the release is accepted too
    ignore = adapter.load(tmp_path, {"uncertainty": "U-Ignore"}, FIVE, "multilabel").table
    first = ignore.row(0, named=True)
    assert first["patient_id"] == "patient00001" and first["path"] == "train/patient00001/study1/view1_frontal.jpg"
    assert [first[f"label:{lab}"] for lab in FIVE] == [1, 0, None, 0, None]  # -1 missing, blank 0
    ones = adapter.load(tmp_path, {"uncertainty": "U-Ones"}, FIVE, "multilabel").table.row(0, named=True)
    assert [ones[f"label:{lab}"] for lab in FIVE] == [1, 0, 1, 0, 1]
    zeros = adapter.load(tmp_path, {"uncertainty": "U-Zeros"}, FIVE, "multilabel").table.row(0, named=True)
    assert [zeros[f"label:{lab}"] for lab in FIVE] == [1, 0, 0, 0, 0]
    assert ignore["view"].to_list() == ["AP", "LATERAL", "PA", "AP"]
    assert ignore["sex"].to_list() == ["F", "M", None, "F"] and ignore["split"].to_list() == ["train"] * 3 + ["valid"]
    frontal = adapter.load(tmp_path, {"frontal_only": True}, FIVE, "multilabel")
    assert frontal.table.height == 3 and frontal.notes["dropped"] == {"lateral view (frontal_only)": 1}


def test_chexpert_bad_inputs(tmp_path: Path) -> None:
    release = make_chexpert(tmp_path)
    adapter = get_adapter("chexpert")
    with pytest.raises(DataError, match=r"chexpert adapter: dataset.options.uncertainty: Input should be 'U-Ignore'"):
        adapter.load(release, {"uncertainty": "U-Maybe"}, FIVE, "multilabel")
    with pytest.raises(DataError, match=r"chexpert adapter: dataset.options.frontal: unknown option"):
        adapter.load(release, {"frontal": True}, FIVE, "multilabel")
    with pytest.raises(DataError, match=r"chexpert adapter: labels: label 'Effusion' .*is not a chexpert label"):
        adapter.load(release, {}, ["Effusion"], "multilabel")
    write_csv(release / "valid.csv", CHEXPERT_HEADER, [
        chexpert_row("CheXpert-v1.0-small/valid/patient64541/study1/view1_frontal.jpg", "Frontal", "AP",
                     ["2.0", "0.0", "0.0", "0.0", "1.0"])])
    with pytest.raises(DataError) as err:
        adapter.load(release, {}, FIVE, "multilabel")
    assert str(err.value) == (f"{release / 'valid.csv'}: Atelectasis: value '2.0' on line 2; "
                              "expected 1.0, 0.0, -1.0 or blank")
    (release / "valid.csv").unlink()
    with pytest.raises(DataError, match=r"label file not found: expected valid.csv\[.gz\]"):
        adapter.load(release, {}, FIVE, "multilabel")



# --------------------------------------------------------------------------------------------- preprocessing cache

def _chexpert_with_images(parent: Path, patients: int = 12) -> Path:
    release = parent / "CheXpert-v1.0-small"
    rows = []
    for k in range(patients):
        for view, fl, appa in (("view1_frontal", "Frontal", "PA"), ("view2_lateral", "Lateral", "")):
            rel = f"train/patient{k + 1:05d}/study1/{view}.jpg"
            grey_jpeg(release / rel, seed=k * 2 + (fl == "Lateral"))
            rows.append(chexpert_row(f"CheXpert-v1.0-small/{rel}", fl, appa,
                                     ["-1.0", "1.0", "", "0.0", "1.0"] if k % 2 else ["1.0", "-1.0", "0.0", "", ""]))
    write_csv(release / "train.csv", CHEXPERT_HEADER, rows)
    write_csv(release / "valid.csv", CHEXPERT_HEADER, rows[:0])
    return release


def test_cache_is_keyed_on_the_images_not_on_labels_or_splits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another uncertainty policy, label set or split reuses the decoded images; a subset of them (frontal
    only) reads the same entry through a row map; another size decodes again."""
    import re

    import medbench.data.cache as cache
    import medbench.data.image_io as image_io
    from medbench.utils import writer_tag

    release = _chexpert_with_images(tmp_path / "data")
    tasks, store = tmp_path / "tasks", tmp_path / "cache"
    tasks.mkdir()
    for name, options, labels, seed in (("a", "{uncertainty: U-Ignore}", FIVE, 0),
                                        ("b", "{uncertainty: U-Ones}", ["Edema", "Atelectasis"], 1),
                                        ("c", "{frontal_only: true}", FIVE, 0)):
        (tasks / f"{name}.yaml").write_text(
            f"task: {name}\nversion: 1\nfamily: f\ntype: multilabel\nlabels: {json.dumps(labels)}\n"
            f"dataset: {{name: chexpert, adapter: chexpert, options: {options}}}\n"
            f"splits: {{fractions: {{train: 0.5, val: 0.25, test: 0.25}}, seed: {seed}}}\n")
    where = DataLocations(None, {"chexpert": release})
    a, b, c = (load_task_data(Catalog([tasks]).task(t), where).index for t in "abc")
    assert a.fingerprint() != b.fingerprint()  # labels and splits differ: the run key changes ...
    assert a.table["split"].to_list() != b.table["split"].to_list()

    decoded: list[Path] = []
    real_read = image_io.read_image
    monkeypatch.setattr(image_io, "read_image", lambda p, **kw: decoded.append(p) or real_read(p, **kw))
    partials: list[str] = []
    real_allocate = cache._allocate
    monkeypatch.setattr(cache, "_allocate", lambda p, n: partials.append(p.name) or real_allocate(p, n))

    first = cache.build_cache(a, 16, 1, workers=1, root=store)
    assert len(decoded) == a.table.height == 24 and first.bad == []
    key = cache.cache_key(a, 16, 1)
    assert first.path == store / "chexpert" / f"{key}.u8"
    assert re.fullmatch(rf"{key}\.u8\.[0-9a-f]{{32}}\.{re.escape(writer_tag())}\.partial", partials[0])
    again = cache.build_cache(b, 16, 1, workers=1, root=store)  # ... the cached pixels do not
    assert len(decoded) == 24 and again.path == first.path and cache.cache_key(b, 16, 1) == key
    assert np.array_equal(np.asarray(again.pixels), np.asarray(first.pixels))

    frontal = cache.build_cache(c, 16, 1, workers=1, root=store)
    assert len(decoded) == 24 and frontal.path == first.path and isinstance(frontal.pixels, cache.RowMap)
    assert frontal.pixels.shape == (12, 1, 16, 16) and frontal.ok.all()
    row_of = {s: i for i, s in enumerate(a.table["sample_id"].to_list())}
    same = [row_of[s] for s in c.table["sample_id"].to_list()]
    assert np.array_equal(frontal.pixels[np.arange(12)], np.asarray(first.pixels)[same])
    assert np.array_equal(frontal.pixels[5], np.asarray(first.pixels)[same[5]])
    assert np.array_equal(frontal.pixels[np.array([7, 2, 7])], np.asarray(first.pixels)[[same[7], same[2], same[7]]])

    bigger = cache.build_cache(a, 24, 1, workers=1, root=store)
    assert len(decoded) == 48 and bigger.path != first.path and bigger.pixels.shape == (24, 1, 24, 24)
    assert len(list((store / "chexpert").glob("*.u8"))) == 2
    assert not list((store / "chexpert").glob("*.partial"))


def test_cache_key_of_in_memory_pixels_and_partial_files_of_killed_builds(tmp_path: Path) -> None:
    import subprocess
    import sys

    import medbench.data.cache as cache
    from medbench.data.base import DatasetIndex, label_column
    from medbench.utils import writer_tag

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (6, 20, 20)).astype(np.uint8)
    ids = [str(i) for i in range(6)]

    def index(labels: list[int], px: np.ndarray) -> DatasetIndex:
        return DatasetIndex("mem", pl.DataFrame({"sample_id": ids, "patient_id": ids, label_column("y"): labels}),
                            ["y"], pixels=px)

    key = cache.cache_key(index([0, 1] * 3, pixels), 16, 1)
    assert cache.cache_key(index([1, 1, 1, 0, 0, 0], pixels), 16, 1) == key  # labels: same pixels
    assert cache.cache_key(index([0, 1] * 3, pixels[::-1].copy()), 16, 1) != key  # other pixels
    assert cache.cache_key(index([0, 1] * 3, pixels), 16, 3) != key

    folder = tmp_path / "mem"
    folder.mkdir()
    host = writer_tag().split("@")[1]
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    killed = folder / f"{key}.u8.{'0' * 32}.{dead}@{host}.partial"
    elsewhere = folder / f"{key}.u8.{'1' * 32}.{dead}@other-node.partial"  # maybe still building there
    for p in (killed, elsewhere):
        p.write_bytes(b"\0" * 64)
    built = cache.build_cache(index([0, 1] * 3, pixels), 16, 1, root=tmp_path)
    assert built.path == folder / f"{key}.u8" and not killed.exists() and elsewhere.exists()
