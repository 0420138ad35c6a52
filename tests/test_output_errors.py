"""An output folder that is read-only or full: one clear line, exit 2, every earlier result intact."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest
from conftest import without_progress
from tiny_tasks import write_tiny_tasks


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


def invoke(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    from medbench.cli import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(argv)
    out, err = capsys.readouterr()
    return exc.value.code, out, without_progress(err)  # the run's progress lines before the error are its log


@pytest.fixture(autouse=True)
def _restore_threads():
    import torch

    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def suite(tasks: Path, out: Path, seeds: int) -> list[str]:
    return ["run", "-b", "cbr-tiny", "--task", "tiny-tb", "--tasks-dir", str(tasks), "--seeds", str(seeds),
            "--threads", "1", "--checkpoint-every", "4", "--out", str(out)]


@pytest.fixture
def finished(tmp_path: Path, capsys: pytest.CaptureFixture) -> tuple[Path, Path, dict[str, str]]:
    """An output folder holding one complete run and its leaderboard, and a snapshot of it."""
    tasks, out = write_tiny_tasks(tmp_path / "tasks"), tmp_path / "out"
    code, _, err = invoke(suite(tasks, out, 1), capsys)
    assert code == 0, err
    return tasks, out, snapshot(out)


def make_read_only(folder: Path) -> callable:
    """Make ``folder`` unwritable even for root (chmod, else the immutable attribute); the undo function."""
    folder.chmod(0o555)
    if not os.access(folder, os.W_OK) and _cannot_create(folder):
        return lambda: folder.chmod(0o755)
    folder.chmod(0o755)
    if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0 and _cannot_create(folder):
        return lambda: subprocess.run(["chattr", "-i", str(folder)], check=True)
    pytest.skip("cannot make a folder read-only here (root without chattr)")


def _cannot_create(folder: Path) -> bool:
    try:
        (folder / ".probe").write_text("x")
    except OSError:
        return True
    (folder / ".probe").unlink()
    return False


def test_read_only_output_folder(finished, capsys: pytest.CaptureFixture) -> None:
    tasks, out, before = finished
    undo = make_read_only(out)
    try:
        code, _, err = invoke(suite(tasks, out, 2), capsys)
    finally:
        undo()
    assert code == 2 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"medbench: error: {out}: --out: output folder is not writable")
    assert snapshot(out) == before


def _full_disk_for(predicate):
    """An atomic writer whose final rename fails with ENOSPC for targets matching ``predicate``."""
    import medbench.utils

    real = medbench.utils._durable_replace

    def replace(tmp: Path, path: Path) -> None:
        if predicate(Path(path)):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp))
        real(tmp, path)

    return replace


def test_disk_full_during_a_run(finished, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    import medbench.utils

    tasks, out, before = finished
    writes: list[Path] = []
    new_run_file = lambda p: p.is_relative_to(out / "runs") and str(p) not in {str(out / k) for k in before}  # noqa: E731
    monkeypatch.setattr(medbench.utils, "_durable_replace", _full_disk_for(lambda p: writes.append(p) or new_run_file(p)))
    code, _, err = invoke(suite(tasks, out, 2), capsys)
    assert code == 2 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "cannot write: the disk is full (No space left on device); free space and rerun the same command; " \
           "files written before are intact" in lines[0]
    failed_target = lines[0].removeprefix("medbench: error: ").split(": cannot write")[0]
    assert Path(failed_target).is_relative_to(out / "runs") and "seed1" in failed_target
    assert {k: v for k, v in snapshot(out).items() if k in before} == before  # nothing earlier touched
    assert not any(p.name == "result.json" and "seed1" in str(p) for p in out.rglob("*"))  # no partial run marked
    assert not list(out.rglob("*.tmp"))  # temporary files cleaned up

    monkeypatch.undo()  # space freed: the same command finishes the suite
    code, stdout, err = invoke(suite(tasks, out, 2), capsys)
    assert code == 0, err
    assert "1 run(s) were already complete and reused" in stdout
    board = json.loads((out / "leaderboard.json").read_text())
    assert board["entries"][0]["seeds"] == [0, 1]


def test_disk_full_when_writing_the_leaderboard(finished, capsys: pytest.CaptureFixture,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import medbench.utils

    tasks, out, before = finished
    monkeypatch.setattr(medbench.utils, "_durable_replace", _full_disk_for(lambda p: p.name == "leaderboard.json"))
    code, _, err = invoke(suite(tasks, out, 1), capsys)
    assert code == 2 and err.strip().count("\n") == 0
    assert f"{out / 'leaderboard.json'}: cannot write: the disk is full" in err
    assert snapshot(out) == before  # the earlier leaderboard is intact


def test_unwritable_cache_folder(tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    monkeypatch.setenv("MEDBENCH_CACHE", str(blocker / "cache"))
    tasks = write_tiny_tasks(tmp_path / "tasks")
    code, _, err = invoke(suite(tasks, tmp_path / "out", 1), capsys)
    assert code == 2 and err.strip().count("\n") == 0 and "Traceback" not in err
    assert str(blocker / "cache") in err and "cannot write" in err


def test_short_checkpoint_write_is_an_error_not_a_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A writer that silently stops early (as on a full disk) never leaves a checkpoint that looks whole."""
    import safetensors.torch
    import torch

    from medbench.errors import OutputError
    from medbench.train.checkpoint import CheckpointStore

    real = safetensors.torch.save_file

    def short_write(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:
            f.truncate(os.path.getsize(filename) - 100)

    monkeypatch.setattr(safetensors.torch, "save_file", short_write)
    store = CheckpointStore(tmp_path)
    with pytest.raises(OutputError, match="incomplete write"):
        store.save(3, {"model/w": torch.zeros(1000)}, {}, key="k", meta={})
    assert store.load(key="k") is None and list(tmp_path.iterdir()) == []
