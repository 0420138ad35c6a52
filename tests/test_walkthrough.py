"""docs/own-dataset.md, followed to the letter: every command and every task file of the page, read out of the
Markdown, run in order on a generated dataset in the documented layout (tests/csv_datasets.py). A ``medbench``
line runs as the command line itself (conftest.run_cli: a process of its own, without a shell), any other
line through bash."""

from __future__ import annotations

import json
import os
import re
import shlex
import stat
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest
from conftest import PROCESS_GROUP_VARS, REPO, run_cli
from csv_datasets import make_csv_dataset

DOC = REPO / "docs" / "own-dataset.md"
#: what makes a line of the page need a shell (a redirection, a pipe, a variable, a glob, several commands)
SHELL = re.compile(r"[|&;<>$`*?(){}\\]")

pytestmark = pytest.mark.slow


def doc_steps(text: str) -> list[tuple[str, str]]:
    """("file", "PATH\\nCONTENT") for YAML blocks starting ``# file: PATH``, ("run", COMMAND) for each line of a bash
    block, ("csv", BLOCK) for the CSV excerpt, in page order."""
    steps = []
    for lang, body in re.findall(r"^```(\w*)\n(.*?)^```", text, flags=re.M | re.S):
        if lang == "yaml":
            first, _, rest = body.partition("\n")
            m = re.match(r"# file: (\S+)$", first)
            assert m, f"a YAML block of the walkthrough names its file on its first line: {first!r}"
            steps.append(("file", f"{m.group(1)}\n{body}"))
        elif lang == "bash":
            steps += [("run", ln.strip()) for ln in body.splitlines() if ln.strip() and not ln.startswith("#")]
        elif lang == "csv":
            steps.append(("csv", body))
    return steps


def test_the_page_has_commands_for_every_part() -> None:
    steps = doc_steps(DOC.read_text())
    commands = [s for kind, s in steps if kind == "run"]
    assert any(c.startswith("medbench task new") for c in commands)
    assert sum(c.startswith("medbench run") and "--dry-run" not in c for c in commands) >= 3
    assert any(c.startswith("medbench render") for c in commands)
    files = [s.split("\n", 1)[0] for kind, s in steps if kind == "file"]
    assert "tasks/external.yaml" in files and "tasks/_cpu.yaml" in files


def test_walkthrough_commands_run_on_a_dataset_in_the_documented_layout(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MEDBENCH_PROGRESS", raising=False)  # the page's default: plain lines in a log
    make_csv_dataset(tmp_path / "mydata", n_patients=80, seed=3)
    make_csv_dataset(tmp_path / "external", n_patients=40, seed=4, site="B", with_split=False)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    wrapper = bin_dir / "medbench"  # the console script, running this checkout
    wrapper.write_text(f"#!/bin/sh\nexec {sys.executable} -m medbench.cli \"$@\"\n")
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IEXEC)
    env = {k: v for k, v in os.environ.items() if k not in PROCESS_GROUP_VARS}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    timings, outputs = [], {}
    for kind, body in doc_steps(DOC.read_text()):
        if kind == "csv":
            header = body.splitlines()[0]
            assert header == (tmp_path / "mydata" / "labels.csv").read_text().splitlines()[0]
            continue
        if kind == "file":
            path, content = body.split("\n", 1)
            (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / path).write_text(content)
            continue
        start = time.monotonic()
        words = shlex.split(body)
        if words[0] == "medbench" and not SHELL.search(body):  # the command line itself, without a shell
            proc = run_cli(*words[1:], env=env, cwd=tmp_path)
        else:
            proc = subprocess.run(["bash", "-c", body], cwd=tmp_path, env=env, capture_output=True, text=True,
                                  timeout=900)
        timings.append((time.monotonic() - start, body))
        assert proc.returncode == 0, f"{body}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
        outputs[body] = proc
    total = sum(t for t, _ in timings)
    print(f"\nwalkthrough: {len(timings)} commands, {total:.0f} s")
    for t, cmd in timings:
        print(f"  {t:6.1f} s  {cmd}")

    # what the page says happened, checked on the files
    proposal = (tmp_path / "tasks" / "mydata-abnormal.yaml").read_text()
    assert "label_columns: {abnormal: abnormal}" in proposal and "patient_column: patient" in proposal
    assert "type: multiclass" in (tmp_path / "tasks" / "mydata-diagnosis.yaml").read_text()
    assert "type: multilabel" in (tmp_path / "tasks" / "mydata-findings.yaml").read_text()
    dry = next(p for c, p in outputs.items() if "--dry-run" in c)
    assert f"{0.3 * 32 / 512:.3g}" in dry.stdout and "time/run" in dry.stdout
    first_run = next(p for c, p in outputs.items() if c.startswith("medbench run") and "--dry-run" not in c)
    log = first_run.stderr
    assert "run 1/1 started: mydata-abnormal seed 0" in log and "step 40/40 (100%)" in log and "\x1b" not in log
    runs = {p.parent.name for p in (tmp_path / "results" / "runs").glob("*/cbr-small")}
    assert runs == {"mydata-abnormal", "mydata-diagnosis", "mydata-findings", "mydata-abnormal-ood"}
    (ood_run,) = (tmp_path / "results" / "runs" / "mydata-abnormal-ood" / "cbr-small").iterdir()
    scored = pl.read_parquet(ood_run / "predictions" / "ood-other-hospital.parquet")
    assert scored.height == pl.read_csv(tmp_path / "external" / "labels.csv").height  # the whole external set
    result = json.loads((ood_run / "result.json").read_text())
    assert result["metrics"]["shift"]["other-hospital"]["auc"]["drop"] is not None
    board = (tmp_path / "results" / "board.md").read_text()
    for section in ("## Calibration", "## Fairness", "## OOD shift", "## Convergence", "## Provenance"):
        assert section in board
    grouped = next(p for c, p in outputs.items() if "inspect mydata-grouped" in c).stdout
    pattern = next(p for c, p in outputs.items() if "inspect mydata-pattern" in c).stdout
    patients = re.search(r"(\d+) patients", grouped).group(1)
    assert f"{patients} patients" in pattern.splitlines()[0]  # the pattern finds the same people
