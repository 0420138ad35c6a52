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
