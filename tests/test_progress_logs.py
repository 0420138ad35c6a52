"""Progress that works in logs (issue 17): plain lines when stderr is not a terminal, a ``--dry-run`` that
says what its times mean on a CPU, and numpy's warnings about undefined numbers kept off the console."""

from __future__ import annotations

import io
import re
import time
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import run_cli

from medbench.cli.console import LogReporter, duration, progress_reporter


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_log_reporter_prints_start_every_few_percent_and_end_without_control_characters(
        monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    monkeypatch.setattr(time, "monotonic", clock)
    out = io.StringIO()
    rep = LogReporter(every_percent=10, stream=out)
    req = SimpleNamespace(task="own", seed=0, backbone="cbr-tiny", folder_suffix="")
    rep.run_started(0, 2, req, 200)
    for step in range(200):
        clock.now += 0.5  # half a second per step
        rep.step(step, 1.0 / (step + 1))
    rep.run_finished(SimpleNamespace(request=req, status="ok", error=None,
                                     result={"headline": {"metric": "auc", "value": 0.8123}}))
    lines = out.getvalue().splitlines()
    assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f]", out.getvalue())  # no \r, no ANSI escapes
    body = [ln.split(" ", 2)[2] for ln in lines]  # after the date and time
    assert body[0] == "run 1/2 started: own seed 0, backbone cbr-tiny, 200 steps"
    steps = body[1:-1]
    assert len(steps) == 10  # every 10 % of 200 steps
    assert steps[0] == "own seed 0: step 20/200 (10%), loss 0.0500, elapsed 0:00:10, left ~0:01:30"
    assert steps[-1].startswith("own seed 0: step 200/200 (100%), loss 0.0050, elapsed 0:01:40, left ~0:00:00")
    assert body[-1] == "run own seed 0: done in 0:01:40, auc 0.8123"


def test_log_reporter_estimates_time_left_from_this_process_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """A resumed run starts at a later step: the time left comes from the steps trained since."""
    clock = Clock()
    monkeypatch.setattr(time, "monotonic", clock)
    out = io.StringIO()
    rep = LogReporter(every_percent=50, stream=out)
    req = SimpleNamespace(task="t", seed=1, backbone="b", folder_suffix="frac10")
    rep.run_started(3, 4, req, 100)
    for step in range(40, 100):  # resumed at step 40
        clock.now += 2.0
        rep.step(step, 0.5)
    line = [ln for ln in out.getvalue().splitlines() if "step 50/100" in ln][0]
    assert line.endswith("t seed 1 frac10: step 50/100 (50%), loss 0.5000, elapsed 0:00:20, left ~0:01:40")


def test_reporter_is_plain_lines_off_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MEDBENCH_PROGRESS", raising=False)
    assert isinstance(progress_reporter(), LogReporter)  # pytest's stderr is not a terminal
    monkeypatch.setenv("MEDBENCH_PROGRESS", "bars")
    assert not isinstance(progress_reporter(), LogReporter)


def test_duration_reads() -> None:
    assert [duration(h) for h in (None, 1e-5, 10 / 3600, 0.5, 3.2)] == ["?", "< 1 s", "10 s", "30.0 min", "3.20 h"]


def test_dry_run_on_cpu_says_what_its_times_mean() -> None:
    """``--dry-run`` showed ``h/run 0.00`` on CPU: now the time in a readable unit, the rate it assumes, this
    CPU's measured rate and the option to use it, the learning rate the run trains at, whole steps."""
    proc = run_cli("run", "-b", "cbr-small", "-t", "smoke-mammo", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "time/run" in out and "h/run" not in out and "0.00 " not in out.split("runs;")[0].split("time/run")[1]
    assert "no GPU visible: the times assume 100 TFLOP/s" in " ".join(out.split())
    assert "--assume-tflops" in out
    assert f" {0.3 * 32 / 512:.3g} " in out  # smoke: base_lr 0.3 per 512 images at batch 32
    row = next(ln for ln in out.splitlines() if "smoke-mammo" in ln and "embedded" in ln)
    assert "│ 50    │" in row  # 50 steps, not 50.0


def test_numpy_warnings_about_undefined_numbers_stay_off_the_console() -> None:
    from medbench.utils import undefined_numbers_reported

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with undefined_numbers_reported():
            assert np.isnan(np.nanmean(np.array([np.nan])))
            assert np.isnan(np.array([0.0]) / np.array([0.0]))[0]
            warnings.warn("something else", RuntimeWarning)
        np.nanmean(np.array([np.nan]))  # outside: as before
    messages = [str(w.message) for w in caught]
    assert messages == ["something else", "Mean of empty slice"]
