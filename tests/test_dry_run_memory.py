"""``--dry-run`` memory estimates: activations measured on the meta device, optimizer state by ZeRO stage."""

from __future__ import annotations

import pytest
import torch

from medbench.plan import activation_bytes, memory_estimate, parameter_count


def real_saved_bytes(backbone: str, batch: int, size: int, channels: int = 3) -> int:
    """The same count as ``activation_bytes``, on a real CPU forward (data pointers identify storages)."""
    from medbench.backbones.registry import get_backbone

    torch.manual_seed(0)
    model = get_backbone(backbone).build(num_classes=2, in_chans=channels)
    model.train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            saved[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(torch.randn(batch, channels, size, size))
    return sum(saved.values())


@pytest.mark.parametrize("backbone", ["cbr-tiny", "timm/test_resnet"])
def test_meta_measurement_equals_a_real_forward(backbone: str) -> None:
    assert activation_bytes(backbone, 2, 3, 64, 2) == real_saved_bytes(backbone, 2, 64)


def test_activations_scale_with_micro_batch_and_resolution() -> None:
    a4, a8 = activation_bytes("resnet50", 2, 3, 64, 4), activation_bytes("resnet50", 2, 3, 64, 8)  # meta: free
    assert 1.95 < a8 / a4 <= 2.0  # linear but for per-channel statistics
    assert 3.5 < activation_bytes("resnet50", 2, 3, 128, 4) / a4 < 4.5  # ~ pixels


def test_zero_stages_partition_optimizer_state_and_gradients() -> None:
    from medbench.backbones import create_model

    n = parameter_count("cbr-small", 5, 1)
    assert n == sum(p.numel() for p in create_model("cbr-small", num_outputs=5, in_chans=1).model.parameters())
    stage0 = memory_estimate("cbr-small", 5, 1, 32, 8)
    assert (stage0["params"], stage0["grads"], stage0["optimizer"]) == (4 * n, 4 * n, 4 * n)
    stage1 = memory_estimate("cbr-small", 5, 1, 32, 8, zero_stage=1, world_size=4)
    # momentum and the fp32 master copy, each split over 4 ranks; gradients whole
    assert stage1["optimizer"] == 4 * n // 4 + 4 * n // 4 and stage1["grads"] == 4 * n
    stage2 = memory_estimate("cbr-small", 5, 1, 32, 8, zero_stage=2, world_size=4)
    assert stage2["grads"] == 4 * n // 4
    assert stage0["total"] == sum(stage0[k] for k in ("params", "grads", "optimizer", "activations"))
    assert memory_estimate("cbr-small", 5, 1, 32, 8, precision="bf16")["activations_upper_bound"]


def test_dry_run_prints_memory_per_device(capsys: pytest.CaptureFixture) -> None:
    from medbench.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["run", "--backbone", "bit-m-r50x1", "--task", "smoke-tb", "--dry-run", "--micro-batch", "8"])
    out = capsys.readouterr().out
    assert exc.value.code == 0
    assert "GB/device" in out
    line = next(li for li in out.splitlines() if li.startswith("memory per device"))
    assert "micro-batch 8" in line and "activations" in line and "measured on the meta device" in line
