"""The command line end to end: the smoke suite, determinism, reuse, plans and errors."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
from conftest import run_cli

SMOKE_TASKS = ["smoke-cxr", "smoke-padchest", "smoke-tb", "smoke-covidx", "smoke-derm", "smoke-mammo"]


def test_smoke_suite_leaderboard(smoke_run: Path) -> None:
    board = json.loads((smoke_run / "leaderboard.json").read_text())
    assert board["schema"] == "medbench-leaderboard"
    by_task = {e["task"]: e for e in board["entries"]}
    assert sorted(by_task) == sorted(SMOKE_TASKS)
    for task, e in by_task.items():
        assert e["backbone"] == "cbr-small" and e["init"] == "random"
        assert e["seeds"] == [0, 1]
        assert e["headline"]["metric"] == "auc" and e["headline"]["n"] == 2
        assert e["headline"]["mean"] > 0.6, (task, e["headline"])
        assert e["headline"]["std"] is not None
        assert "accuracy" in e["metrics"] and "site-b" in e["ood"]
        prov = e["provenance"]
        assert len(prov["task_hash"]) == 64 and prov["task_version"] == 1
        assert prov["engine"]["engine"] == "deepspeed" and prov["device"]["device"] == "cpu"
        assert prov["libraries"]["deepspeed"] and prov["model"]["init"] == "random"
    assert len(by_task["smoke-cxr"]["metrics"]) >= 2 + 2 * 5  # per-label AUC and accuracy


def test_run_folder_holds_predictions_and_provenance(smoke_run: Path) -> None:
    runs = sorted((smoke_run / "runs" / "smoke-cxr" / "cbr-small").iterdir())
    assert len(runs) == 2
    run = runs[0]
    for name in ("config.json", "history.json", "metrics.json", "result.json", "splits.parquet",
                 "predictions/test.parquet", "predictions/val.parquet", "predictions/ood-site-b.parquet"):
        assert (run / name).is_file(), name
    preds = pl.read_parquet(run / "predictions" / "test.parquet")
    config = json.loads((run / "config.json").read_text())
    assert preds.height == config["data"]["n"]["test"]
    assert {"sample_id", "patient_id", "sex", "age", "site", "label:Edema", "prob:Edema"} <= set(preds.columns)
    splits = pl.read_parquet(run / "splits.parquet")
    sides = splits.group_by("patient_id").agg(pl.col("split").n_unique())
    assert sides["split"].max() == 1  # no patient on two sides
    history = json.loads((run / "history.json").read_text())
    assert len(history["loss"]) == config["plan"]["total_steps"] == 50
    assert history["val_step"] == [10, 20, 30, 40, 50] and len(history["val_metric"]) == 5  # validation_points: 5
    result = json.loads((run / "result.json").read_text())
    assert result["status"] == "ok" and result["key"] == config["key"]


def test_same_command_twice_gives_identical_metrics(tmp_path: Path) -> None:
    args = ["run", "--backbone", "cbr-tiny", "--task", "smoke-covidx", "--task", "smoke-cxr", "--seeds", "1",
            "--max-steps", "12"]
    boards = []
    for name, fresh in (("a", False), ("b", True)):  # b in a fresh interpreter: nothing carried over in memory
        proc = run_cli(*args, "--out", str(tmp_path / name), fresh=fresh)
        assert proc.returncode == 0, proc.stderr[-2000:]
        boards.append(json.loads((tmp_path / name / "leaderboard.json").read_text()))
    metrics = [[(e["task"], e["metrics"], e["ood"]) for e in b["entries"]] for b in boards]
    assert metrics[0] == metrics[1]
    # a rerun into the same folder reuses the completed runs
    proc = run_cli(*args, "--out", str(tmp_path / "a"))
    assert proc.returncode == 0 and "2 run(s) were already complete and reused" in proc.stdout
    assert "other complete run" not in proc.stdout
    # the leaderboard holds this command's runs; the store's others are pointed out, not silently dropped
    proc = run_cli("run", "--backbone", "cbr-tiny", "--task", "smoke-covidx", "--seeds", "1", "--max-steps", "12",
                   "--out", str(tmp_path / "a"))
    assert proc.returncode == 0 and "1 run(s) were already complete and reused" in proc.stdout
    assert f"1 other complete run(s) in {tmp_path / 'a'} are not in this leaderboard" in " ".join(proc.stdout.split())
    assert [e["task"] for e in json.loads((tmp_path / "a" / "leaderboard.json").read_text())["entries"]] == \
        ["smoke-covidx"]


def test_medbench_threads_is_the_default_of_threads(tmp_path: Path) -> None:
    """MEDBENCH_THREADS sets torch's threads of a run (the test workers use it to share the cores), --threads
    overrides it, and a bad value is one line naming the variable."""
    base = ["run", "--backbone", "cbr-tiny", "--task", "smoke-tb", "--seeds", "1", "--max-steps", "1"]
    for name, env, extra, expected in (("env", {"MEDBENCH_THREADS": "1"}, [], 1),
                                       ("flag", {"MEDBENCH_THREADS": "1"}, ["--threads", "2"], 2)):
        proc = run_cli(*base, *extra, "--out", str(tmp_path / name), env=env)
        assert proc.returncode == 0, proc.stderr[-2000:]
        (result,) = (tmp_path / name / "runs").glob("*/*/*/result.json")
        assert json.loads(result.read_text())["provenance"]["device"]["torch_threads"] == expected, name
    proc = run_cli(*base, "--out", str(tmp_path / "bad"), env={"MEDBENCH_THREADS": "0"})
    assert proc.returncode == 2 and "MEDBENCH_THREADS" in proc.stderr and "--threads" in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and not (tmp_path / "bad").exists()


def test_real_bit_architecture_runs(tmp_path: Path) -> None:
    proc = run_cli("run", "--backbone", "bit-m-r50x1", "--init", "random", "--task", "smoke-tb", "--max-steps", "2",
                   "--seeds", "1", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    entry = json.loads((tmp_path / "leaderboard.json").read_text())["entries"][0]
    assert entry["backbone"] == "bit-m-r50x1" and entry["init"] == "random"
    assert entry["provenance"]["model"]["params_total"] > 23_000_000


def test_dry_run_plans_without_data(tmp_path: Path) -> None:
    proc = run_cli("run", "--backbone", "bit-m-r101x3", "--suite", "smoke", "--dry-run", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    for task in SMOKE_TASKS:
        assert task in proc.stdout
    assert "12 runs" in proc.stdout and "device-hours" in proc.stdout
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_suite_all_plans_the_whole_protocol_without_data(tmp_path: Path) -> None:
    """The GPU users' command plans every task of the six families here, where no dataset exists, and says
    for each missing dataset where to get it; nothing is written."""
    env = {"MEDBENCH_DATA": str(tmp_path / "no-data")}
    proc = run_cli("run", "--backbone", "bit-m-r101x3", "--suite", "all", "--dry-run", "--seeds", "5", env=env,
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = " ".join(proc.stdout.split())
    tasks = ["chexpert", "padchest", "padchest-cl", "tuberculosis", "covidx", "ham10000", "cbis-ddsm", "vindr-mammo"]
    for task in tasks:
        assert f"missing dataset '{task.removesuffix('-cl')}' for {task}" in out
    assert f"{5 * len(tasks)} runs" in out and "device-hours" in out
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("args", "fragment"), [
    (["run", "--backbone", "cbr-smal", "--suite", "smoke"], "unknown backbone 'cbr-smal' (did you mean 'cbr-small'"),
    (["run", "--backbone", "cbr-small", "--suite", "smok"], "unknown suite 'smok' (did you mean 'smoke'"),
    (["run", "--backbone", "cbr-small"], "name at least one --suite or --task"),
    (["run", "--backbone", "cbr-small", "--task", "smoke-tb", "--data", "nih"], "--data: expected NAME=PATH"),
    (["run", "--backbone", "cbr-small", "--task", "smoke-tb", "--init", "gaussian"], "unknown init scheme"),
    (["run", "--backbone", "bit-m-r50x1", "--task", "smoke-tb", "--max-steps", "1"], "--init random"),
    (["score", "/nonexistent/run"], "no completed run folders found"),
])
def test_user_errors_are_one_line_exit_2(args: list[str], fragment: str, tmp_path: Path) -> None:
    proc = run_cli(*args, "--out", str(tmp_path)) if args[0] == "run" else run_cli(*args)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert fragment in proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0


def test_list_commands_json() -> None:
    proc = run_cli("list", "backbones", "--json")
    names = {b["name"]: b for b in json.loads(proc.stdout)}
    assert names["cbr-small"]["params"] == 2_113_536 and names["bit-m-r152x4"]["pretraining"] == "ImageNet-21k"
    suites = {s["name"] for s in json.loads(run_cli("list", "suites", "--json").stdout)}
    assert "smoke" in suites
    tasks = {t["name"]: t for t in json.loads(run_cli("list", "tasks", "--json").stdout)}
    assert tasks["smoke-derm"]["labels"] == 7 and tasks["smoke-derm"]["source"] == "builtin"


def test_score_recomputes_from_predictions(smoke_run: Path, tmp_path: Path) -> None:
    import shutil

    # a copy: the session's smoke store is shared by tests running in parallel
    run = shutil.copytree(sorted((smoke_run / "runs" / "smoke-tb" / "cbr-small").iterdir())[0], tmp_path / "run")
    before = json.loads((run / "metrics.json").read_text())
    (run / "metrics.json").unlink()
    proc = run_cli("score", str(run))
    assert proc.returncode == 0, proc.stderr
    assert json.loads((run / "metrics.json").read_text()) == before


def test_single_process_runs_open_no_port(tmp_path: Path) -> None:
    """A single-process run uses an in-memory store: a busy MASTER_PORT (e.g. inherited) cannot break it."""
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        env = {"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(busy.getsockname()[1])}
        proc = run_cli("run", "--backbone", "cbr-tiny", "--task", "smoke-tb", "--seeds", "1", "--max-steps", "2",
                       "--out", str(tmp_path), env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_smoke_leaderboard_carries_every_axis(smoke_run: Path) -> None:
    """Every axis per entry, aggregated over the 2 seeds with intervals; the synthetic site shift shows a
    drop, the harder subgroup (female patients) a gap, temperature scaling a lower ECE."""
    board = json.loads((smoke_run / "leaderboard.json").read_text())
    entries = {e["task"]: e for e in board["entries"]}
    drops, ece_lower, f_worst = 0, 0, 0
    for task, e in entries.items():
        metric = e["headline"]["metric"]
        assert e["headline"]["ci"]["low"] < e["headline"]["mean"] < e["headline"]["ci"]["high"], task
        assert e["metrics"]["accuracy"]["ci"] is not None and e["ood"]["site-b"][metric]["ci"] is not None
        cal = e["calibration"]
        for which in ("before", "after"):
            for m in ("ece", "mce", "brier", "nll"):
                assert cal[which][m]["n"] == 2 and cal[which][m]["ci"] is not None, (task, which, m)
        ece_lower += cal["after"]["ece"]["mean"] < cal["before"]["ece"]["mean"]
        attrs = e["fairness"]["attributes"]
        assert {"sex", "age_group", "sex & age_group"} <= set(attrs)
        # one site per task and one view in the tuberculosis and dermatology families: not attributes (an
        # attribute with one group is refused before training)
        assert "site" not in attrs and (("view" in attrs) == (task not in ("smoke-tb", "smoke-derm")))
        sex = attrs["sex"]
        assert sex["groups"]["F"]["status"] == "ok" and sex["gap"]["auc"]["ci"] is not None
        # binary/multilabel thresholds are chosen on validation; multiclass decisions are the argmax
        multiclass = task in ("smoke-covidx", "smoke-derm")
        assert e["fairness"]["operating_point"]["chosen_on"] == (None if multiclass else "val"), task
        f_worst += sex["worst_group"]["auc"] == "F" and sex["groups"]["F"]["auc"]["mean"] < sex["groups"]["M"]["auc"]["mean"]
        shift = e["shift"]["site-b"][metric]
        assert shift["in_distribution"]["mean"] == pytest.approx(e["headline"]["mean"])
        drops += shift["drop"]["mean"] > 0 and shift["relative_drop"]["mean"] > 0
        conv = e["convergence"]
        assert conv["steps_to_95"]["n"] == 2 and conv["steps_to_95"]["mean"] <= conv["steps_to_99"]["mean"] <= 50
        for run in e["runs"]:
            assert (Path(run) / "calibration" / "reliability-test.png").is_file()
            assert (Path(run) / "bootstrap.parquet").is_file()
    # the suite's own variant runs (tasks/suites/smoke.yaml): data efficiency and resolution on smoke-mammo
    mammo = entries["smoke-mammo"]
    assert len(mammo["variant_runs"]) == 6  # 3 variants x 2 seeds
    fraction = mammo["data_efficiency"]["fraction"]
    assert [p["fraction"] for p in fraction["points"]] == [0.25, 1.0]
    assert fraction["area"]["n"] == 2 and fraction["area"]["ci"] is not None
    (shots,) = mammo["data_efficiency"]["shots"]["points"]
    assert shots["shots"] == 10 and shots["n_train"]["mean"] == 20 and shots["metrics"]["auc"]["n"] == 2
    assert [p["crop"] for p in mammo["resolution"]["points"]] == [24, 28]
    assert all("data_efficiency" not in e and "resolution" not in e for t, e in entries.items() if t != "smoke-mammo")
    assert drops == len(entries)  # site B is harder for every task
    assert f_worst >= len(entries) - 1  # the female subgroup carries the weaker signal
    assert ece_lower >= len(entries) - 1
    matrix = board["shift_matrix"][0]
    assert len(matrix["rows"]) == 6 and len(matrix["cells"]) == 12
