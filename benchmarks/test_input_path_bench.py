"""The input path at the protocol's sizes: training batches of 512 images at 224 / 384 / 480 px crops, with and
without MixUp, before (tests/legacy_input.py: the CPU path medbench had until issue 19) and after (uint8 rows
read by worker threads; crop, flip, normalisation and MixUp as tensor operations on the device).

Run with ``PYTHONPATH=. python -m pytest benchmarks/test_input_path_bench.py --benchmark-only -s``.

Fixture: memory-mapped caches of ``N_ROWS`` random 3-channel uint8 images at BiT's storage size for each crop
(240 for 224, 410 for 384, 512 for 480), and 1-channel (grey) twins, read once before timing (warm page cache,
as during training). For each (crop, MixUp, cached channels) the variants run in turn, round after round
(``train_common.interleaved``):

* ``before``: ``legacy_input.TrainStream.batch``: float32 inputs on the CPU, the whole batch in one thread
  (torch's intra-op threads for the float arithmetic);
* ``host`` (the target: CPU-side batch production, >= 6,000 images/s at 224 px): ``TrainStream.host_batch``
  with the row-copying workers of one process (``MEDBENCH_BENCH_WORKERS``, default every core), its buffer
  given back after each step as ``TrainStream.iterate`` does: what the host does per step when the device is
  a GPU (there the buffers are pinned, recycled by CUDA's caching host allocator);
* ``host_1``: the same with one worker;
* ``cpu_device``: ``TrainStream.batch`` with the CPU as the device: host part plus the device part on the CPU
  (comparable with ``before``: both end with float32 inputs in CPU memory).

Reported: images/s (min / median of rounds), and the bytes that cross to the device per step (before: the
float32 batch; after: the uint8 rows plus the index tensors). ``test_device_part_fraction_of_a_step`` measures
the device part (crop, flip, normalise, MixUp of one batch) against one training step (forward, backward, SGD)
of BiT-M R50x1 at the same crop and batch, on the CPU (``MEDBENCH_BENCH_BATCH``, default 16: the fraction does
not depend on the batch), and on CUDA when there is one.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from train_common import interleaved, load_average, summary

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import legacy_input  # noqa: E402  (the "before": tests/legacy_input.py)

from medbench.data.loader import Normalization, RowReader, TrainStream  # noqa: E402

BATCH = 512
N_ROWS = int(os.environ.get("MEDBENCH_BENCH_ROWS", "768"))
ROUNDS = int(os.environ.get("MEDBENCH_BENCH_ROUNDS", "3"))
WORKERS = int(os.environ.get("MEDBENCH_BENCH_WORKERS", "0")) or (os.cpu_count() or 1)
SIZES = {224: 240, 384: 410, 480: 512}
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
TARGET_224 = 6000.0


@pytest.fixture(scope="module")
def caches(tmp_path_factory: pytest.TempPathFactory) -> dict:
    folder = tmp_path_factory.mktemp("input-path")
    rng = np.random.default_rng(0)
    out = {}
    for crop, size in SIZES.items():
        path = folder / f"{size}.u8"
        mm = np.memmap(path, dtype=np.uint8, mode="w+", shape=(N_ROWS, 3, size, size))
        for s in range(0, N_ROWS, 64):
            mm[s:s + 64] = rng.integers(0, 256, size=(min(64, N_ROWS - s), 3, size, size), dtype=np.uint8)
        mm.flush()
        del mm
        pixels = np.memmap(path, dtype=np.uint8, mode="r", shape=(N_ROWS, 3, size, size))
        int(np.asarray(pixels).sum(dtype=np.uint64))  # into the page cache
        out[crop] = pixels
        grey = np.memmap(folder / f"{size}-grey.u8", dtype=np.uint8, mode="w+", shape=(N_ROWS, 1, size, size))
        grey[:] = np.asarray(pixels[:, :1])
        grey.flush()
        del grey
        out[(crop, 1)] = np.memmap(folder / f"{size}-grey.u8", dtype=np.uint8, mode="r", shape=(N_ROWS, 1, size, size))
    labels = (rng.random((N_ROWS, 5)) < 0.3).astype(np.float32)
    return {"pixels": out, "labels": labels}


def _streams(pixels, labels, crop: int, alpha: float, old_pixels=None):
    kw = dict(batch_size=BATCH, crop=crop, hflip=True, seed=0, mixup_alpha=alpha)
    new = TrainStream(pixels, labels, np.arange(N_ROWS), norm=Normalization(MEAN, STD), channels=3, **kw)
    old = legacy_input.TrainStream(pixels if old_pixels is None else old_pixels, labels, np.arange(N_ROWS),
                                   norm=legacy_input.Normalization(MEAN, STD), **kw)
    return new, old


CASES = [(crop, alpha, 3) for crop in sorted(SIZES) for alpha in (0.0, 0.1)] + [(224, 0.0, 1), (480, 0.0, 1)]


@pytest.mark.parametrize("crop,alpha,cached", CASES,
                         ids=[f"{c}-{'mixup' if a else 'no-mixup'}-{k}ch" for c, a, k in CASES])
def test_input_path_throughput(benchmark, caches: dict, crop: int, alpha: float, cached: int) -> None:
    """``cached`` 1: grey images cached with one channel for the 3-channel network (before: the same images
    cached with 3 identical channels, as medbench did)."""
    benchmark.group = "input path, batch 512"
    pixels = caches["pixels"][crop] if cached == 3 else caches["pixels"][(crop, 1)]
    new, old = _streams(pixels, caches["labels"], crop, alpha, old_pixels=caches["pixels"][crop])
    step = {"i": 0}
    readers = {"host": RowReader(WORKERS), "host_1": RowReader(1)}

    def run(name: str):
        def go() -> None:
            step["i"] += 1
            s = step["i"]
            if name == "before":
                old.batch(s)
            elif name == "cpu_device":
                new.batch(s)
            else:  # as TrainStream.iterate does: the buffer goes back once the device part has its copy
                readers[name].release(new.host_batch(s, reader=readers[name]).pixels)
        return go

    names = ["before", "host", "host_1", "cpu_device"]
    result: dict = {}
    benchmark.pedantic(lambda: result.update(interleaved({k: run(k) for k in names}, rounds=ROUNDS)),
                       rounds=1, iterations=1)
    for r in readers.values():
        r.close()
    hb = new.host_batch(0)
    x_old, y_old = old.batch(0)
    info = {"crop": crop, "storage": SIZES[crop], "mixup": alpha > 0, "cached_channels": cached, "batch": BATCH,
            "workers": WORKERS,
            "torch_threads": torch.get_num_threads(), "load_average": load_average(),
            "bytes_per_step": {"before": x_old.numel() * 4 + y_old.numel() * 4, "after": hb.nbytes}}
    print(f"\n{crop} px{' + MixUp' if alpha else ''}, {cached}-channel cache, batch {BATCH}, load "
          f"{info['load_average']}, torch threads {info['torch_threads']}, workers {WORKERS}: bytes per step before "
          f"{info['bytes_per_step']['before'] / 1e6:.0f} MB, after {hb.nbytes / 1e6:.0f} MB")
    for name in names:
        t = summary(result[name])
        info[name] = {"seconds": t, "images_per_second": {"max": BATCH / t["min"], "median": BATCH / t["median"]}}
        print(f"  {name:10s} {BATCH / t['median']:8.0f} images/s median ({BATCH / t['min']:.0f} best)")
    info["host_speedup_median"] = result["before"] and summary(result["before"])["median"] / summary(result["host"])["median"]
    benchmark.extra_info.update(info)
    if crop == 224:
        print(f"  target: CPU-side batch production >= {TARGET_224:.0f} images/s at 224 px "
              f"({'met' if BATCH / summary(result['host'])['min'] >= TARGET_224 else 'not met'} at best round)")


def test_device_part_fraction_of_a_step(benchmark) -> None:
    """The device part of the input path against one training step of BiT-M R50x1, same crop and batch."""
    from medbench.backbones import create_model
    from medbench.data.loader import _DeviceStage

    batch = int(os.environ.get("MEDBENCH_BENCH_BATCH", "16"))
    crop, size = 224, 240
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, size=(batch * 2, 3, size, size), dtype=np.uint8)
    labels = (rng.random((batch * 2, 5)) < 0.3).astype(np.float32)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    info: dict = {"batch": batch, "crop": crop, "load_average": load_average(),
                  "torch_threads": torch.get_num_threads()}
    for device in devices:
        stream = TrainStream(pixels, labels, np.arange(batch * 2), batch_size=batch, crop=crop, hflip=True,
                             norm=Normalization(MEAN, STD), seed=0, mixup_alpha=0.1)
        stage = _DeviceStage(device)
        hosts = [stage.ready(stage.stage(stream.host_batch(s, pin=stage.cuda))) for s in range(2)]
        model = create_model("bit-m-r50x1", num_outputs=5, in_chans=3, init="random").model.to(device)
        opt = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
        x, y = stream.to_device(hosts[0])

        def sync() -> None:
            if device == "cuda":
                torch.cuda.synchronize()

        def device_part() -> None:
            stream.to_device(hosts[1])
            sync()

        def train_step() -> None:
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync()

        result: dict = {}
        benchmark.pedantic(lambda: result.update(interleaved({"device_part": device_part, "train_step": train_step},
                                                             rounds=ROUNDS)), rounds=1, iterations=1)
        dev, step = summary(result["device_part"]), summary(result["train_step"])
        info[device] = {"device_part_seconds": dev, "train_step_seconds": step,
                        "fraction_median": dev["median"] / step["median"]}
        print(f"\n{device}: device part {dev['median'] * 1e3:.1f} ms, training step {step['median'] * 1e3:.0f} ms "
              f"(R50x1, {crop} px, batch {batch}): {dev['median'] / step['median']:.2%} of a step")
    benchmark.extra_info.update(info)


@pytest.mark.parametrize("crop", [224, 480])
def test_eval_path_throughput(benchmark, caches: dict, crop: int) -> None:
    """Evaluation inputs (the cached image resized to the crop), batches of 128: before (legacy_input.eval_batches,
    normalised and resized on the CPU, no prefetch) and after (eval_batches: rows read ahead by the workers,
    normalised and resized on the device, here the CPU)."""
    from medbench.data.loader import eval_batches

    benchmark.group = "evaluation inputs, batch 128"
    pixels = caches["pixels"][crop]
    rows = np.arange(N_ROWS)
    norm, old_norm = Normalization(MEAN, STD), legacy_input.Normalization(MEAN, STD)
    variants = {
        "before": lambda: sum(len(x) for x in legacy_input.eval_batches(pixels, rows, crop=crop, norm=old_norm,
                                                                         batch_size=128)),
        "after": lambda: sum(len(x) for x in eval_batches(pixels, rows, crop=crop, norm=norm, batch_size=128,
                                                          workers=WORKERS)),
    }
    result: dict = {}
    benchmark.pedantic(lambda: result.update(interleaved(variants, rounds=ROUNDS)), rounds=1, iterations=1)
    info = {"crop": crop, "storage": SIZES[crop], "rows": N_ROWS, "load_average": load_average(),
            "torch_threads": torch.get_num_threads()}
    print(f"\nevaluation {SIZES[crop]} -> {crop} px, {N_ROWS} images, load {info['load_average']}:")
    for name in variants:
        t = summary(result[name])
        info[name] = {"seconds": t, "images_per_second": N_ROWS / t["median"]}
        print(f"  {name:8s} {N_ROWS / t['median']:7.0f} images/s median ({N_ROWS / t['min']:.0f} best)")
    benchmark.extra_info.update(info)
