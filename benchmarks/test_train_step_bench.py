"""Harness overhead: one training step of ``bit-m-r50x1`` at 128 px through medbench against a bare PyTorch loop.

Run with ``PYTHONPATH=. python -m pytest benchmarks/test_train_step_bench.py -n 0 --benchmark-only -s``.

Every variant trains its own copy of the same randomly initialised network (``init="random"``: no
weights here) on the same batches, with the same thread count and the same SGD settings:

* ``torch-loop``: what a user writes: ``zero_grad; loss = bce(model(x), y); backward; step``;
* ``medbench-torch``: :class:`medbench.train.finetune.Finetuner` with ``engine="torch"``;
* ``deepspeed-zero0`` / ``zero1`` / ``zero2``: the Finetuner under DeepSpeed (medbench's default path),
  ZeRO stages 0, 1, 2 (one process, gloo, CPU).

The variants run in turn, round after round with a rotating order (:func:`train_common.interleaved`),
so the load of other processes falls on all of them alike; min and median step times and the
ratios to ``torch-loop`` go to the benchmark's ``extra_info`` and are printed, for wall time and for
this process's CPU time (all threads; steadier than the wall time on a shared machine, where a step
can wait seconds for a core). The target is a median CPU-time ratio <= 1.10 for medbench's default
engine (DeepSpeed, ZeRO stage 0). Also reported: the
step's FLOP/s (forward FLOPs counted as ``medbench --dry-run`` does, x3 for training) as a fraction
of the machine's dense fp32 matmul rate.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F
from train_common import interleaved, load_average, matmul_rate, summary

BACKBONE, SIZE, CHANNELS, OUTPUTS = "bit-m-r50x1", 128, 3, 14
BATCH = int(os.environ.get("MEDBENCH_BENCH_BATCH", "8"))
ROUNDS = int(os.environ.get("MEDBENCH_BENCH_ROUNDS", "8"))
TARGET_RATIO = 1.10


def _plan(batch: int):
    from medbench.train.hyperrule import TrainPlan

    return TrainPlan(n_train=10_000, batch_size=batch, lr=0.003, momentum=0.9, weight_decay=0.0, warmup=0,
                     decays=(10**9, 10**9, 10**9), total_steps=10**9, mixup_alpha=0.0, agc_clip=None)


def _model():
    from medbench.backbones.create import create_model

    return create_model(BACKBONE, num_outputs=OUTPUTS, in_chans=CHANNELS, init="random", seed=0).model


def test_training_step_overhead(benchmark) -> None:
    from medbench.backbones import get_backbone
    from medbench.run.plan import forward_gflops
    from medbench.run.runner import configure_torch
    from medbench.train.distributed import prepare_environment
    from medbench.train.finetune import EngineConfig, Finetuner

    dist = prepare_environment()
    configure_torch(torch.get_num_threads())  # the settings of `medbench run`, for every variant
    threads = torch.get_num_threads()
    plan = _plan(BATCH)
    rng = np.random.default_rng(0)
    batches = [(torch.from_numpy(rng.standard_normal((BATCH, CHANNELS, SIZE, SIZE), dtype=np.float32)),
                torch.from_numpy((rng.random((BATCH, OUTPUTS)) < 0.3).astype(np.float32))) for _ in range(4)]

    bare = _model()
    bare.train()
    bare_opt = torch.optim.SGD(bare.parameters(), lr=plan.lr, momentum=plan.momentum, weight_decay=plan.weight_decay)
    tuners = {
        "medbench-torch": Finetuner(_model(), plan, "multilabel", EngineConfig(engine="torch"), dist, seed=0),
        **{f"deepspeed-zero{z}": Finetuner(_model(), plan, "multilabel", EngineConfig(zero_stage=z), dist, seed=0)
           for z in (0, 1, 2)},
    }
    steps = {"torch-loop": 0, **{k: 0 for k in tuners}}

    def bare_step() -> None:
        x, y = batches[steps["torch-loop"] % len(batches)]
        bare_opt.zero_grad(set_to_none=True)
        loss = F.binary_cross_entropy_with_logits(bare(x), y)
        loss.backward()
        bare_opt.step()
        loss.item()
        steps["torch-loop"] += 1

    def tuner_step(name: str):
        def run() -> None:
            s = steps[name]
            x, y = batches[s % len(batches)]
            tuners[name].fit([(s, x, y)])
            steps[name] += 1
        return run

    variants = {"torch-loop": bare_step, **{k: tuner_step(k) for k in tuners}}
    rate_before = matmul_rate()
    result: dict = {}
    cpu: dict[str, list[float]] = {}

    def measure() -> None:
        result.update(interleaved(variants, rounds=ROUNDS, cpu=cpu))

    benchmark.pedantic(measure, rounds=1, iterations=1)
    rate = max(rate_before, matmul_rate())

    # same maths: medbench's DeepSpeed ZeRO-0 path and its plain engine hold the same weights after the same steps
    w_ds = dict(tuners["deepspeed-zero0"].module.named_parameters())
    for name, p in tuners["medbench-torch"].module.named_parameters():
        assert torch.equal(p, w_ds[name]), name

    stats = {k: summary(v) for k, v in result.items()}
    cpu_stats = {k: summary(v) for k, v in cpu.items()}
    base, cpu_base = stats["torch-loop"], cpu_stats["torch-loop"]
    gflop_step = 3 * forward_gflops(get_backbone(BACKBONE), OUTPUTS, CHANNELS, SIZE) * BATCH
    info = {"backbone": BACKBONE, "size": SIZE, "batch": BATCH, "threads": threads, "rounds": ROUNDS,
            "load_average": load_average(), "matmul_gflops": rate / 1e9, "train_gflop_per_step": gflop_step}
    print(f"\n{BACKBONE} {SIZE}px batch {BATCH}, {threads} threads, load {info['load_average']}; "
          f"matmul {rate / 1e9:.1f} GFLOP/s; {gflop_step:.1f} GFLOP per step")
    for name, s in stats.items():
        ratio_min, ratio_med = s["min"] / base["min"], s["median"] / base["median"]
        achieved = gflop_step / s["median"]
        c = cpu_stats[name]
        cpu_min, cpu_med = c["min"] / cpu_base["min"], c["median"] / cpu_base["median"]
        info[name] = {**s, "ratio_min": ratio_min, "ratio_median": ratio_med, "gflops": achieved,
                      "fraction_of_matmul": achieved * 1e9 / rate, "cpu": c, "cpu_ratio_min": cpu_min,
                      "cpu_ratio_median": cpu_med}
        print(f"  {name:16s} wall min {s['min']:.2f} s median {s['median']:.2f} s, ratio min {ratio_min:.3f} "
              f"median {ratio_med:.3f}; CPU min {c['min']:.2f} s median {c['median']:.2f} s, ratio min "
              f"{cpu_min:.3f} median {cpu_med:.3f}; {achieved:.1f} GFLOP/s = {achieved * 1e9 / rate:.0%} of matmul")
    benchmark.extra_info.update(info)
    assert info["deepspeed-zero0"]["cpu_ratio_median"] <= TARGET_RATIO
