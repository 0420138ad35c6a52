"""P4 cold: the README's first command as a new user meets it, from empty caches.

``test_smoke_suite_cold`` runs ``medbench run --backbone cbr-small --suite smoke --out DIR`` (the README's first
command after ``pip install .``; torch's default threads, i.e. every core) in a fresh subprocess with every cache a
first run fills pointing at an empty folder:

* ``MEDBENCH_CACHE``: the synthetic smoke data (generated on first use) and the preprocessing caches;
* ``TORCH_EXTENSIONS_DIR``: DeepSpeed's CPU accelerator compiles its shared-memory communication op
  (``deepspeed_shm_comm``, a C++ build with the system compiler, about a minute of CPU) the first time its
  communication backend starts; a single process no longer builds it
  (:func:`medbench.train.distributed.init_process_group`), launched CPU runs do;
* ``MPLCONFIGDIR``: matplotlib builds its font list on first import (reliability diagrams).

Then the same command again with those caches warm, into another fresh output folder: the difference is what the
first run costs. To say where it goes, two parts are also timed alone from empty folders: the DeepSpeed op build
(``ShareMemCommBuilder().load()``: what the first run paid before, and what a launched CPU run still pays) and the synthetic data of the suite (``medbench data inspect`` of each smoke task
would not generate them, so they are generated through :func:`medbench.data.task_data.load_task_data` of every
smoke task and site-B target).
Python's bytecode caches are left as ``pip install`` writes them (it compiles every module on install). The page
cache cannot be emptied without root on a shared machine, so the imports read warm files: on a fresh machine they
cost a few seconds more.

Target: <= 120 s wall on 2 idle cores for the cold run, asserted when other processes kept less than 0.2 cores busy
just before it (:func:`train_common.busy_cores`); reported otherwise. ``MEDBENCH_BENCH_SUITE_THREADS`` passes
``--threads N`` (CI runs ``--threads 1``); ``MEDBENCH_BENCH_COLD_TASK=smoke-tb`` runs that one task instead of the
suite (with its seeds), to check the benchmark on a busy machine (the target is not asserted then).

Run with ``PYTHONPATH=. python -m pytest benchmarks/test_cold_start_bench.py -n 0 --benchmark-only -s`` (about
5 minutes on 2 idle cores).
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from train_common import busy_cores, load_average

REPO = Path(__file__).resolve().parents[1]
TARGET_SECONDS = 120.0
#: the smoke tasks and their site-B OOD targets (each generates its synthetic data on first use)
SMOKE_TASKS = sorted(p.stem for p in (REPO / "tasks" / "smoke").glob("smoke-*.yaml"))


def _env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    for var, folder in (("MEDBENCH_CACHE", "medbench-cache"), ("TORCH_EXTENSIONS_DIR", "torch-extensions"),
                        ("MPLCONFIGDIR", "matplotlib")):
        (tmp / folder).mkdir(parents=True, exist_ok=True)
        env[var] = str(tmp / folder)
    return env


def _timed(cmd: list[str], env: dict[str, str]) -> dict:
    busy = busy_cores()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    assert proc.returncode == 0, (cmd, proc.stderr[-2000:])
    return {"wall": wall, "cpu": after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime,
            "busy_cores_before": busy, "stdout": proc.stdout}


def _suite(out: Path) -> list[str]:
    task = os.environ.get("MEDBENCH_BENCH_COLD_TASK")  # one task instead of the suite: to check the benchmark
    which = ["--task", task] if task else ["--suite", "smoke"]
    cmd = [sys.executable, "-m", "medbench.cli", "run", "--backbone", "cbr-small", *which, "--out", str(out)]
    threads = os.environ.get("MEDBENCH_BENCH_SUITE_THREADS")
    return cmd + (["--threads", threads] if threads else [])


def test_smoke_suite_cold(benchmark, tmp_path: Path) -> None:
    env = _env(tmp_path / "caches")
    result: dict = {}

    def cold() -> None:
        result["cold"] = _timed(_suite(tmp_path / "cold"), env)

    benchmark.pedantic(cold, rounds=1, iterations=1)
    assert "already complete" not in result["cold"]["stdout"]
    warm = _timed(_suite(tmp_path / "warm"), env)  # the same caches, now filled; a fresh output folder
    assert "already complete" not in warm["stdout"]
    # the parts of the first run, each from an empty folder
    parts_env = _env(tmp_path / "parts")
    op = _timed([sys.executable, "-c", "from deepspeed.accelerator import get_accelerator; "
                 "get_accelerator().create_op_builder('ShareMemCommBuilder').load()"], parts_env)
    data = _timed([sys.executable, "-c", "from medbench.data.task_data import load_task_data; "
                   "from medbench.data.locate import DataLocations; from medbench.spec.catalog import Catalog; "
                   f"[load_task_data(Catalog().task(t), DataLocations()) for t in {SMOKE_TASKS!r}]"], parts_env)
    imports = _timed([sys.executable, "-X", "importtime", "-c", "import medbench.cli.run, deepspeed, torch"], env)
    cold_run = result["cold"]
    info = {"cold_wall": cold_run["wall"], "cold_cpu": cold_run["cpu"], "warm_wall": warm["wall"],
            "warm_cpu": warm["cpu"], "first_run_extra_wall": cold_run["wall"] - warm["wall"],
            "deepspeed_op_build_wall": op["wall"], "synthetic_data_wall": data["wall"],
            "imports_wall": imports["wall"], "deepspeed_op_build_cpu": op["cpu"], "synthetic_data_cpu": data["cpu"],
            "imports_cpu": imports["cpu"], "busy_cores_before_cold": cold_run["busy_cores_before"],
            "threads": os.environ.get("MEDBENCH_BENCH_SUITE_THREADS", "default (all cores)"),
            "load_after": load_average()}
    benchmark.extra_info.update(info)
    print(f"\nsmoke suite from empty caches: wall {cold_run['wall']:.0f} s, CPU {cold_run['cpu']:.0f} s "
          f"(other processes {cold_run['busy_cores_before']:.2f} cores before); warm again {warm['wall']:.0f} s "
          f"(CPU {warm['cpu']:.0f} s): the first run costs {info['first_run_extra_wall']:.0f} s more. Alone: "
          f"DeepSpeed op build {op['wall']:.0f} s (CPU {op['cpu']:.0f} s), synthetic data of the {len(SMOKE_TASKS)} smoke "
          f"sets {data['wall']:.0f} s (CPU {data['cpu']:.1f} s), imports {imports['wall']:.1f} s (CPU {imports['cpu']:.1f} s); "
          f"load {info['load_after']} (target <= {TARGET_SECONDS:.0f} s cold)")
    if os.environ.get("MEDBENCH_BENCH_COLD_TASK"):
        print("  one task, not the suite: not asserted")
    elif cold_run["busy_cores_before"] < 0.2:
        assert cold_run["wall"] <= TARGET_SECONDS
    else:
        print("  not asserted: other processes kept the cores busy before the cold run")
