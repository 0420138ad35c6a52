"""Execution options of a training step (medbench.train.finetune.Execution): ``--compile`` (torch.compile) and
the channels-last layout, against the default (eager, NCHW), through :class:`Finetuner` under DeepSpeed.

Run with ``PYTHONPATH=. python -m pytest benchmarks/test_execution_bench.py --benchmark-only -s``.

``bit-m-r50x1`` and ``cbr-small`` at 128 px, batch ``MEDBENCH_BENCH_BATCH`` (default 8), random init, the same
batches; the first step of each variant (where torch.compile compiles) is timed apart as ``first_step``;
then the variants run in turn, round after round (``train_common.interleaved``). Reported: median step time
and its ratio to eager NCHW, and the largest difference of the weights after the same steps (compile and
channels-last change the order of float operations: last bits only). On CPU this measures the CPU; on a GPU
(where channels-last is the default and bf16 the precision) the same benchmark measures the GPU.
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch
from train_common import interleaved, load_average, summary

SIZE, OUTPUTS = 128, 14
BATCH = int(os.environ.get("MEDBENCH_BENCH_BATCH", "8"))
ROUNDS = int(os.environ.get("MEDBENCH_BENCH_ROUNDS", "4"))


@pytest.mark.parametrize("backbone,channels", [("cbr-small", 1), ("bit-m-r50x1", 3)])
def test_compile_and_channels_last(benchmark, backbone: str, channels: int) -> None:
    from medbench.backbones.create import create_model
    from medbench.run.runner import configure_torch
    from medbench.train.distributed import prepare_environment
    from medbench.train.finetune import EngineConfig, Execution, Finetuner
    from medbench.train.hyperrule import TrainPlan

    dist = prepare_environment()
    configure_torch(torch.get_num_threads())
    plan = TrainPlan(n_train=10_000, batch_size=BATCH, lr=0.003, momentum=0.9, weight_decay=0.0, warmup=0,
                     decays=(10**9,) * 3, total_steps=10**9, mixup_alpha=0.0, agc_clip=None)
    rng = np.random.default_rng(0)
    batches = [(torch.from_numpy(rng.standard_normal((BATCH, channels, SIZE, SIZE), dtype=np.float32)),
                torch.from_numpy((rng.random((BATCH, OUTPUTS)) < 0.3).astype(np.float32))) for _ in range(4)]
    variants = {"eager": Execution(), "channels_last": Execution(channels_last=True),
                "compile": Execution(compile=True)}
    tuners = {k: Finetuner(create_model(backbone, num_outputs=OUTPUTS, in_chans=channels, init="random",
                                        seed=0).model, plan, "multilabel", EngineConfig(), dist, seed=0, execution=v)
              for k, v in variants.items()}
    steps = dict.fromkeys(variants, 0)
    first: dict[str, float] = {}

    def run(name: str):
        def go() -> None:
            s = steps[name]
            x, y = batches[s % len(batches)]
            tuners[name].fit([(s, x, y)])
            steps[name] += 1
        return go

    for name in variants:  # compilation happens here
        t0 = time.perf_counter()
        run(name)()
        first[name] = time.perf_counter() - t0
    result: dict = {}
    benchmark.pedantic(lambda: result.update(interleaved({k: run(k) for k in variants}, rounds=ROUNDS)),
                       rounds=1, iterations=1)
    eager = summary(result["eager"])["median"]
    ref = tuners["eager"].module.state_dict()
    info = {"backbone": backbone, "size": SIZE, "batch": BATCH, "device": dist.device,
            "threads": torch.get_num_threads(), "load_average": load_average()}
    print(f"\n{backbone} {SIZE} px batch {BATCH}, {dist.device}, {info['threads']} threads, load {info['load_average']}")
    for name in variants:
        t = summary(result[name])
        sd = tuners[name].module.state_dict()
        diff = max(float((sd[k].float() - ref[k].float()).abs().max()) for k in ref if ref[k].is_floating_point())
        info[name] = {"step_seconds": t, "ratio_to_eager": t["median"] / eager, "first_step_seconds": first[name],
                      "max_weight_difference": diff}
        print(f"  {name:14s} step {t['median']:.3f} s median ({t['median'] / eager:.2f}x eager), first step "
              f"{first[name]:.1f} s, weights differ by {diff:.1e}")
    benchmark.extra_info.update(info)
