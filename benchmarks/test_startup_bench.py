"""Start-up time of the commands a user types first: ``medbench --help`` and ``medbench list ...``.

Run with ``PYTHONPATH=. python -m pytest benchmarks/test_startup_bench.py -n 0 --benchmark-only -s``.

Each command is a fresh interpreter (``python -m medbench.cli ...``, as ``tests/conftest.py::run_cli``
runs it), the commands in turn, round after round; target: median < 1.5 s each. For reference the
bare interpreter (``python -c pass``) runs in the same rounds. Wall and CPU time (user + system of the child)
are reported; on a loaded machine the wall time is mostly waiting for a core, so the target is
checked on the CPU time (the command's own cost, which is its wall time on an idle machine). ``tests/test_startup.py`` checks
that none of these commands imports torch, deepspeed, timm, polars or sklearn.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

from train_common import interleaved, load_average, summary

REPO = Path(__file__).resolve().parents[1]
COMMANDS = {"python -c pass": ["-c", "pass"], "--help": ["-m", "medbench.cli", "--help"],
            "list backbones": ["-m", "medbench.cli", "list", "backbones"],
            "list tasks": ["-m", "medbench.cli", "list", "tasks"],
            "list suites": ["-m", "medbench.cli", "list", "suites"]}
ROUNDS = int(os.environ.get("MEDBENCH_BENCH_ROUNDS", "5"))
TARGET_SECONDS = 1.5


def test_start_up_time(benchmark) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}

    cpu: dict[str, list[float]] = {k: [] for k in COMMANDS}

    def command(name: str, args: list[str]):
        def run() -> None:
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            subprocess.run([sys.executable, *args], env=env, check=True, capture_output=True)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu[name].append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
        return run

    result: dict = {}
    benchmark.pedantic(lambda: result.update(interleaved({k: command(k, v) for k, v in COMMANDS.items()},
                                                         rounds=ROUNDS)), rounds=1, iterations=1)
    info = {"load_average": load_average(),
            **{k: {"wall": summary(v), "cpu": summary(cpu[k][1:])} for k, v in result.items()}}
    benchmark.extra_info.update(info)
    print(f"\nload {info['load_average']}")
    for k in COMMANDS:
        w, c = info[k]["wall"], info[k]["cpu"]
        print(f"  {k:16s} wall min {w['min']:.2f} s median {w['median']:.2f} s; "
              f"CPU min {c['min']:.2f} s median {c['median']:.2f} s")
    for k in COMMANDS:
        if k != "python -c pass":
            assert info[k]["cpu"]["median"] < TARGET_SECONDS, k
