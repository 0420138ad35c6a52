"""BiT-HyperRule (Kolesnikov et al. 2020; google-research/big_transfer), as medbench applies it.

* SGD, momentum 0.9, no weight decay, head zero-initialised, all layers trained.
* Learning rate ``base_lr * batch_size / 512`` (base 0.003).
* Schedule by training-set size N, in steps: the first boundary ends a linear
  warm-up, the lr is divided by 10 after each of the next three, the last ends
  training: N < 20k: 100/200/300/400/500; N < 500k: 500/3k/6k/9k/10k;
  else 500/6k/12k/18k/20k.
* MixUp with alpha 0.1 when N >= 20k.
* Resolution: images smaller than 96 x 96 in area are resized to 160 and
  randomly cropped to 128, larger ones to 512 and 480; evaluation at the crop
  size.

A task may override each choice (``hyperrule:`` in its YAML); ``--max-steps``
caps a run and scales the boundaries to keep the schedule's shape.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from medbench.spec import HyperRuleSpec, InputSpec

SMALL, MEDIUM = 20_000, 500_000
SCHEDULES = {
    "small": (100, 200, 300, 400, 500),
    "medium": (500, 3000, 6000, 9000, 10_000),
    "large": (500, 6000, 12_000, 18_000, 20_000),
}


def rule_schedule(n_train: int) -> tuple[int, ...]:
    if n_train < SMALL:
        return SCHEDULES["small"]
    if n_train < MEDIUM:
        return SCHEDULES["medium"]
    return SCHEDULES["large"]


def rule_mixup_alpha(n_train: int) -> float:
    return 0.1 if n_train >= SMALL else 0.0


def rule_resolution(height: int, width: int) -> tuple[int, int]:
    """(resize, crop) for an image of ``height`` x ``width``."""
    return (160, 128) if height * width < 96 * 96 else (512, 480)


@dataclass(frozen=True)
class TrainPlan:
    """Everything that fixes the optimisation of one run."""

    n_train: int
    batch_size: int
    lr: float
    momentum: float
    weight_decay: float
    warmup: int
    decays: tuple[int, int, int]
    total_steps: int
    mixup_alpha: float
    agc_clip: float | None
    #: validation evaluations during training (the convergence curve), the last one after the last step
    validation_points: int = 10

    def lr_at(self, step: int) -> float:
        """The learning rate of optimisation step ``step`` (0-based), as BiT's ``get_lr``."""
        if step < self.warmup:  # never true when warm-up is 0 (a capped run)
            return self.lr * step / self.warmup
        lr = self.lr
        for boundary in self.decays:
            if boundary < step:
                lr /= 10
        return lr

    @property
    def eval_every(self) -> int:
        """Steps between validation evaluations during training (the convergence curve): the schedule
        divided by ``validation_points``, at least 1; ``Finetuner.fit`` also evaluates after the last step."""
        return max(1, self.total_steps // self.validation_points)

    def as_dict(self) -> dict:
        return asdict(self)


def make_plan(n_train: int, spec: HyperRuleSpec, *, max_steps: int | None = None) -> TrainPlan:
    bounds = tuple(spec.schedule) if spec.schedule else rule_schedule(n_train)
    if spec.schedule_scale != 1.0:
        bounds = _scaled(bounds, spec.schedule_scale)
    if max_steps is not None and max_steps < bounds[-1]:
        bounds = _scaled(bounds, max_steps / bounds[-1])[:-1] + (max_steps,)
    alpha = spec.mixup_alpha if spec.mixup_alpha is not None else rule_mixup_alpha(n_train)
    return TrainPlan(
        n_train=n_train,
        batch_size=spec.batch_size,
        lr=spec.base_lr * spec.batch_size / 512,
        momentum=spec.momentum,
        weight_decay=spec.weight_decay,
        warmup=bounds[0],
        decays=(bounds[1], bounds[2], bounds[3]),
        total_steps=bounds[4],
        mixup_alpha=alpha,
        agc_clip=spec.agc_clip,
        validation_points=spec.validation_points,
    )


def _scaled(bounds: tuple[int, ...], factor: float) -> tuple[int, ...]:
    """Boundaries times ``factor``, non-decreasing, the last at least 1."""
    out: list[int] = []
    for b in bounds:
        v = int(round(b * factor))
        out.append(max(v, out[-1] if out else 0))
    out[-1] = max(out[-1], 1)
    return tuple(out)


def resolve_input(spec: InputSpec, native_hw: tuple[int, int] | None) -> tuple[int, int]:
    """(resize, crop) for a task: the spec's values, else the rule's by native size."""
    if spec.resize is not None and spec.crop is not None:
        return spec.resize, spec.crop
    if native_hw is None:
        raise ValueError("native image size needed for the resolution rule")
    rule_resize, rule_crop = rule_resolution(*native_hw)
    resize = spec.resize if spec.resize is not None else rule_resize
    crop = spec.crop if spec.crop is not None else min(rule_crop, resize)
    return resize, crop
