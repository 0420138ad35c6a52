"""The smoke suite end to end, and the per-step cost that dominated it.

Run with ``PYTHONPATH=. python -m pytest benchmarks/test_suite_bench.py -n 0 --benchmark-only -s``.

* ``test_smoke_suite_end_to_end``: ``medbench run --backbone cbr-small --suite smoke`` (6 tasks x 2
  seeds, and smoke-mammo's 3 variants x 2 seeds: 18 runs of 50 steps) in a subprocess, as the README's
  first command runs it, with warm caches: one
  untimed run first (it generates the synthetic data and builds the preprocessing caches; the first run
  from empty caches is ``test_cold_start_bench.py``), then ``MEDBENCH_BENCH_SUITE_ROUNDS`` (default 2) timed runs, each into a fresh output
  folder (nothing reused). Wall and CPU seconds. Target: <= 120 s wall on 2 idle cores; asserted on the
  fastest round when other processes kept less than 0.2 cores busy just before it
  (:func:`train_common.busy_cores`; they slow a 2-thread run several-fold), reported otherwise.
  ``MEDBENCH_BENCH_SUITE_THREADS=1`` passes ``--threads 1``, as CI runs it.
* ``test_step_nan_fill``: one smoke training step (cbr-small, 28 px, batch 32) with
  ``torch.utils.deterministic.fill_uninitialized_memory`` on (PyTorch's default under
  ``use_deterministic_algorithms``) and off (what :func:`medbench.run.runner.configure_torch` sets), in
  turn; the two networks must stay bit-identical.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from train_common import busy_cores, interleaved, load_average, summary

REPO = Path(__file__).resolve().parents[1]
ROUNDS = int(os.environ.get("MEDBENCH_BENCH_ROUNDS", "8"))


def test_step_nan_fill(benchmark) -> None:
    import torch.utils.deterministic as deterministic

    from medbench.backbones.create import create_model
    from medbench.run.runner import configure_torch

    configure_torch(torch.get_num_threads())
    torch.manual_seed(0)
    x, y = torch.randn(32, 1, 28, 28), (torch.rand(32, 5) < 0.3).float()
    nets = {}
    for fill in ("nan-fill", "no-fill"):
        model = create_model("cbr-small", num_outputs=5, in_chans=1, init="random", seed=0).model
        nets[fill] = (model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9))

    def step(name: str):
        def run() -> None:
            deterministic.fill_uninitialized_memory = name == "nan-fill"
            model, opt = nets[name]
            opt.zero_grad(set_to_none=True)
            F.binary_cross_entropy_with_logits(model(x), y).backward()
            opt.step()
        return run

    result: dict = {}
    try:
        benchmark.pedantic(lambda: result.update(interleaved({k: step(k) for k in nets}, rounds=ROUNDS)),
                           rounds=1, iterations=1)
    finally:
        configure_torch()
    fill, nofill = summary(result["nan-fill"]), summary(result["no-fill"])
    same = dict(nets["nan-fill"][0].named_parameters())
    for name, p in nets["no-fill"][0].named_parameters():
        assert torch.equal(p, same[name]), name
    info = {"load_average": load_average(), "threads": torch.get_num_threads(), "nan_fill": fill, "no_fill": nofill,
            "speedup_min": fill["min"] / nofill["min"], "speedup_median": fill["median"] / nofill["median"]}
    benchmark.extra_info.update(info)
    print(f"\ncbr-small 28px batch 32 step, load {info['load_average']}: NaN-fill min {fill['min']:.3f} s median "
          f"{fill['median']:.3f} s; no fill min {nofill['min']:.3f} s median {nofill['median']:.3f} s; speed-up "
          f"min {info['speedup_min']:.2f}x median {info['speedup_median']:.2f}x; weights bit-identical")


def test_smoke_suite_end_to_end(benchmark, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    env["MEDBENCH_CACHE"] = str(tmp_path / "cache")  # warmed by the first run, shared by the timed ones
    rounds = int(os.environ.get("MEDBENCH_BENCH_SUITE_ROUNDS", "2"))
    timed: list[dict] = []

    def run(out: Path) -> dict:
        busy = busy_cores()
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        threads = os.environ.get("MEDBENCH_BENCH_SUITE_THREADS")  # CI runs --threads 1
        proc = subprocess.run([sys.executable, "-m", "medbench.cli", "run", "--backbone", "cbr-small", "--suite",
                               "smoke", "--out", str(out), *(["--threads", threads] if threads else [])],
                              env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "already complete" not in proc.stdout  # a fresh folder: every run trained
        return {"wall": wall, "cpu": after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime,
                "busy_cores_before": busy}

    warm = run(tmp_path / "warm-up")

    def measure() -> None:
        for i in range(rounds):
            timed.append(run(tmp_path / f"smoke-{i}"))

    benchmark.pedantic(measure, rounds=1, iterations=1)
    best = min(timed, key=lambda r: r["wall"])
    info = {"warm_up": warm, "rounds": timed, "best_wall_seconds": best["wall"], "load_after": load_average()}
    benchmark.extra_info.update(info)
    print("\nsmoke suite (cbr-small, 18 runs, warm caches): " + ", ".join(
        f"wall {r['wall']:.0f} s CPU {r['cpu']:.0f} s (other processes: {r['busy_cores_before']:.2f} cores)"
        for r in timed)
        + f"; cold first run {warm['wall']:.0f} s (target <= 120 s wall on 2 idle cores)")
    if best["busy_cores_before"] < 0.2:
        assert best["wall"] <= 120.0
    else:
        print("  not asserted: other processes kept the cores busy before the fastest round")
