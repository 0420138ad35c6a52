"""The uint8-to-the-device input path gives exactly the batches of the earlier CPU path (tests/legacy_input.py,
the code it replaced, kept as the oracle): same rows, crops, flips, MixUp partners and lambdas, and the same
float inputs bit for bit on CPU, for world sizes 1 and 2, resumed at any step, from a 1-channel cache feeding a
3-channel network, and in evaluation."""

from __future__ import annotations

from pathlib import Path

import legacy_input as legacy
import numpy as np
import pytest
import torch

from medbench.data.cache import RowMap
from medbench.data.loader import HostBatch, Normalization, RowReader, TrainStream, eval_batches

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical, NaN (missing labels) included."""
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(torch.nan_to_num(a, 9.0), torch.nan_to_num(b, 9.0))


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A memory-mapped 3-channel cache of grey images (channels equal), its 1-channel twin, colour images,
    labels with missing values."""
    gen = np.random.default_rng(0)
    n, s = 61, 20
    grey = gen.integers(0, 256, size=(n, 1, s, s), dtype=np.uint8)
    folder = tmp_path_factory.mktemp("cache")
    mm = np.memmap(folder / "grey3.u8", dtype=np.uint8, mode="w+", shape=(n, 3, s, s))
    mm[:] = np.repeat(grey, 3, axis=1)
    mm.flush()
    labels = (gen.random((n, 3)) < 0.3).astype(np.float32)
    labels[::5, 1] = np.nan
    return {"grey1": grey, "grey3": np.memmap(folder / "grey3.u8", dtype=np.uint8, mode="r", shape=(n, 3, s, s)),
            "colour": gen.integers(0, 256, size=(n, 3, s, s), dtype=np.uint8), "labels": labels}


def _pair(pixels, labels, *, old_pixels=None, world: int = 1, rank: int = 0, channels: int | None = None, **kw):
    common = dict(batch_size=12, crop=16, hflip=True, seed=3, rank=rank, world_size=world)
    common.update(kw)
    norm = Normalization(*IMAGENET)
    new = TrainStream(pixels, labels, np.arange(2, len(labels)), norm=norm, channels=channels, **common)
    old = legacy.TrainStream(pixels if old_pixels is None else old_pixels, labels, np.arange(2, len(labels)),
                             norm=legacy.Normalization(*IMAGENET), **common)
    return new, old


STEPS = (0, 1, 4, 9)  # crosses epoch boundaries (59 rows, 12 per step)


@pytest.mark.parametrize("alpha", [0.0, 0.4])
@pytest.mark.parametrize("balanced", [False, True])
def test_batches_equal_the_cpu_path_for_world_sizes_1_and_2(data: dict, alpha: float, balanced: bool) -> None:
    for pixels in (data["grey3"], data["colour"]):
        new, old = _pair(pixels, data["labels"], mixup_alpha=alpha, balanced=balanced)
        for step in STEPS:
            x, y = new.batch(step)
            ox, oy = old.batch(step)
            assert _same(x, ox) and _same(y, oy), step
            parts = [_pair(pixels, data["labels"], world=2, rank=r, mixup_alpha=alpha, balanced=balanced)
                     for r in (0, 1)]
            for r, (n2, o2) in enumerate(parts):
                x2, y2 = n2.batch(step)
                ox2, oy2 = o2.batch(step)
                assert _same(x2, ox2) and _same(y2, oy2), (step, r)
            if alpha == 0:  # without MixUp the ranks' slices are the single-process batch exactly
                assert _same(torch.cat([p[0].batch(step)[0] for p in parts]), x)


def test_mixup_partners_from_other_ranks_are_read_and_counted(data: dict) -> None:
    new, _ = _pair(data["colour"], data["labels"], world=2, rank=1, mixup_alpha=0.4)
    hb = new.host_batch(5)
    d = new.draws(5)
    own = np.arange(6, 12)
    partners = d["perm"][6:12]
    assert hb.partner is not None and len(hb.labels) == 6
    needed = np.union1d(own, partners)
    assert len(hb.offsets) == len(needed) and hb.lam == d["lam"]
    # every distinct cache row is sent once, as uint8
    assert hb.pixels.dtype == torch.uint8 and len(hb.pixels) == len(np.unique(d["rows"][needed]))
    assert hb.nbytes == sum(t.numel() * t.element_size() for t in
                            (hb.pixels, hb.offsets, hb.flips, hb.labels, hb.partner, *([hb.slot] if hb.slot is not None else [])))


def test_resume_at_step_t_and_background_workers_give_the_same_batches(data: dict) -> None:
    new, old = _pair(data["colour"], data["labels"], mixup_alpha=0.2)
    for workers, prefetch in ((1, 0), (3, 2)):
        got = list(new.iterate(4, 9, prefetch=prefetch, workers=workers))
        assert [s for s, _, _ in got] == list(range(4, 9))
        for step, x, y in got:
            ox, oy = old.batch(step)
            assert _same(x, ox) and _same(y, oy), (workers, step)


def test_a_one_channel_cache_feeds_a_three_channel_network_as_its_three_channel_twin(data: dict) -> None:
    for world, rank in ((1, 0), (2, 1)):
        new, old = _pair(data["grey1"], data["labels"], old_pixels=data["grey3"], channels=3, world=world, rank=rank,
                         mixup_alpha=0.3)
        for step in STEPS:
            x, y = new.batch(step)
            ox, oy = old.batch(step)
            assert x.shape[1] == 3 and _same(x, ox) and _same(y, oy)
            hb = new.host_batch(step)
            assert hb.pixels.shape[1] == 1  # one channel crosses to the device, a third of the bytes
    with pytest.raises(ValueError, match="cannot feed"):
        TrainStream(data["colour"], data["labels"], np.arange(5), batch_size=4, crop=8, hflip=False,
                    norm=Normalization(*IMAGENET), seed=0, channels=1)


def test_row_maps_and_repeated_rows(data: dict) -> None:
    """A task reading a subset of a cache entry (RowMap), and a batch larger than the data (rows repeat)."""
    mapping = np.array([7, 3, 3, 40, 12, 0, 55, 21, 9, 30, 2, 18])
    view = RowMap(data["colour"], mapping)
    labels = data["labels"][mapping]
    common = dict(batch_size=20, crop=14, hflip=True, seed=1, mixup_alpha=0.5)
    new = TrainStream(view, labels, np.arange(12), norm=Normalization(*IMAGENET), **common)
    old = legacy.TrainStream(view, labels, np.arange(12), norm=legacy.Normalization(*IMAGENET), **common)
    for step in (0, 3):
        hb = new.host_batch(step)
        assert len(hb.pixels) < 20 and hb.slot is not None  # repeats are read and sent once
        x, y = new.batch(step)
        ox, oy = old.batch(step)
        assert _same(x, ox) and _same(y, oy)


def test_crops_and_flips_by_hand(data: dict) -> None:
    """An oracle independent of both implementations: each sample is its cache row's window, mirrored when
    flipped, normalised by the formula."""
    new, _ = _pair(data["colour"], data["labels"])
    d = new.draws(2)
    x, _ = new.batch(2)
    mean = np.array(IMAGENET[0], dtype=np.float32)[:, None, None] * np.float32(255)
    std = np.array(IMAGENET[1], dtype=np.float32)[:, None, None] * np.float32(255)
    for i, (row, (oy, ox), flip) in enumerate(zip(d["rows"], d["offsets"], d["flips"])):
        window = data["colour"][row, :, oy:oy + 16, ox:ox + 16].astype(np.float32)
        if flip:
            window = window[:, :, ::-1]
        np.testing.assert_allclose(x[i].numpy(), (window - mean) / std, rtol=1e-6, atol=1e-6)
    assert d["flips"].any() and not d["flips"].all()


@pytest.mark.parametrize("crop", [16, 20])
def test_evaluation_batches_equal_the_cpu_path(data: dict, crop: int) -> None:
    rows = np.array([5, 0, 17, 5, 33, 60, 1])
    norm, old_norm = Normalization(*IMAGENET), legacy.Normalization(*IMAGENET)
    for pixels, old_pixels, channels in ((data["colour"], data["colour"], None), (data["grey1"], data["grey3"], 3)):
        for workers in (1, 2):
            got = list(eval_batches(pixels, rows, crop=crop, norm=norm, batch_size=3, channels=channels,
                                    workers=workers))
            want = list(legacy.eval_batches(old_pixels, rows, crop=crop, norm=old_norm, batch_size=3))
            assert len(got) == len(want) == 3
            for a, b in zip(got, want):
                assert _same(a, b)


def test_row_reader_reads_any_order_with_repeats(data: dict, tmp_path: Path) -> None:
    rows = np.array([9, 2, 2, 50, 0, 33, 9])
    for workers in (1, 3):
        with RowReader(workers) as reader:
            out = reader.read(data["grey3"], rows)
        assert torch.equal(out, torch.from_numpy(np.asarray(data["grey3"])[rows]))


def test_host_batch_moves_to_a_device_as_a_whole(data: dict) -> None:
    new, _ = _pair(data["colour"], data["labels"], mixup_alpha=0.3)
    hb = new.host_batch(1)
    moved = hb.to(torch.device("cpu"))
    assert isinstance(moved, HostBatch) and moved.lam == hb.lam and moved.step == 1
    assert torch.equal(new.to_device(moved)[0], new.batch(1)[0])


def test_the_gpu_crop_kernel_gives_the_cpu_kernels_bytes(data: dict) -> None:
    """crop_flip runs two gathers on a GPU and a copy per sample on the CPU: same bytes (both run here)."""
    from medbench.data.loader import _crop_flip_gather, crop_flip

    gen = np.random.default_rng(7)
    u8 = torch.from_numpy(np.ascontiguousarray(data["colour"][:9]))
    for slot in (None, torch.tensor([3, 3, 0, 8, 1, 2, 5, 5, 7, 6, 4])):
        p = 9 if slot is None else len(slot)
        offsets = torch.from_numpy(gen.integers(0, 20 - 13 + 1, size=(p, 2)))
        flips = torch.from_numpy(gen.random(p) < 0.5)
        assert torch.equal(crop_flip(u8, slot, offsets, flips, 13), _crop_flip_gather(u8, slot, offsets, flips, 13))


def test_reused_buffers_never_leak_into_earlier_batches(data: dict) -> None:
    """iterate() hands a step's row buffer back for later steps: the batches it yielded must not change."""
    new, old = _pair(data["colour"], data["labels"], mixup_alpha=0.3)
    got = [(s, x.clone(), x, y) for s, x, y in new.iterate(0, 6, prefetch=2, workers=2)]
    for step, copy, x, y in got:
        ox, oy = old.batch(step)
        assert torch.equal(copy, x) and _same(x, ox) and _same(y, oy), step
    with RowReader(1) as reader:
        a = reader.read(data["grey3"], np.array([1, 2, 3]))
        reader.release(a)
        b = reader.read(data["grey3"], np.array([4, 5]))
        assert b.data_ptr() == a.data_ptr() and torch.equal(b, torch.from_numpy(np.asarray(data["grey3"])[[4, 5]]))
