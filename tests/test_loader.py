"""Training batches: a pure function of (seed, step), sliced per rank, balanced on request."""

from __future__ import annotations

import numpy as np
import torch

from medbench.data.loader import Normalization, TrainStream, eval_batches

NORM = Normalization((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def make_stream(world_size: int = 1, rank: int = 0, balanced: bool = False, seed: int = 0) -> TrainStream:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(50, 1, 12, 12), dtype=np.uint8)
    labels = (rng.random((50, 1)) < 0.2).astype(np.float32)
    return TrainStream(pixels, labels, np.arange(3, 50), batch_size=8, crop=10, hflip=True, norm=NORM, seed=seed,
                       balanced=balanced, rank=rank, world_size=world_size)


def test_batches_depend_only_on_seed_and_step() -> None:
    a, b = make_stream(), make_stream()
    for step in (0, 5, 17):
        xa, ya = a.batch(step)
        xb, yb = b.batch(step)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(a.batch(0)[0], a.batch(1)[0])
    assert not torch.equal(a.batch(0)[0], make_stream(seed=1).batch(0)[0])
    # resuming at step 10 yields what an uninterrupted stream yields at step 10
    resumed = [s for s, _, _ in make_stream().iterate(10, 12)]
    assert resumed == [10, 11]
    x10 = next(make_stream().iterate(10, 11))[1]
    assert torch.equal(x10, a.batch(10)[0])


def test_each_epoch_visits_every_row_once() -> None:
    s = make_stream()
    n = len(s.rows)
    seen = np.concatenate([s.sample_ids(step) for step in range(n // 8 * 3)])  # < 3 epochs, whole batches
    first_epoch = seen[:n]
    assert sorted(first_epoch.tolist()) == sorted(s.rows.tolist())


def test_ranks_split_the_global_batch() -> None:
    whole_x, whole_y = make_stream().batch(4)
    parts = [make_stream(world_size=2, rank=r).batch(4) for r in (0, 1)]
    assert torch.equal(torch.cat([p[0] for p in parts]), whole_x)
    assert torch.equal(torch.cat([p[1] for p in parts]), whole_y)


def test_balanced_sampler_equalises_classes() -> None:
    s = make_stream(balanced=True)
    y = np.concatenate([s.labels[s.sample_ids(step)] for step in range(400)])
    assert abs(y.mean() - 0.5) < 0.05  # the raw prevalence is 0.2


def test_normalisation_and_eval_resize() -> None:
    pixels = np.full((3, 1, 12, 12), 255, dtype=np.uint8)
    batches = list(eval_batches(pixels, np.array([2, 0, 1]), crop=8, norm=NORM, batch_size=2))
    assert [b.shape for b in batches] == [(2, 1, 8, 8), (1, 1, 8, 8)]
    assert torch.allclose(torch.cat(batches), torch.ones(3, 1, 8, 8))  # (1 - 0.5) / 0.5
