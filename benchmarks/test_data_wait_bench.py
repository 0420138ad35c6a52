"""How long training waits for data: ``cbr-small`` at 128 px through the real TrainStream + Finetuner path.

Run with ``PYTHONPATH=. python -m pytest benchmarks/test_data_wait_bench.py -n 0 --benchmark-only -s``.

The preprocessing cache (a memory-mapped uint8 file from :func:`medbench.data.cache.build_cache`) holds
``N_IMAGES`` single-channel images at 160 px; :class:`medbench.data.loader.TrainStream` crops 128 px
(flip, normalisation) and :meth:`Finetuner.fit` (DeepSpeed, ZeRO 0: the defaults) trains on them.
``History.data_wait_seconds`` is the time the loop spent waiting for its next batch, ``seconds`` the
whole loop. Two variants in turn, round after round: ``prefetch`` (what ``medbench run`` does: the
next batches are assembled in a background thread) and ``synchronous`` (``prefetch=0``: each batch
is assembled when the loop asks for it). The target is a median wait below 5 % of the step time with
prefetching. Also reported: training FLOP/s as a fraction of the machine's dense fp32 matmul rate.
"""

from __future__ import annotations

import os

import numpy as np
import polars as pl
import pytest
import torch
from train_common import interleaved, load_average, matmul_rate, summary

BACKBONE, RESIZE, CROP, CHANNELS, OUTPUTS = "cbr-small", 160, 128, 1, 5
N_IMAGES = 256
BATCH = int(os.environ.get("MEDBENCH_BENCH_BATCH", "16"))
STEPS_PER_ROUND = 3
ROUNDS = int(os.environ.get("MEDBENCH_BENCH_ROUNDS", "4"))
TARGET_WAIT = 0.05


@pytest.fixture(scope="module")
def cached(tmp_path_factory: pytest.TempPathFactory):
    from medbench.data.base import DatasetIndex, label_column
    from medbench.data.cache import build_cache

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(N_IMAGES, 200, 200), dtype=np.uint8)
    ids = [f"img{i:04d}" for i in range(N_IMAGES)]
    table = pl.DataFrame({"sample_id": ids, "patient_id": ids,
                          **{label_column(f"l{k}"): pl.Series((rng.random(N_IMAGES) < 0.3).astype(np.int8))
                             for k in range(OUTPUTS)}})
    index = DatasetIndex("bench-wait", table, [f"l{k}" for k in range(OUTPUTS)], pixels=pixels)
    # root= puts the cache in a memory-mapped file, as for every on-disk dataset
    images = build_cache(index, RESIZE, CHANNELS, root=tmp_path_factory.mktemp("cache"))
    assert images.path is not None
    return images, index.labels()


def test_data_wait_fraction(benchmark, cached) -> None:
    from medbench.backbones import get_backbone
    from medbench.backbones.create import create_model
    from medbench.data.loader import Normalization, TrainStream
    from medbench.run.plan import forward_gflops
    from medbench.run.runner import configure_torch
    from medbench.train.distributed import prepare_environment
    from medbench.train.finetune import EngineConfig, Finetuner, History
    from medbench.train.hyperrule import TrainPlan

    images, labels = cached
    dist = prepare_environment()
    configure_torch(torch.get_num_threads())  # the settings of `medbench run`, for every variant
    plan = TrainPlan(n_train=N_IMAGES, batch_size=BATCH, lr=0.003, momentum=0.9, weight_decay=0.0, warmup=0,
                     decays=(10**9,) * 3, total_steps=10**9, mixup_alpha=0.0, agc_clip=None)
    stream = TrainStream(images.pixels, labels, np.arange(N_IMAGES), batch_size=BATCH, crop=CROP, hflip=True,
                         norm=Normalization((0.5,), (0.5,)), seed=0)
    variants_prefetch = {"prefetch": 2, "synchronous": 0}
    tuners = {k: Finetuner(create_model(BACKBONE, num_outputs=OUTPUTS, in_chans=CHANNELS, init="random").model,
                           plan, "multilabel", EngineConfig(), dist, seed=0) for k in variants_prefetch}
    steps = dict.fromkeys(variants_prefetch, 0)
    waits: dict[str, list[float]] = {k: [] for k in variants_prefetch}

    def run(name: str):
        def go() -> None:
            s = steps[name]
            h = tuners[name].fit(stream.iterate(s, s + STEPS_PER_ROUND, prefetch=variants_prefetch[name]),
                                 history=History())
            waits[name].append(h.data_wait_seconds / h.seconds)
            steps[name] += STEPS_PER_ROUND
        return go

    result: dict = {}
    rate_before = matmul_rate()
    benchmark.pedantic(lambda: result.update(interleaved({k: run(k) for k in variants_prefetch}, rounds=ROUNDS)),
                       rounds=1, iterations=1)
    rate = max(rate_before, matmul_rate())
    for k in waits:
        waits[k] = waits[k][1:]  # the warm-up round
    gflop_step = 3 * forward_gflops(get_backbone(BACKBONE), OUTPUTS, CHANNELS, CROP) * BATCH
    info = {"backbone": BACKBONE, "crop": CROP, "batch": BATCH, "threads": torch.get_num_threads(),
            "load_average": load_average(), "matmul_gflops": rate / 1e9, "train_gflop_per_step": gflop_step}
    print(f"\n{BACKBONE} {CROP}px batch {BATCH}, {info['threads']} threads, load {info['load_average']}; "
          f"matmul {rate / 1e9:.1f} GFLOP/s; {gflop_step:.1f} GFLOP per step")
    for name in variants_prefetch:
        step = summary([t / STEPS_PER_ROUND for t in result[name]])
        wait = summary(waits[name])
        achieved = gflop_step / step["median"]
        info[name] = {"step_seconds": step, "wait_fraction": wait, "gflops": achieved,
                      "fraction_of_matmul": achieved * 1e9 / rate}
        print(f"  {name:12s} step min {step['min']:.3f} s median {step['median']:.3f} s; data wait min "
              f"{wait['min']:.2%} median {wait['median']:.2%} of the loop; {achieved:.1f} GFLOP/s = "
              f"{achieved * 1e9 / rate:.0%} of matmul")
    benchmark.extra_info.update(info)
    assert info["prefetch"]["wait_fraction"]["median"] < TARGET_WAIT
