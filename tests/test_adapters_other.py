"""Dataset adapters on files written in each publisher's exact layout, quirks included.

(The chest X-ray adapters have their own tests; the real HAM10000/MedMNIST/CBIS-DDSM
samples are exercised in test_real_data_other.py.)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
from layouts import (
    CALC_HEADER,
    MASS_HEADER,
    cbis_row,
    dicom,
    grey,
    palette_png,
    png,
    png16,
)

from medbench.data.base import get_adapter, label_column
from medbench.data.cache import build_cache
from medbench.errors import DataError, MedbenchError

# --------------------------------------------------------------------------- tuberculosis

MONTGOMERY_READINGS = {
    # the Montgomery form: "Patient's Sex" / "Patient's Age" lines with DICOM-style ages
    "MCUCXR_0001_0": ("Patient's Sex: M\nPatient's Age: 035Y\nnormal\n", "M", 35.0),
    # UTF-8 byte-order mark, CRLF line ends and a typographic apostrophe
    "MCUCXR_0002_0": ("\ufeffPatient\u2019s Sex: F\r\nPatient\u2019s Age: 027Y\r\nnormal\r\n", "F", 27.0),
    # no space after the colon; an age in months
    "MCUCXR_0003_1": ("Patient's Sex:M\nPatient's Age:006M\nmiliary pattern\n", "M", 0.5),
    # sex "O" (other/unknown) is missing, never guessed
    "MCUCXR_0004_1": ("Patient's Sex: O\nPatient's Age: 061Y\nright upper lobe cavitary lesion\n", None, 61.0),
    # a trailing space after the sex, a child's age, a reading that refers to another file (as released)
    "MCUCXR_0005_0": ("Patient's Sex: F \nPatient's Age: 005Y\nNO REPORT (same pt as MCUCXR_0162_1)\n", "F", 5.0),
    # (constructed) unknown sex: the reading's words are never taken for the Shenzhen first-line form
    "MCUCXR_0006_1": ("Patient's Sex: O\nPatient's Age: 045Y\nman with right pleural effusion\n", None, 45.0),
}
SHENZHEN_READINGS = {
    # the Shenzhen form: a first line "<sex> <age>yrs" with the spelling variants of the release
    "CHNCXR_0001_0": ("male 35yrs\nnormal\n", "M", 35.0),
    "CHNCXR_0002_0": ("Male 45yrs\nnormal\n", "M", 45.0),
    "CHNCXR_0003_1": ("female, 24yrs\nPTB in the right upper field\n", "F", 24.0),
    "CHNCXR_0004_1": ("male 35 yrs\nSTB,ATB\n", "M", 35.0),
    "CHNCXR_0005_1": ("female 8yr\nbilateral PTB\n", "F", 8.0),
    "CHNCXR_0006_0": ("FEMALE 61YRS\n\nnormal\n", "F", 61.0),
    "CHNCXR_0007_1": ("male 52\nleft PTB\n", "M", 52.0),
    "CHNCXR_0008_0": ("normal\n", None, None),  # no demographic line
    # spellings in the released files, as published parsers of the set record them (see tuberculosis.py)
    "CHNCXR_0011_0": ("femal 32yrs\nnormal\n", "F", 32.0),  # typo
    "CHNCXR_0012_1": ("female24yrs\nPTB in the left upper field\n", "F", 24.0),  # no space
    "CHNCXR_0013_1": ("male , 29yrs  \t\nbilateral secondary PTB\n", "M", 29.0),  # comma, tab
    "CHNCXR_0014_0": ("male 16month\nnormal\n", "M", 1.3333),  # an infant, in months
    "CHNCXR_0015_0": ("female 64days\nnormal\n", "F", 0.1752),  # ... in days
    "CHNCXR_0016_1": ("Female, 28yrs\nright PTB\n", "F", 28.0),
}


@pytest.fixture(scope="module")
def tb_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tuberculosis")
    rng = np.random.default_rng(0)
    mont = root / "MontgomerySet"
    for k, (stem, (text, _, _)) in enumerate(MONTGOMERY_READINGS.items()):
        if k % 2:  # Montgomery radiographs are 12-bit: some copies keep them in 16-bit PNGs
            png16(mont / "CXR_png" / f"{stem}.png", rng.integers(0, 4096, (40, 32)))
        else:
            png(mont / "CXR_png" / f"{stem}.png", grey(rng, 32))
        (mont / "ClinicalReadings").mkdir(parents=True, exist_ok=True)
        (mont / "ClinicalReadings" / f"{stem}.txt").write_bytes(text.encode("utf-8"))
        # the lung masks carry the images' names: they must not be read as radiographs
        png(mont / "ManualMask" / "leftMask" / f"{stem}.png", np.zeros((8, 8), np.uint8))
        png(mont / "ManualMask" / "rightMask" / f"{stem}.png", np.zeros((8, 8), np.uint8))
    china = root / "ChinaSet_AllFiles"
    for k, (stem, (text, _, _)) in enumerate(SHENZHEN_READINGS.items()):
        if k == 3:  # a few Shenzhen PNGs are RGB with equal channels, most are palette images
            png(china / "CXR_png" / f"{stem}.png", np.repeat(grey(rng, 32)[..., None], 3, axis=2))
        else:
            palette_png(china / "CXR_png" / f"{stem}.png", grey(rng, 32))
        (china / "ClinicalReadings").mkdir(parents=True, exist_ok=True)
        (china / "ClinicalReadings" / f"{stem}.txt").write_text(text)
    png(china / "CXR_png" / "CHNCXR_0009_1.png", grey(rng, 32))  # an image without its reading
    (china / "ClinicalReadings" / "CHNCXR_0010_0.txt").write_text("male 30yrs\nnormal\n")  # a reading, no image
    (china / "NLM-ChinaCXRSet-ReadMe.docx").write_bytes(b"PK")
    return root


def test_tuberculosis_reads_labels_sex_age_and_site(tb_root: Path) -> None:
    index = get_adapter("tuberculosis").load(tb_root, {}, ["tuberculosis"], "binary")
    t = index.table
    assert t.height == len(MONTGOMERY_READINGS) + len(SHENZHEN_READINGS) + 2  # masks are not radiographs
    rows = {r["sample_id"]: r for r in t.iter_rows(named=True)}
    for stem, (_, sex, age) in {**MONTGOMERY_READINGS, **SHENZHEN_READINGS}.items():
        r = rows[stem]
        assert (r["sex"], r["age"]) == (sex, age), stem
        assert r[label_column("tuberculosis")] == int(stem[-1])
        assert r["site"] == ("montgomery" if stem.startswith("MCU") else "shenzhen")
        assert r["patient_id"] == stem[:-2]
    assert rows["CHNCXR_0009_1"]["sex"] is None
    assert rows["CHNCXR_0009_1"]["path"] == "ChinaSet_AllFiles/CXR_png/CHNCXR_0009_1.png"
    assert rows["CHNCXR_0010_0"]["path"] == "ChinaSet_AllFiles/CXR_png/CHNCXR_0010_0.png"  # expected, absent
    assert not any("Mask" in p for p in t["path"].to_list())


def test_tuberculosis_images_decode_whatever_their_png_mode(tb_root: Path, tmp_path: Path) -> None:
    index = get_adapter("tuberculosis").load(tb_root, {}, ["tuberculosis"], "binary")
    cached = build_cache(index, 16, 1, on_bad_image="skip", workers=1, root=tmp_path)
    # palette, RGB, 8- and 16-bit PNGs all decode; only the reading without an image is missing
    assert [b["path"].endswith("CHNCXR_0010_0.png") for b in cached.bad] == [True]
    assert "image file not found" in cached.bad[0]["error"]
    ok = np.asarray(cached.pixels)[cached.ok]
    assert ok.shape[1:] == (1, 16, 16) and all(img.std() > 0 for img in ok)


def test_tuberculosis_set_selection_and_missing_set(tb_root: Path, tmp_path: Path) -> None:
    only = get_adapter("tuberculosis").load(tb_root, {"sets": ["montgomery"]}, ["tuberculosis"], "binary")
    assert set(only.table["site"]) == {"montgomery"}
    png(tmp_path / "MontgomerySet" / "CXR_png" / "MCUCXR_0001_0.png", np.zeros((8, 8), np.uint8))
    with pytest.raises(DataError, match=r"no Shenzhen files .*CHNCXR") as err:
        get_adapter("tuberculosis").load(tmp_path, {}, ["tuberculosis"], "binary")
    assert "\n" not in str(err.value)
    with pytest.raises(DataError, match=r"dataset.options.sets.0"):
        get_adapter("tuberculosis").load(tb_root, {"sets": ["montgomry"]}, ["tuberculosis"], "binary")


@pytest.mark.parametrize(("value", "years"), [
    ("058Y", 58.0), ("0023Y", 23.0), ("00005Y", 5.0), ("006M", 0.5), ("030D", 0.0821), ("010W", 0.1916),
    ("35yrs", 35.0), ("16month", 1.3333), (" 64days", 0.1752), ("40", 40.0), (41, 41.0),
    ("1985", None), ("0131Y", None), ("unknown", None), ("", None), (None, None),
])
def test_shared_age_parser_reads_dicom_ages_with_any_zero_padding(value, years) -> None:
    from medbench.data.adapters._common import parse_age

    assert parse_age(value) == years


# --------------------------------------------------------------------------- COVIDx

COVIDX_TRAIN = """\
3 SARS-10.1148rg.242035193-g04mr34g0-Fig8a-day0.jpeg pneumonia cohen
7 ards-sars-cov-2-case-1.png COVID-19 cohen
7 ards-sars-cov-2-case-2.png COVID-19 cohen
8cd00d37-4b8e-4d43-8b6a-4d1a8d4d2f43 8cd00d37-4b8e-4d43-8b6a-4d1a8d4d2f43.png normal rsna
9a1b 9a1b.png pneumonia rsna
419639-003251 MIDRC-RICORD-1C-419639-003251-46647-0.png COVID-19 ricord
SITE2-000265 MIDRC-RICORD-1C-SITE2-000265-99793-1.png COVID-19 ricord
"""
COVIDX_TEST = """\
5 covid-test-a.png COVID-19 cohen
7 ards-sars-cov-2-case-3.png COVID-19 cohen
ffee ffee.png normal rsna

9a1c 9a1c.png pneumonia rsna
"""


def _covidx(root: Path, train: str, test: str) -> Path:
    rng = np.random.default_rng(1)
    (root / "train.txt").write_text(train)
    (root / "test.txt").write_text(test)
    for split, text in (("train", train), ("test", test)):
        for line in text.splitlines():
            if line.strip():
                png(root / split / " ".join(line.split()[1:-2]), grey(rng, 32))
    return root


def test_covidx_three_classes_sources_and_patient_overlap(tmp_path: Path) -> None:
    root = _covidx(tmp_path, COVIDX_TRAIN, COVIDX_TEST)
    index = get_adapter("covidx").load(root, {}, ["normal", "pneumonia", "COVID-19"], "multiclass")
    t = index.table
    # patient "7" of cohen is in both files: its training images are left out, its test image stays
    assert "train/ards-sars-cov-2-case-1.png" not in t["sample_id"].to_list()
    assert index.notes["train_rows_dropped_patient_in_test"] == 2
    assert t.filter(pl.col("split") == "test").height == 4
    # ids restart per data source: the patient is "<source>:<id>"
    assert "rsna:9a1b" in t["patient_id"].to_list() and "cohen:3" in t["patient_id"].to_list()
    covid = t.filter(pl.col("sample_id") == "train/MIDRC-RICORD-1C-419639-003251-46647-0.png")
    assert covid.select(label_column("COVID-19"), label_column("normal")).row(0) == (1, 0)
    assert (t.select(pl.sum_horizontal(index.label_columns)).to_series() == 1).all()
    for p in t["path"]:
        assert (root / p).is_file()


def test_covidx_positive_negative_vocabulary(tmp_path: Path) -> None:
    train = "1 a.png positive bimcv\n2 b.png negative rsna\n3 c.png negative rsna\n"
    test = "4 d.png positive bimcv\n5 e.png negative sirm\n"
    root = _covidx(tmp_path, train, test)
    index = get_adapter("covidx").load(root, {}, ["COVID-19"], "binary")
    assert dict(zip(index.table["sample_id"], index.table[label_column("COVID-19")])) == {
        "train/a.png": 1, "train/b.png": 0, "train/c.png": 0, "test/d.png": 1, "test/e.png": 0}
    with pytest.raises(DataError, match="positive/negative vocabulary"):
        get_adapter("covidx").load(root, {}, ["normal", "pneumonia", "COVID-19"], "multiclass")


def test_covidx_malformed_line_names_file_and_line(tmp_path: Path) -> None:
    root = _covidx(tmp_path, "1 a.png normal rsna\n", "2 b.png normal rsna\n")
    (root / "test.txt").write_text("2 b.png normal rsna\n3 c.png\n")
    with pytest.raises(DataError, match=r"test.txt: line 2: expected 'patient_id filename label data_source'"):
        get_adapter("covidx").load(root, {}, ["normal", "pneumonia", "COVID-19"], "multiclass")


def test_covidx_task_oversamples_the_minority_class(tmp_path: Path) -> None:
    from medbench.data.loader import Normalization, TrainStream
    from medbench.spec.catalog import Catalog

    task = Catalog().task("covidx").spec
    assert task.sampler == "balanced" and task.splits.method == "official"
    train = "".join(f"{i} n{i}.png normal rsna\n" for i in range(40)) + "99 c.png COVID-19 cohen\n"
    root = _covidx(tmp_path, train, "100 t.png normal rsna\n")
    index = get_adapter("covidx").load(root, {}, task.labels, task.type)
    rows = np.nonzero((index.table["split"] == "train").to_numpy())[0]
    stream = TrainStream(np.zeros((index.table.height, 1, 8, 8), np.uint8), index.labels(), rows, batch_size=64,
                         crop=8, hflip=False, norm=Normalization((0.5,), (0.5,)), seed=0,
                         balanced=task.sampler == "balanced")
    drawn = np.concatenate([index.labels()[stream.sample_ids(s)].argmax(1) for s in range(20)])
    covid_share = (drawn == 2).mean()
    assert 0.35 < covid_share < 0.65  # 1 image of 41, drawn about half the time


# --------------------------------------------------------------------------- HAM10000 (Dataverse .tab quirks)


def test_ham10000_dataverse_tab_lowercase_folders_blank_cells(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    # Harvard Dataverse serves HAM10000_metadata.tab: tab-separated, quoted strings; Kaggle folders are lower-case
    rows = [
        ("HAM_0000118", "ISIC_0027419", "bkl", "histo", "80.0", "male", "scalp", "ham10000_images_part_1"),
        ("HAM_0000118", "ISIC_0025030", "bkl", "histo", "80.0", "male", "scalp", "ham10000_images_part_1"),
        ("HAM_0002730", "ISIC_0026769", "mel", "histo", "", "unknown", "unknown", "ham10000_images_part_2"),
        ("HAM_0001466", "ISIC_0031633", "nv", "follow_up", "75.0", "female", "ear", "ham10000_images_part_2"),
    ]
    header = "lesion_id\timage_id\tdx\tdx_type\tage\tsex\tlocalization\n"
    lines = ["\t".join(f'"{v}"' if not v.replace(".", "").isdigit() else v for v in r[:7]) for r in rows]
    (tmp_path / "HAM10000_metadata.tab").write_text(header + "\n".join(lines) + "\n")
    for r in rows:
        png(tmp_path / r[7] / f"{r[1]}.jpg", np.dstack([grey(rng, 32)] * 3))
    index = get_adapter("ham10000").load(tmp_path, {}, ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"],
                                         "multiclass")
    t = {r["sample_id"]: r for r in index.table.iter_rows(named=True)}
    assert t["ISIC_0026769"]["age"] is None and t["ISIC_0026769"]["sex"] is None
    assert t["ISIC_0026769"]["localization"] is None and t["ISIC_0026769"][label_column("mel")] == 1
    assert t["ISIC_0027419"]["patient_id"] == t["ISIC_0025030"]["patient_id"] == "HAM_0000118"
    assert t["ISIC_0031633"]["path"] == "ham10000_images_part_2/ISIC_0031633.jpg"
    assert t["ISIC_0031633"]["age"] == 75.0 and t["ISIC_0031633"]["sex"] == "F"
    binary = get_adapter("ham10000").load(tmp_path, {}, ["mel"], "binary")
    assert binary.table[label_column("mel")].to_list() == [0, 0, 1, 0]


def test_ham10000_csv_without_a_column_is_one_line_naming_file_and_column(tmp_path: Path) -> None:
    (tmp_path / "HAM10000_metadata.csv").write_text("lesion_id,image_id,dx,age,sex,localization\n"
                                                     "HAM_1,ISIC_1,nv,40,male,back\n")
    with pytest.raises(DataError) as err:
        get_adapter("ham10000").load(tmp_path, {}, ["nv"], "binary")
    msg = str(err.value)
    assert "HAM10000_metadata.csv" in msg and "'dx_type' is missing" in msg and "\n" not in msg


# --------------------------------------------------------------------------- ISIC


def test_isic_2019_one_hot_lesion_groups_and_class_subsets(tmp_path: Path) -> None:
    gt = ("image,MEL,NV,BCC,AK,BKL,DF,VASC,SCC,UNK\n"
          "ISIC_0000000,0.0,1.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0\n"
          "ISIC_0000002,1.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0\n"
          "ISIC_0000004_downsampled,1.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0\n"
          "ISIC_0024306,0.0,0.0,0.0,0.0,0.0,0.0,0.0,1.0,0.0\n"
          "ISIC_0024307,0.0,0.0,0.0,0.0,0.0,0.0,0.0,1.0,0.0\n")
    meta = ("image,age_approx,anatom_site_general,lesion_id,sex\n"
            "ISIC_0000000,55.0,anterior torso,,female\n"
            "ISIC_0000002,60.0,upper extremity,,female\n"
            "ISIC_0000004_downsampled,,posterior torso,,\n"
            "ISIC_0024306,45.0,lower extremity,HAM_0000550,male\n"
            "ISIC_0024307,50.0,lower extremity,HAM_0000550,male\n")
    (tmp_path / "ISIC_2019_Training_GroundTruth.csv").write_text(gt)
    (tmp_path / "ISIC_2019_Training_Metadata.csv").write_text(meta)
    for name in ("ISIC_0000000", "ISIC_0000002"):
        png(tmp_path / "ISIC_2019_Training_Input" / f"{name}.jpg", np.zeros((8, 8, 3), np.uint8))
    labels = ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC"]
    index = get_adapter("isic").load(tmp_path, {"edition": 2019}, labels, "multiclass")
    t = {r["sample_id"]: r for r in index.table.iter_rows(named=True)}
    assert t["ISIC_0024306"]["patient_id"] == t["ISIC_0024307"]["patient_id"] == "HAM_0000550"
    assert t["ISIC_0000000"]["patient_id"] == "ISIC_0000000"  # no lesion id: the image is its own group
    assert t["ISIC_0000004_downsampled"]["age"] is None and t["ISIC_0000004_downsampled"]["sex"] is None
    assert t["ISIC_0024306"]["diagnosis"] == "SCC" and t["ISIC_0024306"][label_column("SCC")] == 1
    assert t["ISIC_0000000"]["path"] == "ISIC_2019_Training_Input/ISIC_0000000.jpg"
    sub = get_adapter("isic").load(tmp_path, {"edition": 2019}, ["MEL", "NV"], "multiclass")
    assert sub.table.height == 3 and sub.notes["rows_of_other_classes"] == 2
    two = gt.replace("ISIC_0000000,0.0,1.0", "ISIC_0000000,1.0,1.0")
    (tmp_path / "ISIC_2019_Training_GroundTruth.csv").write_text(two)
    with pytest.raises(DataError, match=r"GroundTruth.csv: row 2: image 'ISIC_0000000' has 2 classes set"):
        get_adapter("isic").load(tmp_path, {"edition": 2019}, labels, "multiclass")


def test_isic_2020_patients_and_target(tmp_path: Path) -> None:
    (tmp_path / "train.csv").write_text(
        "image_name,patient_id,sex,age_approx,anatom_site_general_challenge,diagnosis,benign_malignant,target\n"
        "ISIC_2637011,IP_7279968,male,45.0,head/neck,unknown,benign,0\n"
        "ISIC_0015719,IP_3075186,female,45.0,upper extremity,unknown,benign,0\n"
        "ISIC_0052212,IP_2842074,female,50.0,lower extremity,nevus,benign,0\n"
        "ISIC_0074268,IP_3075186,female,45.0,,melanoma,malignant,1\n"
        "ISIC_0074311,IP_2950485,,,lower extremity,unknown,benign,0\n")
    png(tmp_path / "jpeg" / "train" / "ISIC_2637011.jpg", np.zeros((8, 8, 3), np.uint8))
    index = get_adapter("isic").load(tmp_path, {"edition": 2020}, ["melanoma"], "binary")
    t = {r["sample_id"]: r for r in index.table.iter_rows(named=True)}
    assert t["ISIC_0074268"][label_column("melanoma")] == 1 and t["ISIC_0074268"]["patient_id"] == "IP_3075186"
    assert t["ISIC_0074311"]["sex"] is None and t["ISIC_0074311"]["age"] is None
    assert t["ISIC_2637011"]["path"] == "jpeg/train/ISIC_2637011.jpg"
    with pytest.raises(DataError, match=r"dataset.options.edition"):
        get_adapter("isic").load(tmp_path, {"edition": 2018}, ["melanoma"], "binary")


# --------------------------------------------------------------------------- CBIS-DDSM

def _nbia_series(root: Path, series: str, arr: np.ndarray, syntax: str) -> Path:
    """Where the NBIA Data Retriever puts a full mammogram: dated study and described series folders."""
    return dicom(root / "CBIS-DDSM" / series / "07-20-2016-DDSM-74994" / "1.000000-full mammogram images-24515"
                 / "1-1.dcm", arr, syntax=syntax)


@pytest.fixture(scope="module")
def cbis_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cbis-ddsm")
    rng = np.random.default_rng(3)
    mass_train = [cbis_row("mass", "train", "P_00001", "LEFT", "CC", 1, "MALIGNANT"),
                  cbis_row("mass", "train", "P_00001", "LEFT", "MLO", 1, "BENIGN"),
                  # two abnormalities on one mammogram: one benign, one malignant -> malignant
                  cbis_row("mass", "train", "P_00004", "RIGHT", "CC", 1, "BENIGN"),
                  cbis_row("mass", "train", "P_00004", "RIGHT", "CC", 2, "MALIGNANT"),
                  # this patient also has test mammograms: left out of training
                  cbis_row("mass", "train", "P_00009", "LEFT", "CC", 1, "BENIGN")]
    mass_test = [cbis_row("mass", "test", "P_00009", "RIGHT", "MLO", 1, "BENIGN_WITHOUT_CALLBACK"),
                 cbis_row("mass", "test", "P_00016", "LEFT", "CC", 1, "MALIGNANT")]
    calc_train = [cbis_row("calc", "train", "P_00005", "RIGHT", "CC", 1, "MALIGNANT"),
                  # a calcification on a mammogram that also has a mass: the same image
                  cbis_row("calc", "train", "P_00001", "LEFT", "CC", 1, "BENIGN")]
    calc_test = [cbis_row("calc", "test", "P_00038", "LEFT", "MLO", 1, "BENIGN")]
    for name, header, rows in (("mass_case_description_train_set.csv", MASS_HEADER, mass_train),
                               ("mass_case_description_test_set.csv", MASS_HEADER, mass_test),
                               ("calc_case_description_train_set.csv", CALC_HEADER, calc_train),
                               ("calc_case_description_test_set.csv", CALC_HEADER, calc_test)):
        (root / name).write_text(header + "\n" + "\n".join(rows) + "\n")
    syntaxes = ["rle", "explicit", "j2k"]
    for k, row in enumerate(mass_train + mass_test + calc_train + calc_test):
        series = row.split(",")[11].split("/")[0]
        if not list((root / "CBIS-DDSM").glob(f"{series}/*/*/1-1.dcm")):
            _nbia_series(root, series, rng.integers(0, 65535, (48, 40)).astype(np.uint16), syntaxes[k % 3])
            # the ROI/crop series of the same abnormality sit beside it under "<series>_<abnormality>"
            dicom(root / "CBIS-DDSM" / f"{series}_1" / "08-29-2017-DDSM-96009" / "1.000000-ROI mask images-27767"
                  / "1-1.dcm", np.zeros((8, 8), np.uint8))
    return root


def test_cbis_ddsm_one_sample_per_mammogram_any_malignant(cbis_root: Path) -> None:
    index = get_adapter("cbis-ddsm").load(cbis_root, {}, ["malignant"], "binary")
    t = {r["sample_id"]: r for r in index.table.iter_rows(named=True)}
    assert t["P_00004_RIGHT_CC"][label_column("malignant")] == 1 and t["P_00004_RIGHT_CC"]["n_abnormalities"] == 2
    assert t["P_00001_LEFT_CC"]["abnormality"] == "calc+mass" and t["P_00001_LEFT_CC"][label_column("malignant")] == 1
    assert t["P_00009_RIGHT_MLO"][label_column("malignant")] == 0  # BENIGN_WITHOUT_CALLBACK
    assert "P_00009_LEFT_CC" not in t and index.notes["train_rows_dropped_patient_in_test"] == 1
    assert t["P_00001_LEFT_CC"]["breast_density"] == "3" and t["P_00005_RIGHT_CC"]["breast_density"] == "3"
    assert {r["split"] for r in t.values()} == {"train", "test"}
    # the CSV's UID paths do not exist: the full mammogram is found in the NBIA series folder, never the ROI
    for r in t.values():
        assert r["path"].endswith("full mammogram images-24515/1-1.dcm") and (cbis_root / r["path"]).is_file()
    assert index.notes["images_found"] == len(t)


def test_cbis_ddsm_dicoms_decode_rle_j2k_and_uncompressed(cbis_root: Path, tmp_path: Path) -> None:
    index = get_adapter("cbis-ddsm").load(cbis_root, {}, ["malignant"], "binary")
    cached = build_cache(index, 32, 1, workers=1, root=tmp_path)
    assert cached.bad == [] and np.asarray(cached.pixels).std() > 10


def test_cbis_ddsm_csv_without_pathology_names_file_and_column(cbis_root: Path, tmp_path: Path) -> None:
    for f in cbis_root.glob("*.csv"):
        text = f.read_text()
        if f.name == "calc_case_description_test_set.csv":
            text = text.replace(",pathology,", ",diagnosis,")
        (tmp_path / f.name).write_text(text)
    with pytest.raises(DataError) as err:
        get_adapter("cbis-ddsm").load(tmp_path, {}, ["malignant"], "binary")
    msg = str(err.value)
    assert msg.startswith(str(tmp_path / "calc_case_description_test_set.csv"))
    assert "pathology: column 'pathology' is missing" in msg and "\n" not in msg


# --------------------------------------------------------------------------- VinDr-Mammo


@pytest.fixture(scope="module")
def vindr_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("vindr-mammo")
    base = root / "physionet.org" / "files" / "vindr-mammo" / "1.0.0"  # as wget -r of PhysioNet leaves it
    rng = np.random.default_rng(4)
    rows = []
    studies = [("s1", "training", ["BI-RADS 1", "BI-RADS 1", "BI-RADS 2", "BI-RADS 2"]),
               ("s2", "training", ["BI-RADS 4", "BI-RADS 1", "BI-RADS 5", "BI-RADS 3"]),
               ("s3", "test", ["BI-RADS 2", "BI-RADS 2", "BI-RADS 1", "BI-RADS 4"])]
    for study, split, birads in studies:
        for k, (lat, view) in enumerate([("L", "CC"), ("L", "MLO"), ("R", "CC"), ("R", "MLO")]):
            image = f"{study}i{k}"
            rows.append(f"{study},ser{study}{lat},{image},{lat},{view},3518,2800,{birads[k]},DENSITY C,{split}")
            arr = rng.integers(0, 4095, (48, 40)).astype(np.uint16)
            # VinDr mixes transfer syntaxes (JPEG 2000 among them) and photometric interpretations
            dicom(base / "images" / study / f"{image}.dicom", arr, syntax="j2k" if k % 2 else "explicit",
                  photometric="MONOCHROME1" if k == 3 else "MONOCHROME2")
    (base / "breast-level_annotations.csv").write_text(
        "study_id,series_id,image_id,laterality,view_position,height,width,breast_birads,breast_density,split\n"
        + "\n".join(rows) + "\n")
    return root


def test_vindr_mammo_birads_binary_official_split_and_compressed_dicom(vindr_root: Path, tmp_path: Path) -> None:
    index = get_adapter("vindr-mammo").load(vindr_root, {}, ["suspicious"], "binary")
    t = index.table
    assert t.height == 12 and set(t["split"]) == {"train", "test"}
    assert t.filter(pl.col(label_column("suspicious")) == 1)["sample_id"].to_list() == ["s2i0", "s2i2", "s3i3"]
    assert t["path"][0] == "physionet.org/files/vindr-mammo/1.0.0/images/s1/s1i0.dicom"
    assert t["patient_id"].n_unique() == 3 and set(t["view"]) == {"CC", "MLO"}
    cached = build_cache(index, 32, 1, workers=1, root=tmp_path)
    assert cached.bad == []
    strict = get_adapter("vindr-mammo").load(vindr_root, {"negative_birads": [1, 2]}, ["suspicious"], "binary")
    assert strict.table.height == 11  # the BI-RADS 3 image is neither positive nor negative
    density = get_adapter("vindr-mammo").load(vindr_root, {"target": "density"},
                                              ["DENSITY A", "DENSITY B", "DENSITY C", "DENSITY D"], "multiclass")
    assert density.table[label_column("DENSITY C")].sum() == 12
    with pytest.raises(DataError, match=r"dataset.options: .*cannot be both positive and negative"):
        get_adapter("vindr-mammo").load(vindr_root, {"negative_birads": [3, 4]}, ["suspicious"], "binary")


# --------------------------------------------------------------------------- MedMNIST (generated .npz)


def _npz(path: Path, *, n: int, size: int, channels: int, labels: np.ndarray | None = None, classes: int = 2,
         multilabel: int = 0, drop: str | None = None) -> Path:
    rng = np.random.default_rng(5)
    arrays = {}
    for s in ("train", "val", "test"):
        shape = (n, size, size) + ((3,) if channels == 3 else ())
        arrays[f"{s}_images"] = rng.integers(0, 255, shape).astype(np.uint8)
        arrays[f"{s}_labels"] = (rng.integers(0, 2, (n, multilabel)) if multilabel
                                 else rng.integers(0, classes, (n, 1))).astype(np.uint8)
    if drop:
        arrays.pop(drop)
    np.savez(path, **arrays)
    return path


def test_medmnist_multilabel_rgb_sizes_and_broken_files(tmp_path: Path) -> None:
    from medbench.data.medmnist_info import SETS

    _npz(tmp_path / "chestmnist_64.npz", n=5, size=64, channels=1, multilabel=14)
    chest = get_adapter("medmnist").load(tmp_path, {"flag": "chestmnist", "size": 64},
                                         list(SETS["chestmnist"].labels), "multilabel")
    assert chest.pixels.shape == (15, 64, 64) and len(chest.label_columns) == 14
    assert list(chest.table["split"].unique(maintain_order=True)) == ["train", "val", "test"]
    _npz(tmp_path / "bloodmnist.npz", n=4, size=28, channels=3, classes=8)
    blood = get_adapter("medmnist").load(tmp_path, {"flag": "bloodmnist"}, list(SETS["bloodmnist"].labels),
                                         "multiclass")
    assert blood.pixels.shape == (12, 28, 28, 3)
    assert (blood.table.select(pl.sum_horizontal(blood.label_columns)).to_series() == 1).all()
    assert not blood.notes["official_counts_match"]
    _npz(tmp_path / "octmnist.npz", n=3, size=28, channels=1, classes=4, drop="val_labels")
    with pytest.raises(DataError, match=r"octmnist.npz: val_labels: array 'val_labels' is missing"):
        get_adapter("medmnist").load(tmp_path, {"flag": "octmnist"}, list(SETS["octmnist"].labels), "multiclass")
    with pytest.raises(DataError, match=r"pneumoniamnist has labels \['pneumonia'\]"):
        get_adapter("medmnist").load(tmp_path, {"flag": "pneumoniamnist"}, ["normal"], "binary")
    with pytest.raises(DataError, match=r"dataset.options.flag"):
        get_adapter("medmnist").load(tmp_path, {"flag": "pneumonamnist"}, ["pneumonia"], "binary")


# --------------------------------------------------------------------------- generic CSV adapter


@pytest.fixture()
def csv_root(tmp_path: Path) -> Path:
    rng = np.random.default_rng(6)
    lines = ["file,patient,fold,diagnosis,gender,age_years,hospital,scanner"]
    for i in range(12):
        dx = ["melanoma", "nevus", "MEL"][i % 3]
        lines.append(f"img{i:02d},pt{i // 2},{['training', 'validation', 'testing'][i % 3]},{dx},"
                     f"{['male', 'F', ''][i % 3]},{['35Y', '40', 'unknown'][i % 3]},H{i % 2},S1")
        png(tmp_path / "images" / f"img{i:02d}.png", grey(rng, 16))
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")
    return tmp_path


CSV_OPTIONS = {"csv": "labels.csv", "path_column": "file", "path_root": "images", "path_suffix": ".png",
               "patient_column": "patient", "split_column": "fold",
               "split_values": {"training": "train", "validation": "val", "testing": "test"},
               "label_column": "diagnosis", "classes": {"mel": ["melanoma", "MEL"], "nv": ["nevus"]},
               "sex_column": "gender", "age_column": "age_years", "site_column": "hospital",
               "attribute_columns": ["scanner"]}


def test_csv_adapter_declared_in_yaml(csv_root: Path) -> None:
    index = get_adapter("csv").load(csv_root, CSV_OPTIONS, ["mel", "nv"], "multiclass")
    t = index.table
    assert t["path"][0] == "images/img00.png" and (csv_root / t["path"][0]).is_file()
    assert t[label_column("mel")].to_list() == [1, 0, 1] * 4
    assert t["sex"].to_list()[:3] == ["M", "F", None] and t["age"].to_list()[:3] == [35.0, 40.0, None]
    assert set(t["split"]) == {"train", "val", "test"} and t["scanner"][0] == "S1" and t["site"][1] == "H1"
    binary = get_adapter("csv").load(csv_root, {**CSV_OPTIONS, "classes": {"mel": ["melanoma", "MEL"]},
                                                "negative_values": ["nevus"]}, ["mel"], "binary")
    assert binary.table[label_column("mel")].to_list() == [1, 0, 1] * 4
    # every other CSV column is kept for subgroup attributes, under its own name
    assert index.table["scanner"].to_list() == ["S1"] * 12 and index.table["fold"][1] == "validation"


def test_csv_adapter_label_columns_and_errors(csv_root: Path) -> None:
    (csv_root / "multi.csv").write_text("path,pid,edema,effusion\na.png,p1,1.0,\nb.png,p2,-1.0,0.0\nc.png,p3,0,1\n")
    opts = {"csv": "multi.csv", "path_column": "path", "patient_column": "pid",
            "label_columns": {"Edema": "edema", "Effusion": "effusion"},
            "value_map": {"1.0": 1, "1": 1, "0.0": 0, "0": 0, "-1.0": None, "": None}}
    index = get_adapter("csv").load(csv_root, opts, ["Edema", "Effusion"], "multilabel")
    assert index.table[label_column("Edema")].to_list() == [1, None, 0]
    assert index.table[label_column("Effusion")].to_list() == [None, 0, 1]
    with pytest.raises(DataError, match=r"multi.csv: edema: values \['-1.0'\] of label 'Edema' are not in value_map"):
        get_adapter("csv").load(csv_root, {**opts, "value_map": {"1.0": 1, "0.0": 0, "0": 0, "": None}},
                                ["Edema", "Effusion"], "multilabel")
    with pytest.raises(DataError,
                       match=r"labels.csv: diagnosis: 4 rows have values \['nevus'\] .*dataset.options.classes"):
        get_adapter("csv").load(csv_root, {**CSV_OPTIONS, "classes": {"mel": ["melanoma", "MEL"], "bcc": ["bcc"]}},
                                ["mel", "bcc"], "multiclass")
    with pytest.raises(DataError) as err:
        get_adapter("csv").load(csv_root, {**CSV_OPTIONS, "patient_column": "subject"}, ["mel", "nv"], "multiclass")
    assert str(err.value) == (f"{csv_root / 'labels.csv'}: subject: column 'subject' is missing; expected columns "
                              "['file', 'subject', 'fold', 'diagnosis', 'gender', 'age_years', 'hospital', 'scanner']; "
                              "the file has 'file', 'patient', 'fold', 'diagnosis', 'gender', 'age_years', 'hospital', "
                              "'scanner'")
    with pytest.raises(DataError, match=r"dataset.options: .*exactly one of label_column"):
        get_adapter("csv").load(csv_root, {k: v for k, v in CSV_OPTIONS.items() if k != "label_column"},
                                ["mel", "nv"], "multiclass")
    with pytest.raises(DataError, match=r"dataset.options.patient_colum: unknown option"):
        get_adapter("csv").load(csv_root, {**CSV_OPTIONS, "patient_colum": "x"}, ["mel", "nv"], "multiclass")


def _zero_one_csv(root: Path, values: list[str]) -> Path:
    lines = ["image,patient,abnormal"] + [f"i{i}.png,p{i},{v}" for i, v in enumerate(values)]
    (root / "ab.csv").write_text("\n".join(lines) + "\n")
    return root / "ab.csv"


AB_OPTIONS = {"csv": "ab.csv", "path_column": "image", "patient_column": "patient", "label_column": "abnormal"}


def test_csv_binary_label_column_over_a_0_1_column_is_refused_with_the_fix(tmp_path: Path) -> None:
    """Issue 14 item 9: ``label_column: abnormal`` over a 0/1 column made "1" a class name, so every row was
    negative (data inspect showed 0 positives, the run exited 0 with AUC undefined)."""
    path = _zero_one_csv(tmp_path, ["0", "1", "1", "0", ""])
    with pytest.raises(DataError) as err:
        get_adapter("csv").load(tmp_path, AB_OPTIONS, ["abnormal"], "binary")
    assert str(err.value) == (f"{path}: abnormal: values ['0', '1'] are not declared for the binary label 'abnormal' "
                              "(values seen: ['0', '1']); a 0/1 column is read with label_columns: "
                              "{abnormal: abnormal} instead of label_column (1 positive, 0 negative)")
    fixed = {k: v for k, v in AB_OPTIONS.items() if k != "label_column"} | {"label_columns": {"abnormal": "abnormal"}}
    index = get_adapter("csv").load(tmp_path, fixed, ["abnormal"], "binary")
    assert index.table[label_column("abnormal")].to_list() == [0, 1, 1, 0, None]


@pytest.mark.parametrize("stray", ["NaN", "?", "Pos"])
def test_csv_binary_values_are_declared_never_guessed_negative(tmp_path: Path, stray: str) -> None:
    """``NaN``, ``?`` or ``Pos`` silently became negatives; now they are an error naming the file, the column, the
    values and the options, until declared positive, negative or missing."""
    path = _zero_one_csv(tmp_path, ["benign", "malignant", stray, "benign"])
    opts = {**AB_OPTIONS, "classes": {"abnormal": ["malignant"]}, "negative_values": ["benign"]}
    with pytest.raises(DataError) as err:
        get_adapter("csv").load(tmp_path, opts, ["abnormal"], "binary")
    assert str(err.value).startswith(f"{path}: abnormal: values [{stray!r}] are not declared for the binary label "
                                     f"'abnormal' (values seen: ")
    assert "negative_values" in str(err.value) and "missing_values" in str(err.value)
    with pytest.raises(DataError, match=r"declare the negatives with dataset.options.negative_values"):
        get_adapter("csv").load(tmp_path, {**opts, "negative_values": None}, ["abnormal"], "binary")
    missing = get_adapter("csv").load(tmp_path, {**opts, "missing_values": [stray]}, ["abnormal"], "binary")
    assert missing.table[label_column("abnormal")].to_list() == [0, 1, None, 0]
    dropped = get_adapter("csv").load(tmp_path, {**opts, "unmatched": "drop"}, ["abnormal"], "binary")
    assert dropped.table[label_column("abnormal")].to_list() == [0, 1, 0]
    assert dropped.notes["rows_left_out"] == 1


def test_csv_patient_from_a_pattern(tmp_path: Path) -> None:
    """Issue 17: ids that encode the patient (COVID-00040a / COVID-00040b are one person)."""
    lines = ["image_id,finding"] + [f"COVID-{i // 2:05d}{'ab'[i % 2]},{i % 2}" for i in range(8)]
    (tmp_path / "c.csv").write_text("\n".join(lines) + "\n")
    opts = {"csv": "c.csv", "path_column": "image_id", "path_suffix": ".png", "label_columns": {"covid": "finding"},
            "patient_pattern": r"^(?P<patient>COVID-\d+)[a-z]$"}
    index = get_adapter("csv").load(tmp_path, opts, ["covid"], "binary")
    assert index.table["patient_id"].to_list() == [f"COVID-{i // 2:05d}" for i in range(8)]
    first_group = get_adapter("csv").load(tmp_path, {**opts, "patient_pattern": r"^(COVID-\d+)"}, ["covid"], "binary")
    assert first_group.table["patient_id"].n_unique() == 4
    with pytest.raises(DataError) as err:
        get_adapter("csv").load(tmp_path, {**opts, "patient_pattern": r"^P(\d+)"}, ["covid"], "binary")
    assert str(err.value).startswith(f"{tmp_path / 'c.csv'}: image_id: patient_pattern '^P(\\d+)' does not match 8 "
                                     "values (e.g. ['COVID-00000a', 'COVID-00000b', 'COVID-00001a', ... (5 more)])")
    with pytest.raises(DataError, match=r"dataset.options.patient_pattern: .*not a regular expression"):
        get_adapter("csv").load(tmp_path, {**opts, "patient_pattern": "(unclosed"}, ["covid"], "binary")


def test_corrupt_and_empty_images_fail_or_are_skipped_and_counted(csv_root: Path, tmp_path: Path) -> None:
    (csv_root / "images" / "img03.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage, not an image")
    (csv_root / "images" / "img07.png").write_bytes(b"")
    index = get_adapter("csv").load(csv_root, CSV_OPTIONS, ["mel", "nv"], "multiclass")
    with pytest.raises(DataError) as err:
        build_cache(index, 16, 1, on_bad_image="fail", workers=1, root=tmp_path / "a")
    assert str(err.value).startswith(str(csv_root / "images" / "img03.png"))
    assert "(and 1 more)" in str(err.value) and "on_bad_image: skip" in str(err.value)
    cached = build_cache(index, 16, 1, on_bad_image="skip", workers=1, root=tmp_path / "b")
    assert [b["path"].rsplit("/", 1)[1] for b in cached.bad] == ["img03.png", "img07.png"]
    assert "empty (0 bytes)" in cached.bad[1]["error"]
    assert cached.ok.sum() == 10 and not cached.ok[3] and not cached.ok[7]
    # a task over some of these images reads the same entry: its own bad images only, at its own rows
    keep = np.array([i not in (1, 2) for i in range(12)])  # img03 and img07 are rows 1 and 5 of the subset
    part = build_cache(index.subset(keep), 16, 1, on_bad_image="skip", workers=1, root=tmp_path / "b")
    assert part.path == cached.path and [b["row"] for b in part.bad] == [1, 5]
    assert part.ok.tolist() == [i not in (1, 5) for i in range(10)]
    assert np.array_equal(np.asarray(part.pixels)[part.ok], np.asarray(cached.pixels)[keep & cached.ok])
    clean = index.subset(np.array([i not in (3, 7) for i in range(12)]))
    assert build_cache(clean, 16, 1, on_bad_image="fail", workers=1, root=tmp_path / "b").bad == []
    with pytest.raises(DataError, match=r"img07.png: image file is empty"):
        build_cache(index.subset(np.arange(12) >= 6), 16, 1, on_bad_image="fail", workers=1, root=tmp_path / "b")


def test_adapter_errors_are_medbench_errors() -> None:
    with pytest.raises(MedbenchError, match="unknown dataset adapter 'tuberculoss'"):
        get_adapter("tuberculoss")
