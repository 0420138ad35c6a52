"""Data-parallel fine-tuning through a launcher (torchrun, 2 CPU processes, gloo) equals one process.

One process with ``--micro-batch 16`` accumulates the two 16-image halves of the 32-image HyperRule batch;
two processes compute one half each. Gradients are averaged by DeepSpeed and BatchNorm running statistics
are merged by medbench (medbench.train.data_parallel), so the two runs differ only by float summation order.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import polars as pl
import pytest
from conftest import PROCESS_GROUP_VARS, REPO, run_cli

pytestmark = pytest.mark.slow

#: predictions of the 1- and 2-process runs may differ by float summation order only
TOLERANCE = 1e-5
ARGS = ["run", "-b", "cbr-tiny", "-t", "smoke-tb", "--seeds", "1", "--max-steps", "3", "--threads", "1",
        "--checkpoint-every", "off"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launched(out, nproc: int) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in PROCESS_GROUP_VARS}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
           "127.0.0.1", "--master_port", str(_free_port()), "-m", "medbench.cli", *ARGS, "-o", str(out)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def _run_folders(out):
    return sorted(p for p in (out / "runs").glob("*/*/*") if p.is_dir())


def test_two_processes_through_torchrun_equal_one_process(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    r1 = run_cli(*ARGS, "--micro-batch", "16", "-o", str(one))
    assert r1.returncode == 0, r1.stderr[-3000:]
    r2 = _launched(two, 2)
    assert r2.returncode == 0, r2.stdout[-2000:] + r2.stderr[-3000:]

    [run1], [run2] = _run_folders(one), _run_folders(two)  # rank 1 wrote no folder of its own
    cfg1, cfg2 = (json.loads((r / "config.json").read_text()) for r in (run1, run2))
    assert (cfg1["world_size"], cfg2["world_size"]) == (1, 2)
    assert cfg1["plan"]["batch_size"] == cfg2["plan"]["batch_size"] == 32
    assert json.loads((run2 / "result.json").read_text())["status"] == "ok"
    assert sorted(p.name for p in two.iterdir()) == ["leaderboard.json", "runs", "splits"]

    for split in ("val", "test", "ood-site-b"):
        a = pl.read_parquet(run1 / "predictions" / f"{split}.parquet")
        b = pl.read_parquet(run2 / "predictions" / f"{split}.parquet")
        assert a["sample_id"].to_list() == b["sample_id"].to_list()
        probs = [c for c in a.columns if c.startswith("prob:")]
        diff = np.abs(a.select(probs).to_numpy() - b.select(probs).to_numpy()).max()
        assert diff < TOLERANCE, f"{split}: 1- vs 2-process predictions differ by {diff}"
    h1, h2 = (json.loads((r / "history.json").read_text()) for r in (run1, run2))
    np.testing.assert_allclose(h1["loss"], h2["loss"], atol=1e-6)  # the logged loss is the global batch's

    board = json.loads((two / "leaderboard.json").read_text())
    assert len(board["entries"]) == 1 and board["entries"][0]["seeds"] == [0]

    # a launched run takes the run's lock too (rank 0 for all ranks): while another process holds it, the
    # 2-process launch leaves the run alone
    import fcntl

    (run2 / "result.json").unlink()
    with open(run2 / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        r3 = _launched(two, 2)
    assert r3.returncode == 0, r3.stdout[-2000:] + r3.stderr[-3000:]
    assert "being trained by another medbench process" in r3.stdout
    assert not (run2 / "result.json").exists()


def _stream(world_size: int = 1, rank: int = 0, alpha: float = 0.0):
    from medbench.data.loader import Normalization, TrainStream

    gen = np.random.default_rng(0)
    pixels = gen.integers(0, 256, size=(40, 3, 16, 16), dtype=np.uint8)
    labels = gen.integers(0, 2, size=(40, 2)).astype(np.float32)
    labels[::7, 1] = np.nan
    return TrainStream(pixels, labels, np.arange(3, 40), batch_size=8, crop=12, hflip=True,
                       norm=Normalization((0.5,) * 3, (0.5,) * 3), seed=5, rank=rank, world_size=world_size,
                       mixup_alpha=alpha)


def test_mixup_over_the_global_batch_is_the_same_for_any_world_size():
    import torch

    from medbench.train.finetune import mixup

    for step in (0, 3, 11):
        x, y = _stream(alpha=0.5).batch(step)
        # world size 1: exactly the plain loop's MixUp of the whole batch (so single-process numbers are unchanged)
        ref_x, ref_y = mixup(*_stream().batch(step), 0.5, np.random.default_rng([5, 3, step, 0]))
        assert torch.equal(x, ref_x) and torch.equal(torch.nan_to_num(y, 9.0), torch.nan_to_num(ref_y, 9.0))
        assert not torch.equal(x, _stream().batch(step)[0])  # MixUp did something
        for world in (2, 4):  # the ranks' slices put together are the single-process batch
            parts = [_stream(world, r, alpha=0.5).batch(step) for r in range(world)]
            assert torch.equal(torch.cat([p[0] for p in parts]), x)
            assert torch.equal(torch.nan_to_num(torch.cat([p[1] for p in parts]), 9.0), torch.nan_to_num(y, 9.0))


def test_evaluation_shards_cover_the_rows_once_in_order():
    from medbench.train.data_parallel import shard

    for n in range(0, 11):
        for world in range(1, 5):
            parts = [np.arange(n)[shard(n, world, r)] for r in range(world)]
            assert np.concatenate(parts).tolist() == list(range(n))  # every row once, rank order = row order
            assert [len(p) for p in parts] == [len(a) for a in np.array_split(np.arange(n), world)]
