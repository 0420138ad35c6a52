"""BiT-HyperRule: schedule by size, learning rate per step, MixUp and resolution rules."""

from __future__ import annotations

import pytest

from medbench.spec import HyperRuleSpec, InputSpec
from medbench.train.hyperrule import (
    make_plan,
    resolve_input,
    rule_mixup_alpha,
    rule_resolution,
    rule_schedule,
)


def bit_get_lr(step: int, dataset_size: int, base_lr: float = 0.003) -> float | None:
    """google-research/big_transfer bit_hyperrule.get_lr, restated for comparison."""
    supports = rule_schedule(dataset_size)
    if step < supports[0]:
        return base_lr * step / supports[0]
    if step >= supports[-1]:
        return None
    for s in supports[1:]:
        if s < step:
            base_lr /= 10
    return base_lr


@pytest.mark.parametrize(("n", "expected"), [
    (1, (100, 200, 300, 400, 500)), (19_999, (100, 200, 300, 400, 500)),
    (20_000, (500, 3000, 6000, 9000, 10_000)), (499_999, (500, 3000, 6000, 9000, 10_000)),
    (500_000, (500, 6000, 12_000, 18_000, 20_000)),
])
def test_schedule_by_size(n: int, expected: tuple[int, ...]) -> None:
    assert rule_schedule(n) == expected
    plan = make_plan(n, HyperRuleSpec())
    assert (plan.warmup, *plan.decays, plan.total_steps) == expected


@pytest.mark.parametrize("n", [5_000, 100_000, 600_000])
def test_lr_matches_big_transfer(n: int) -> None:
    plan = make_plan(n, HyperRuleSpec())  # batch 512: lr = base lr
    for step in range(plan.total_steps):
        assert plan.lr_at(step) == pytest.approx(bit_get_lr(step, n))


def test_lr_scales_with_batch_and_overrides() -> None:
    plan = make_plan(1000, HyperRuleSpec(batch_size=128, base_lr=0.004, schedule=[1, 2, 3, 4, 6]))
    assert plan.lr == pytest.approx(0.001)
    assert [plan.lr_at(s) for s in range(6)] == pytest.approx([0, 0.001, 0.001, 1e-4, 1e-5, 1e-6])


def test_mixup_and_resolution_rules() -> None:
    assert rule_mixup_alpha(19_999) == 0.0 and rule_mixup_alpha(20_000) == 0.1
    assert make_plan(30_000, HyperRuleSpec()).mixup_alpha == 0.1
    assert make_plan(30_000, HyperRuleSpec(mixup_alpha=0.0)).mixup_alpha == 0.0
    assert rule_resolution(28, 28) == (160, 128) and rule_resolution(95, 96) == (160, 128)
    assert rule_resolution(96, 96) == (512, 480) and rule_resolution(2000, 2500) == (512, 480)
    assert resolve_input(InputSpec(), (64, 64)) == (160, 128)
    assert resolve_input(InputSpec(resize=256), (1024, 1024)) == (256, 256)
    assert resolve_input(InputSpec(resize=40, crop=32), None) == (40, 32)


def test_max_steps_caps_and_keeps_shape() -> None:
    plan = make_plan(1000, HyperRuleSpec(), max_steps=50)
    assert (plan.warmup, *plan.decays, plan.total_steps) == (10, 20, 30, 40, 50)
    tiny = make_plan(1000, HyperRuleSpec(), max_steps=2)
    assert tiny.total_steps == 2 and tiny.lr_at(0) > 0  # no warm-up left: the first step trains
    assert make_plan(1000, HyperRuleSpec(), max_steps=10_000).total_steps == 500  # a cap never extends
    assert make_plan(1000, HyperRuleSpec(schedule_scale=0.1)).total_steps == 50
