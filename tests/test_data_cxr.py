"""Chest X-ray data on the real files: full label files through ``medbench data inspect``, counted
independently from the raw CSVs (csv module, not the adapters' polars code), the real NIH sample
end to end, label harmonization, dry-run plans without data, split reuse, one-line errors."""

from __future__ import annotations

import ast
import csv
import gzip
import io
import json
import os
from collections import Counter
from pathlib import Path

import polars as pl
import pytest
from conftest import REPO, run_cli, shared_data

from medbench.data.locate import DataLocations
from medbench.data.task_data import load_task_data
from medbench.errors import DataError
from medbench.run.runner import _ood_label_pairs
from medbench.spec.catalog import Catalog

FIVE = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"]
CHEST_TASKS = ["chexpert", "mimic-cxr", "nih", "padchest", "padchest-cl"]
PADCHEST_FILE = "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv.gz"


def raw_rows(path: Path) -> list[dict[str, str]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def inspect_json(task: str, *args: str) -> dict:
    proc = run_cli("data", "inspect", task, *args, "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)


def total(out: dict, label: str, key: str, splits: tuple[str, ...] = ("train", "val", "test")) -> int:
    return sum(out["splits"][s]["labels"][label][key] for s in splits)


@pytest.fixture(scope="session")
def label_roots(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Dataset folders in the publishers' layouts around the real label files (symlinks, no images).

    CheXpert's valid.csv is not among the real files: a small one in the official format is written,
    so the official train.csv is parsed whole and counted on its own."""
    files = shared_data("label-files")
    base = tmp_path_factory.mktemp("label-roots")
    roots = {name: base / name for name in ("chexpert", "nih", "padchest")}
    for r in roots.values():
        r.mkdir()
    os.symlink(files / "chexpert_train.csv.gz", roots["chexpert"] / "train.csv.gz")
    os.symlink(files / "Data_Entry_2017_v2020.csv.gz", roots["nih"] / "Data_Entry_2017_v2020.csv.gz")
    os.symlink(files / PADCHEST_FILE, roots["padchest"] / PADCHEST_FILE)
    with gzip.open(files / "chexpert_train.csv.gz", "rt", newline="") as f:
        header = next(csv.reader(f))
    valid = [["CheXpert-v1.0-small/valid/patient64541/study1/view1_frontal.jpg", "Male", "73", "Frontal", "AP"],
             ["CheXpert-v1.0-small/valid/patient64542/study1/view1_frontal.jpg", "Female", "70", "Frontal", "PA"],
             ["CheXpert-v1.0-small/valid/patient64542/study1/view2_lateral.jpg", "Female", "70", "Lateral", ""]]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for k, row in enumerate(valid):
        w.writerow(row + [("1.0" if (i + k) % 3 == 0 else "0.0") for i in range(len(header) - 5)])
    (roots["chexpert"] / "valid.csv").write_text(buf.getvalue())
    return roots


@pytest.fixture(scope="session")
def tasks_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Variants of the built-in tasks that keep every row, to count whole files."""
    d = tmp_path_factory.mktemp("tasks")
    base = REPO / "tasks" / "chest-xray"
    (d / "chexpert-all.yaml").write_text(
        f"task: chexpert-all\ninclude: {base / 'chexpert.yaml'}\n"
        "dataset: {options: {uncertainty: U-Ones, frontal_only: false}}\nood: []\n")
    (d / "padchest-all.yaml").write_text(
        f"task: padchest-all\ninclude: {base / 'padchest.yaml'}\n"
        "dataset: {options: {views: null}}\nood: []\n")
    return d


# ----------------------------------------------------------------------------------- full real label files


def chexpert_expected(rows: list[dict[str, str]], policy: str, frontal_only: bool) -> dict[str, Counter]:
    """Independent count of the stated policy: 1.0 positive; 0.0 and blank negative; -1.0 by policy."""
    out = {"pos": Counter(), "neg": Counter(), "missing": Counter(), "n": Counter()}
    for r in rows:
        if frontal_only and r["Frontal/Lateral"] != "Frontal":
            continue
        out["n"]["all"] += 1
        for lab in FIVE:
            v = r[lab]
            key = {"1.0": "pos", "0.0": "neg", "": "neg"}.get(v)
            if v == "-1.0":
                key = {"U-Ignore": "missing", "U-Ones": "pos", "U-Zeros": "neg"}[policy]
            out[key][lab] += 1
    return out


@pytest.mark.shared
def test_chexpert_full_train_csv(label_roots: dict[str, Path], tasks_dir: Path) -> None:
    rows = raw_rows(shared_data("label-files", "chexpert_train.csv.gz"))
    assert len(rows) == 223_414
    data = ("--data", f"chexpert={label_roots['chexpert']}")
    # every row, U-Ones
    every = inspect_json("chexpert-all", *data, "--tasks-dir", str(tasks_dir))
    want = chexpert_expected(rows, "U-Ones", frontal_only=False)
    assert every["splits"]["train"]["n"] + every["splits"]["val"]["n"] == 223_414
    assert every["splits"]["test"]["n"] == 3  # valid.csv -> test
    for lab in FIVE:
        assert total(every, lab, "pos", ("train", "val")) == want["pos"][lab], lab
        assert total(every, lab, "neg", ("train", "val")) == want["neg"][lab], lab
        assert total(every, lab, "missing", ("train", "val")) == 0
    # the built-in task: frontal images, U-Ignore
    task = inspect_json("chexpert", *data)
    want = chexpert_expected(rows, "U-Ignore", frontal_only=True)
    assert task["splits"]["train"]["n"] + task["splits"]["val"]["n"] == want["n"]["all"] == 191_027
    for lab in FIVE:
        for key in ("pos", "neg", "missing"):
            assert total(task, lab, key, ("train", "val")) == want[key][lab], (lab, key)
    patients = {r["Path"].split("/")[2] for r in rows if r["Frontal/Lateral"] == "Frontal"}
    assert task["splits"]["train"]["patients"] + task["splits"]["val"]["patients"] == len(patients)
    sexes = Counter(r["Sex"] for r in rows if r["Frontal/Lateral"] == "Frontal")
    got_sex = Counter()
    for s in ("train", "val"):
        got_sex.update(task["splits"][s]["attributes"]["sex"])
    assert got_sex == Counter({"M": sexes["Male"], "F": sexes["Female"], "unknown": sexes["Unknown"]})
    assert task["missing_files"] == task["n"]  # label files only: every image reported missing, nothing fails


@pytest.mark.shared
def test_nih_full_data_entry(label_roots: dict[str, Path]) -> None:
    rows = raw_rows(shared_data("label-files", "Data_Entry_2017_v2020.csv.gz"))
    assert len(rows) == 112_120
    out = inspect_json("nih", "--data", f"nih={label_roots['nih']}")
    assert out["n"] == 112_120
    findings = Counter(f for r in rows for f in r["Finding Labels"].split("|"))
    for lab in ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Effusion"]:
        assert total(out, lab, "pos") == findings[lab], lab
        assert total(out, lab, "neg") == 112_120 - findings[lab], lab
    assert out["patients"] == len({r["Patient ID"] for r in rows})
    views = Counter()
    for s in out["splits"].values():
        views.update(s["attributes"]["view"])
    assert views == Counter(r["View Position"] for r in rows)
    assert out["notes"]["split"].startswith("none")  # no list files here: patient-grouped fallback


def padchest_terms(cell: str) -> list[str] | None:
    if cell in ("", "nan"):
        return None
    return [t.strip() for t in ast.literal_eval(cell) if t.strip()]  # trusted test file; the adapter never evals


@pytest.fixture(scope="session")
def padchest_raw() -> list[tuple[list[str] | None, str]]:
    """(findings, Projection) of every row of the real PadChest label file, read with the csv module."""
    rows = raw_rows(shared_data("label-files", PADCHEST_FILE))
    return [(padchest_terms(r["Labels"]), r["Projection"]) for r in rows]


@pytest.mark.shared
def test_padchest_full_labels_csv(label_roots: dict[str, Path], tasks_dir: Path, padchest_raw: list) -> None:
    assert len(padchest_raw) == 160_861
    data = ("--data", f"padchest={label_roots['padchest']}")
    groups = {"atelectasis": {"atelectasis", "laminar atelectasis", "lobar atelectasis", "segmental atelectasis",
                              "round atelectasis", "total atelectasis", "atelectasis basal"},
              "cardiomegaly": {"cardiomegaly"}, "consolidation": {"consolidation"},
              "pulmonary edema": {"pulmonary edema"},
              "pleural effusion": {"pleural effusion", "loculated pleural effusion", "loculated fissural effusion"}}
    for task, views in (("padchest-all", None), ("padchest", {"PA", "AP", "AP_horizontal"})):
        extra = ("--tasks-dir", str(tasks_dir)) if task.endswith("-all") else ()
        out = inspect_json(task, *data, *extra)
        kept, pos, no_labels, excluded = 0, Counter(), 0, 0
        for terms, projection in padchest_raw:
            if not terms:
                no_labels += 1
                continue
            if "exclude" in terms:
                excluded += 1
                continue
            if views is not None and projection not in views:
                continue
            kept += 1
            for lab, g in groups.items():
                pos[lab] += bool(g & set(terms))
        assert out["n"] == kept, task
        for lab in groups:
            assert total(out, lab, "pos") == pos[lab], (task, lab)
            assert total(out, lab, "neg") == kept - pos[lab], (task, lab)
        if views is None:  # the whole file is accounted for
            dropped = out["notes"]["dropped"]
            assert dropped == {"no labels (nan or empty)": no_labels, "labelled 'exclude'": excluded}
            assert out["n"] + no_labels + excluded == 160_861


@pytest.mark.shared
def test_padchest_cl_single_label_classes(label_roots: dict[str, Path], padchest_raw: list) -> None:
    out = inspect_json("padchest-cl", "--data", f"padchest={label_roots['padchest']}")
    classes = Catalog().task("padchest-cl").spec.labels
    want = Counter()
    for terms, projection in padchest_raw:
        if terms and projection in ("PA", "AP", "AP_horizontal") and len(set(terms)) == 1 and terms[0] in classes:
            want[terms[0]] += 1
    assert out["n"] == sum(want.values())
    for c in classes:
        assert total(out, c, "pos") == want[c], c
        assert total(out, c, "missing") == 0


# ----------------------------------------------------------------------------------- real NIH sample


@pytest.mark.shared
def test_nih_sample_split_keeps_patients_on_one_side(tmp_path: Path) -> None:
    root = shared_data("nih-cxr-1000")
    data = load_task_data(Catalog().task("nih"), DataLocations(None, {"nih": root}), split_store=tmp_path)
    t = data.index.table
    assert t.height == 1000 and t["patient_id"].n_unique() == 264
    sides = t.group_by("patient_id").agg(pl.col("split").n_unique().alias("n"))
    assert sides["n"].max() == 1
    assert set(t["split"].unique()) == {"train", "val", "test"}
    again = load_task_data(Catalog().task("nih"), DataLocations(None, {"nih": root}))
    assert again.index.table["split"].to_list() == t["split"].to_list()  # deterministic
    # the CPU variant has the same split spec: it reads the split `nih` stored, same test images
    lowres = load_task_data(Catalog().task("nih-lowres"), DataLocations(None, {"nih": root}), split_store=tmp_path)
    assert lowres.split_source["reused"] and lowres.split_source["file"] == data.split_source["file"]


NIH_STEPS = "100"


@pytest.fixture(scope="session")
def nih_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real 64 px NIH sample end to end with cbr-small (nih-lowres: `nih` at 64 px, batch 64; see its YAML)."""
    root = shared_data("nih-cxr-1000")
    out = tmp_path_factory.mktemp("nih-run")
    proc = run_cli("run", "--backbone", "cbr-small", "--task", "nih-lowres", "--data", f"nih={root}",
                   "--seeds", "1", "--max-steps", NIH_STEPS, "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.shared
@pytest.mark.slow
def test_nih_sample_trains_above_chance(nih_run: Path) -> None:
    board = json.loads((nih_run / "leaderboard.json").read_text())
    entry = board["entries"][0]
    assert entry["task"] == "nih-lowres" and entry["headline"]["metric"] == "auc"
    assert entry["headline"]["mean"] > 0.55, entry["headline"]
    run = Path(entry["runs"][0])
    splits = pl.read_parquet(run / "splits.parquet")
    assert splits.height == 1000
    assert splits.group_by("patient_id").agg(pl.col("split").n_unique())["split"].max() == 1
    config = json.loads((run / "config.json").read_text())
    assert config["data"]["patients"]["train"] + config["data"]["patients"]["val"] + \
        config["data"]["patients"]["test"] == 264
    stored = Path(config["data"]["split"]["file"])
    assert stored.parent == nih_run / "splits" / "nih" and not config["data"]["split"]["reused"]
    preds = pl.read_parquet(run / "predictions" / "test.parquet")
    assert set(preds["patient_id"]) & set(splits.filter(pl.col("split") == "train")["patient_id"]) == set()


def test_stored_split_is_reused_and_checked(tmp_path: Path) -> None:
    task = Catalog().task("smoke-tb")
    store = tmp_path / "splits"
    first = load_task_data(task, DataLocations(), split_store=store)
    assert first.split_source["reused"] is False
    path = Path(first.split_source["file"])
    stored = pl.read_parquet(path)
    # move one whole patient (with several images) from train to test: later runs see the stored split
    counts = stored.filter(pl.col("split") == "train").group_by("patient_id").len().filter(pl.col("len") >= 2)
    patient = counts.sort("patient_id")["patient_id"][0]
    stored.with_columns(split=pl.when(pl.col("patient_id") == patient).then(pl.lit("test"))
                        .otherwise(pl.col("split"))).write_parquet(path)
    second = load_task_data(task, DataLocations(), split_store=store)
    assert second.split_source["reused"] is True and second.split_source["differs_from_recomputed"] >= 2
    assert set(second.index.table.filter(pl.col("patient_id") == patient)["split"]) == {"test"}
    # a stored split that puts a patient on two sides is refused
    ids = stored.filter(pl.col("patient_id") == patient)["sample_id"].to_list()
    stored.with_columns(split=pl.when(pl.col("sample_id") == ids[0]).then(pl.lit("train"))
                        .when(pl.col("sample_id") == ids[1]).then(pl.lit("test"))
                        .otherwise(pl.col("split"))).write_parquet(path)
    with pytest.raises(DataError, match=r"stored split puts patient_id .* on two sides"):
        load_task_data(task, DataLocations(), split_store=store)


def test_run_skips_ood_targets_without_data_and_reuses_the_stored_split(tmp_path: Path) -> None:
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "smoke-cxr-to-nih.yaml").write_text(
        f"task: smoke-cxr-to-nih\ninclude: {REPO / 'tasks' / 'smoke' / 'smoke-cxr.yaml'}\nood:\n"
        "  - {task: smoke-cxr-siteb, name: site-b}\n"
        "  - {task: nih, label_map: {Atelectasis: Atelectasis, Cardiomegaly: Cardiomegaly, "
        "Consolidation: Consolidation, Edema: Edema, Pleural Effusion: Effusion}}\n")
    out = tmp_path / "out"
    args = ["run", "--backbone", "cbr-tiny", "--task", "smoke-cxr-to-nih", "--tasks-dir", str(tasks),
            "--max-steps", "2", "--out", str(out)]
    proc = run_cli(*args, "--seeds", "1", env={"MEDBENCH_DATA_NIH": ""})
    assert proc.returncode == 0, proc.stderr[-2000:]
    first = json.loads(next((out / "runs" / "smoke-cxr-to-nih").rglob("config.json")).read_text())
    targets = {t["name"]: t for t in first["ood_targets"]}
    assert targets["site-b"]["n"] > 0
    assert "dataset 'nih' is not configured" in targets["nih"]["skipped"]
    entry = json.loads((out / "leaderboard.json").read_text())["entries"][0]
    assert set(entry["ood"]) == {"site-b"}
    assert first["data"]["split"]["reused"] is False
    # a later invocation in the same folder (seed 1) reads the split the first one stored
    proc = run_cli(*args, "--seeds", "2", env={"MEDBENCH_DATA_NIH": ""})
    assert proc.returncode == 0, proc.stderr[-2000:]
    configs = [json.loads(p.read_text()) for p in (out / "runs" / "smoke-cxr-to-nih").rglob("config.json")]
    second = next(c for c in configs if c["seed"] == 1)
    assert second["data"]["split"] == {**first["data"]["split"], "reused": True}


# ----------------------------------------------------------------------------------- tasks and harmonization


def test_label_harmonization_is_consistent() -> None:
    """Every chest task's OOD map covers its labels, names real target labels, and agrees with the reverse map."""
    catalog = Catalog()
    maps = {}
    for name in ["chexpert", "mimic-cxr", "nih", "padchest"]:
        task = catalog.task(name)
        assert task.spec.input.resize == 240 and task.spec.input.crop == 224 and task.spec.input.channels == 3
        targets = {t.task: t for t in task.spec.ood}
        assert set(targets) == {"chexpert", "mimic-cxr", "nih", "padchest"} - {name}
        for tgt_name, tgt in targets.items():
            pairs = _ood_label_pairs(task, catalog.task(tgt_name), tgt.label_map)
            assert [s for s, _ in pairs] == task.spec.labels
            maps[(name, tgt_name)] = dict(pairs)
    for (a, b), m in maps.items():
        assert {v: k for k, v in m.items()} == maps[(b, a)], (a, b)
    # CheXpert's five line up with one concept per position in every dataset
    concepts = {name: catalog.task(name).spec.labels for name in ["chexpert", "mimic-cxr", "nih", "padchest"]}
    assert concepts["chexpert"] == FIVE == concepts["mimic-cxr"]
    assert concepts["nih"] == ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Effusion"]
    assert concepts["padchest"] == ["atelectasis", "cardiomegaly", "consolidation", "pulmonary edema",
                                    "pleural effusion"]


def test_chest_suite_dry_run_without_data(tmp_path: Path) -> None:
    proc = run_cli("run", "--backbone", "cbr-tiny", "--suite", "chest-xray", "--dry-run",
                   env={"MEDBENCH_DATA": str(tmp_path / "nothing-here")})
    assert proc.returncode == 0, proc.stderr
    for task in CHEST_TASKS:
        assert task in proc.stdout
    text = " ".join(proc.stdout.split())
    assert "25 runs" in text and text.count("missing dataset") == 5
    for url in ("stanfordmlgroup.github.io/competitions/chexpert", "physionet.org/content/mimic-cxr-jpg",
                "nihcc.app.box.com/v/ChestXray-NIHCC", "bimcv.cipf.es/bimcv-projects/padchest"):
        assert url in text
    assert "images_001/images/" in text and "files/pXX/pSUBJECT/sSTUDY/DICOM_ID.jpg" in text


def test_inspect_works_for_synthetic_smoke_tasks() -> None:
    out = inspect_json("smoke-cxr")
    assert out["images"] == "in memory" and out["missing_files"] == 0 and out["root"] is None
    assert set(out["splits"]) == {"train", "val", "test"}
    assert sum(s["n"] for s in out["splits"].values()) == out["n"]
    assert total(out, "Edema", "missing") > 0  # synthetic uncertain labels read as U-Ignore
    assert set(out["splits"]["test"]["attributes"]) == {"sex", "age_group", "view"}  # one site: no attribute
    assert set(out["splits"]["test"]["attributes"]["age_group"]) <= {"[0, 40)", "[40, 65)", "[65, 200)"}


# ----------------------------------------------------------------------------------- one-line errors


@pytest.mark.parametrize(("case", "fragment"), [
    ("missing folder", "dataset folder of 'nih' not found"),
    ("missing column", "Data_Entry_2017_v2020.csv: Finding Labels: column 'Finding Labels' is missing"),
    ("bad label value", "Data_Entry_2017_v2020.csv: Finding Labels: unknown finding 'Efusion' on line 3"),
    ("not configured", "dataset 'nih' of task 'nih' is not configured: pass --data nih=PATH"),
])
def test_bad_inputs_are_one_line_errors(case: str, fragment: str, tmp_path: Path) -> None:
    root = tmp_path / "nih"
    header = "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position\n"
    rows = "00000001_000.png,Cardiomegaly,0,1,57,M,PA\n00000001_001.png,Efusion|Edema,1,1,58,M,PA\n"
    args = ["data", "inspect", "nih"]
    if case == "missing folder":
        args += ["--data", f"nih={root}"]
    elif case == "missing column":
        root.mkdir()
        (root / "Data_Entry_2017_v2020.csv").write_text(header.replace("Finding Labels,", "") +
                                                        rows.replace("Cardiomegaly,", "").replace("Efusion|Edema,", ""))
        args += ["--data", f"nih={root}"]
    elif case == "bad label value":
        root.mkdir()
        (root / "Data_Entry_2017_v2020.csv").write_text(header + rows)
        args += ["--data", f"nih={root}"]
    proc = run_cli(*args, env={"MEDBENCH_DATA_NIH": ""})
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert fragment in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
