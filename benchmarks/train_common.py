"""Helpers shared by the training benchmarks: interleaved timing, the machine's matmul rate, FLOPs per step."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def matmul_rate(n: int = 2048, repeats: int = 5) -> float:
    """The machine's dense fp32 matmul rate (FLOP/s): best of ``repeats`` products of two n x n matrices."""
    a = torch.randn(n, n)
    b = torch.randn(n, n)
    torch.matmul(a, b)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best


def interleaved(variants: dict[str, Callable[[], object]], rounds: int, warmup: int = 1,
                cpu: dict[str, list[float]] | None = None) -> dict[str, list[float]]:
    """Wall seconds of each variant, run in turn round after round (the order rotates each round), so
    that load from other processes hits every variant alike. ``warmup`` rounds are not recorded.
    With ``cpu``, this process's CPU seconds (all threads) of each run go there too: on a shared
    machine they vary less than the wall time, which includes waiting for a core."""
    names = list(variants)
    times: dict[str, list[float]] = {k: [] for k in names}
    for r in range(warmup + rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            c0, t0 = time.process_time(), time.perf_counter()
            variants[name]()
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            if r >= warmup:
                times[name].append(dt)
                if cpu is not None:
                    cpu.setdefault(name, []).append(dc)
    return times


def summary(seconds: list[float]) -> dict[str, float]:
    return {"min": min(seconds), "median": statistics.median(seconds), "n": len(seconds)}


def load_average() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "unknown"


def busy_cores(seconds: float = 2.0) -> float:
    """How many cores other processes keep busy, measured over ``seconds`` while this process sleeps
    (from /proc/stat; nan where it is unreadable). The load average cannot tell: it still counts a run
    that ended a minute ago."""
    def ticks() -> tuple[int, int]:
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
        return sum(values) - idle, sum(values)

    try:
        busy0, total0 = ticks()
        time.sleep(seconds)
        busy1, total1 = ticks()
    except (OSError, ValueError):
        return float("nan")
    import os

    return (busy1 - busy0) / max(total1 - total0, 1) * (os.cpu_count() or 1)
