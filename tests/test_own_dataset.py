"""A dataset of one's own (issue 17) and the data checks of issue 14 (items 6, 7, 9): a CSV task is checked
before training, its split counts rows without a split, image content keys the cache and the runs, an
evaluation-only set is scored as an OOD target, a built-in task is included by name."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from conftest import run_cli
from csv_datasets import make_csv_dataset

from medbench.data.locate import DataLocations
from medbench.errors import DataError, SpecError
from medbench.spec.catalog import Catalog

BINARY = """task: {name}
version: 1
family: own
dataset:
  name: mydata
  adapter: csv
  options:
    csv: labels.csv
    path_column: image
    path_root: images
    patient_column: patient
    label_columns: {{abnormal: abnormal}}
    sex_column: sex
    age_column: age
type: binary
labels: [abnormal]
metrics: [auc, accuracy]
headline: auc
splits: {{method: grouped, fractions: {{train: 0.6, val: 0.2, test: 0.2}}}}
input: {{resize: 24, crop: 20, channels: 1}}
hyperrule: {{batch_size: 16, base_lr: 0.3, schedule: [1, 2, 3, 4, 5], mixup_alpha: 0.0}}
default_seeds: 1
{extra}"""


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_csv_dataset(tmp_path_factory.mktemp("own") / "mydata", n_patients=60)


def write_task(folder: Path, name: str = "own", extra: str = "") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.yaml").write_text(BINARY.format(name=name, extra=extra))
    return folder


# --------------------------------------------------------------------------- stale pixels (issue 14 item 7)


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_replaced_images_get_a_new_cache_entry_and_run_key(dataset: Path, tmp_path: Path) -> None:
    """Issue 14 item 7: replacing every image with noise (same paths, same labels) reused the cached pixels
    (AUC 1.0 instead of 0.5) and an existing store's result. The file stamps (size + mtime) now key both."""
    from medbench.run.prepare import prepare_data
    from medbench.run.request import RunRequest
    from medbench.run.runner import Runner
    from medbench.store import RunStore

    data = _copy(dataset, tmp_path / "mydata")
    tasks = write_task(tmp_path / "tasks")
    catalog = Catalog([tasks])
    locations = DataLocations(overrides={"mydata": data})
    runner = Runner(catalog, locations, RunStore(tmp_path / "out"))
    req = RunRequest(task="own", backbone="cbr-tiny", seed=0)
    before = runner.prepared("own")
    folder_before = runner.locate(req)
    first = np.asarray(before.images.pixels[0]).copy()

    rng = np.random.default_rng(1)
    from PIL import Image

    for png in sorted((data / "images").glob("*.png")):
        st = png.stat()
        Image.fromarray(rng.integers(0, 256, (24, 24), dtype=np.uint8)).save(png)
        os.utime(png, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # a later write, as a copy makes
    after = prepare_data(catalog.task("own"), locations, runner.reporter)
    assert after.images.path != before.images.path  # a new cache entry, decoded from the new files
    assert after.fingerprint != before.fingerprint  # the run key's data fingerprint
    row0 = before.data.index.table["path"][0]
    expected = np.asarray(Image.open(data / row0).convert("L").resize((24, 24), Image.BILINEAR))
    assert np.array_equal(np.asarray(after.images.pixels[0])[0], expected)
    assert not np.array_equal(np.asarray(after.images.pixels[0]), first)
    fresh = Runner(catalog, locations, RunStore(tmp_path / "out"))
    assert fresh.locate(req).path != folder_before.path  # an existing store does not reuse the old run


def test_content_check_catches_what_size_and_mtime_cannot(dataset: Path, tmp_path: Path) -> None:
    """A file rewritten with the same size and its old mtime restored keeps its stat stamp (the documented
    limit of the cheap check); --verify-pixels (sha256 of every file) changes the keys."""
    from medbench.data.cache import row_paths
    from medbench.data.fingerprint import file_stamps
    from medbench.run.prepare import prepare_data
    from medbench.run.runner import SilentReporter

    from PIL import Image

    data = _copy(dataset, tmp_path / "mydata")
    victim = data / "images" / "P0001_a.png"
    Image.open(victim).save(victim, compress_level=0)  # uncompressed: any 24x24 grey image has this size
    catalog = Catalog([write_task(tmp_path / "tasks")])
    stat_loc = DataLocations(overrides={"mydata": data})
    content_loc = DataLocations(overrides={"mydata": data}, pixel_check="content")
    stat_before = prepare_data(catalog.task("own"), stat_loc, SilentReporter())
    content_before = prepare_data(catalog.task("own"), content_loc, SilentReporter())
    assert content_before.fingerprint != stat_before.fingerprint  # the mode is part of the key
    st = victim.stat()
    noise = np.random.default_rng(2).integers(0, 256, (24, 24), dtype=np.uint8)
    Image.fromarray(noise).save(victim, compress_level=0)
    assert victim.stat().st_size == st.st_size
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))  # a tool that restores the old mtime
    assert prepare_data(catalog.task("own"), stat_loc, SilentReporter()).fingerprint == stat_before.fingerprint
    assert prepare_data(catalog.task("own"), content_loc, SilentReporter()).fingerprint != content_before.fingerprint
    # the stamps themselves, against an independent reading of the file system
    import hashlib

    paths = row_paths(stat_before.data.index)
    stats = file_stamps(data, paths, "stat")
    sums = file_stamps(data, paths, "content")
    for p, s, c in zip(paths, stats, sums):
        st = os.stat(data / p)
        assert s == f"{st.st_size}:{st.st_mtime_ns}"
        assert c == hashlib.sha256((data / p).read_bytes()).hexdigest()


# --------------------------------------------------------------------------- checks before training


def _one_line_exit_2(proc, where: Path, field: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("medbench: error:")]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"medbench: error: {where}: {field}: "), lines[0]
    return lines[0]


@pytest.mark.parametrize("case", ["misspelled-attribute", "single-group-attribute", "one-class-train"])
def test_checks_refuse_before_training_in_one_line(dataset: Path, tmp_path: Path, case: str) -> None:
    """Issue 17: a misspelled attribute trained in full and then failed writing the leaderboard; an attribute
    with one group and a training split with one class (issue 14 item 9: every value mapped to negative)
    trained to exit 0 with undefined numbers. Each is now one line naming the task file and the field, with
    what was seen and the option that fixes it, exit 2, and no run folder."""
    extra, options = {
        "misspelled-attribute": ("attributes: [sex, scaner]\n", ""),
        "single-group-attribute": ("attributes: [sex, site]\n", "    site: Hospital A\n"),
        "one-class-train": ("", '    value_map: {"1": 0, "0": 0, "": null}\n'),
    }[case]
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    text = BINARY.format(name="own", extra=extra).replace("    age_column: age\n", "    age_column: age\n" + options)
    (tasks / "own.yaml").write_text(text)
    out = tmp_path / "out"
    proc = run_cli("run", "-b", "cbr-tiny", "-t", "own", "--tasks-dir", str(tasks), "--data", f"mydata={dataset}",
                   "--out", str(out))
    field = {"misspelled-attribute": "attributes[1]", "single-group-attribute": "attributes[1]",
             "one-class-train": "labels"}[case]
    line = _one_line_exit_2(proc, tasks / "own.yaml", field)
    expected = {
        "misspelled-attribute": "column 'scaner' is not in the dataset (did you mean 'scanner'?)",
        "single-group-attribute": "attribute 'site' has one group in the test split (column 'site': "
                                  "{'Hospital A': ",
        "one-class-train": "label 'abnormal' has one class in the train split (0 positive, ",
    }[case]
    assert expected in line
    fix = {"misspelled-attribute": "expected one of: ", "single-group-attribute": "remove it from attributes",
           "one-class-train": "no image of the dataset is positive for it: check how its values map "
                              "(dataset.options: label_columns/value_map"}[case]
    assert fix in line
    assert not (out / "runs").exists()  # nothing trained


def test_data_inspect_prints_prevalence_and_the_problems(dataset: Path, tmp_path: Path) -> None:
    tasks = write_task(tmp_path / "tasks", extra="attributes: [sex, scaner]\n")
    proc = run_cli("data", "inspect", "own", "--tasks-dir", str(tasks), "--data", f"mydata={dataset}", "--json",
                   "--check")
    assert proc.returncode == 2 and "would stop 'medbench run' before training" in proc.stderr
    summary = json.loads(proc.stdout)
    assert len(summary["problems"]) == 1 and "did you mean 'scanner'?" in summary["problems"][0]
    # prevalence per split against a count of the CSV rows of each split's patients
    table = pl.read_csv(dataset / "labels.csv")
    catalog = Catalog([tasks])
    from medbench.data.task_data import load_task_data

    split_of = dict(zip(*load_task_data(catalog.task("own"), DataLocations(overrides={"mydata": dataset}))
                        .index.table.select("patient_id", "split").unique().to_dict(as_series=False).values()))
    for split in ("train", "val", "test"):
        rows = [r for r in table.iter_rows(named=True) if split_of[r["patient"]] == split]
        pos = sum(r["abnormal"] == 1 for r in rows)
        got = summary["splits"][split]["labels"]["abnormal"]
        assert (got["pos"], got["neg"]) == (pos, len(rows) - pos)
        assert got["prevalence"] == pytest.approx(pos / len(rows))
    text = run_cli("data", "inspect", "own", "--tasks-dir", str(tasks), "--data", f"mydata={dataset}")
    assert text.returncode == 0  # without --check the summary is the answer
    assert "problem: " in text.stdout and "did you mean 'scanner'?" in text.stdout
    assert f"({100 * summary['splits']['test']['labels']['abnormal']['prevalence']:.1f} %)" in text.stdout


def test_csv_blank_split_cells_are_left_out_and_counted(dataset: Path, tmp_path: Path) -> None:
    """Issue 14 item 6 through a csv task: a blank cell of the split column crashed carving validation."""
    from medbench.data.task_data import load_task_data

    data = _copy(dataset, tmp_path / "mydata")
    table = pl.read_csv(data / "labels.csv", infer_schema=False)
    first = table["patient"][0]
    table = table.with_columns(split=pl.when(pl.col("patient") == first).then(None)
                               .when(pl.col("split") == "val").then(pl.lit("train")).otherwise(pl.col("split")))
    table.write_csv(data / "labels.csv")
    blank = int((table["patient"] == first).sum())
    tasks = write_task(tmp_path / "tasks", extra="")
    text = (tasks / "own.yaml").read_text().replace("    age_column: age\n", "    age_column: age\n"
                                                    "    split_column: split\n")
    text = text.replace("splits: {method: grouped, fractions: {train: 0.6, val: 0.2, test: 0.2}}",
                        "splits: {method: official, val_fraction: 0.2}")
    (tasks / "own.yaml").write_text(text)
    data_ = load_task_data(Catalog([tasks]).task("own"), DataLocations(overrides={"mydata": data}))
    assert data_.index.table.height == table.height - blank
    assert first not in set(data_.index.table["patient_id"])
    assert data_.index.notes["rows_without_official_split"] == f"{blank} left out (no official split)"
    assert set(data_.index.table["split"]) == {"train", "val", "test"}


# --------------------------------------------------------------------------- evaluation-only sets, builtin include

EXTERNAL = """task: external
version: 1
family: own
dataset:
  name: external
  adapter: csv
  options: {{csv: labels.csv, path_column: image, path_root: images, patient_column: patient,
            label_columns: {{abnormal: abnormal}}}}
type: binary
labels: [abnormal]
splits: {{method: grouped, fractions: {{test: 1}}}}
input: {input}
"""


def test_evaluation_only_set_is_scored_whole_as_an_ood_target(dataset: Path, tmp_path: Path) -> None:
    """Issue 17: an external set could only be an OOD target with train > 0 fractions, so only a slice of it
    was scored; now ``fractions: {test: 1}`` scores all of it, and it cannot be trained."""
    external = make_csv_dataset(tmp_path / "external", n_patients=30, site="B")
    tasks = write_task(tmp_path / "tasks", extra="ood: [{task: external}]\n")
    (tasks / "external.yaml").write_text(EXTERNAL.format(input="{resize: 24, crop: 20, channels: 1}"))
    out = tmp_path / "out"
    args = ["--tasks-dir", str(tasks), "--data", f"mydata={dataset}", "--data", f"external={external}",
            "--out", str(out)]
    proc = run_cli("run", "-b", "cbr-tiny", "-t", "own", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = (out / "runs" / "own" / "cbr-tiny").iterdir()
    ood = pl.read_parquet(run / "predictions" / "ood-external.parquet")
    assert ood.height == pl.read_csv(external / "labels.csv").height  # every image, not a slice
    result = json.loads((run / "result.json").read_text())
    assert result["metrics"]["ood"]["external"]["auc"] is not None
    refused = run_cli("run", "-b", "cbr-tiny", "-t", "external", *args)
    line = _one_line_exit_2(refused, tasks / "external.yaml", "splits.fractions")
    assert "is evaluation-only" in line and "OOD target" in line


def test_ood_target_input_mismatch_says_how_to_align(dataset: Path, tmp_path: Path) -> None:
    """Issue 17: the message ended mid-sentence ('align their input:')."""
    from medbench.run.request import RunRequest
    from medbench.run.runner import Runner
    from medbench.store import RunStore

    external = make_csv_dataset(tmp_path / "external", n_patients=12, site="B")
    tasks = write_task(tmp_path / "tasks", extra="ood: [{task: external}]\n")
    (tasks / "external.yaml").write_text(EXTERNAL.format(input="{resize: 32, crop: 28, channels: 3}"))
    runner = Runner(Catalog([tasks]), DataLocations(overrides={"mydata": dataset, "external": external}),
                    RunStore(tmp_path / "out"))
    with pytest.raises(DataError) as err:
        runner.preflight([RunRequest(task="own", backbone="cbr-tiny", seed=0)])
    assert str(err.value) == (f"{tasks / 'own.yaml'}: ood: OOD target 'external' is cached at 32px/3ch, the task at "
                              f"24px/1ch; give both the same input (input: {{resize: 24, crop: 20, channels: 1}} in "
                              f"{tasks / 'external.yaml'})")


def test_include_a_builtin_task_by_name(tmp_path: Path) -> None:
    """Issue 17: a built-in task could only be included by its absolute path inside site-packages."""
    from medbench.resources import builtin_tasks_dir
    from medbench.spec import parse_task_file

    (tmp_path / "a.yaml").write_text("task: my-chexpert\ninclude: builtin:chexpert\nhyperrule: {batch_size: 64}\n")
    mine = parse_task_file(tmp_path / "a.yaml").spec
    builtin = parse_task_file(builtin_tasks_dir() / "chest-xray" / "chexpert.yaml").spec
    assert mine.hyperrule.batch_size == 64
    assert mine.model_dump(exclude={"task", "hyperrule"}) == builtin.model_dump(exclude={"task", "hyperrule"})
    (tmp_path / "b.yaml").write_text("task: my-base\ninclude: builtin:_chest-xray-base\ntype: binary\n"
                                     "labels: [Edema]\ndataset: {name: nih, adapter: nih}\n")
    assert parse_task_file(tmp_path / "b.yaml").spec.input.crop == 224
    (tmp_path / "c.yaml").write_text("task: x\ninclude: builtin:chexpret\n")
    with pytest.raises(SpecError) as err:
        parse_task_file(tmp_path / "c.yaml")
    assert str(err.value).startswith(f"{tmp_path / 'c.yaml'}: include: no built-in task or base file 'chexpret' "
                                     "(did you mean 'chexpert'?)")


def test_an_unavailable_attribute_is_reported_in_the_board_not_a_schema_failure(tmp_path: Path) -> None:
    """Issue 17: a run whose attribute has no column in the predictions failed writing the leaderboard
    (``entries[0].fairness.attributes.tisue.groups: required field is missing``) after training."""
    from fake_runs import task_spec, write_run

    from medbench.board.aggregate import write_leaderboard
    from medbench.board.render import render_markdown
    from medbench.store.scores import rescore

    spec = task_spec("smoke-cxr")
    spec["attributes"] = [*spec["attributes"], {"name": "tisue", "column": None, "bins": None}]
    runs = []
    for seed in (0, 1):
        run = write_run(tmp_path / "store", seed=seed, spec=spec)
        rescore(run, {"bootstrap": 20})
        runs.append(run)
    board = write_leaderboard(runs, tmp_path / "board.json")
    block = board["entries"][0]["fairness"]["attributes"]["tisue"]
    assert block["groups"] == {} and block["status"] == "unavailable"
    assert "'tisue' is not in the predictions" in block["reason"]
    assert "| tisue | unavailable" in render_markdown(board)


# --------------------------------------------------------------------------- medbench task new


def test_task_new_proposes_columns_from_the_csv(tmp_path: Path) -> None:
    """Ids without a suffix in a sub-folder, a 'subject' column, a two-valued class column, the publisher's
    split under other names, sex/site columns by name, and an attribute with one group left out."""
    from PIL import Image

    from medbench.data.scaffold import checked_proposal, propose, task_yaml
    from medbench.data.task_data import load_task_data
    from medbench.spec import parse_task_file

    root = tmp_path / "derm"
    (root / "imgs").mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines = ["file,subject,finding,gender,hospital,fold,device"]
    for i in range(60):
        Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(root / "imgs" / f"im{i:03d}.png")
        fold = "testing" if (i // 2) % 5 == 0 else "training"
        lines.append(f"im{i:03d},s{i // 2},{'malignant' if i % 3 == 0 else 'benign'},{'FM'[i % 2]},H{i % 2},"
                     f"{fold},D1")
    (root / "meta.csv").write_text("\n".join(lines) + "\n")
    p = propose("derm-x", root / "meta.csv")
    assert p.type == "binary" and p.labels == ["malignant"]
    o = p.options
    assert (o["csv"], o["path_column"], o["path_root"], o["path_suffix"]) == ("meta.csv", "file", "imgs", ".png")
    assert o["patient_column"] == "subject" and o["split_column"] == "fold"
    assert o["split_values"] == {"testing": "test", "training": "train"}
    assert o["classes"] == {"malignant": ["malignant"]} and o["negative_values"] == ["benign"]
    assert (o["sex_column"], o["site_column"]) == ("gender", "hospital")
    assert p.splits["method"] == "official"
    names = [a if isinstance(a, str) else a["name"] for a in p.attributes]
    assert names == ["sex", "site"]  # 'device' has one value: no attribute at all
    p.attributes.append("device")  # as a user would add it: the check leaves it out, with the reason
    p, problems = checked_proposal(p, tmp_path)
    assert problems == [] and p.attributes == ["sex", "site"]
    text = task_yaml(p)
    assert "# left out: device: attribute 'device' has one group in the test split" in text
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "derm-x.yaml").write_text(text)
    data = load_task_data(parse_task_file(tmp_path / "tasks" / "derm-x.yaml"),
                          DataLocations(overrides={"derm-x": root}))
    expected = [1 if i % 3 == 0 else 0 for i in range(60)]
    assert data.index.table.sort("sample_id")["label:malignant"].to_list() == expected
    assert data.index.table["patient_id"].n_unique() == 30


def test_task_new_cli_writes_the_yaml_and_never_overwrites(dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "tasks" / "mine.yaml"
    args = ["task", "new", "mine", "--csv", str(dataset / "labels.csv"), "--label", "diagnosis", "--out", str(out)]
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr
    assert "type: multiclass" in out.read_text() and "labels: [benign, malignant, normal]" in out.read_text()
    assert "task mine (dataset mine, adapter csv" in proc.stdout and "next: medbench data inspect mine" in proc.stdout
    before = out.read_text()
    again = run_cli(*args)
    assert again.returncode == 2 and "exists; choose another --out or pass --force" in again.stderr
    assert out.read_text() == before
