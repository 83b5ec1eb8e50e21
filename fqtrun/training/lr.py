"""Learning-rate schedules: pure functions of the step (linear warm-up, then constant/cosine/step).

conf/lr/<name>.yaml targets one of the builders below with `_partial_: true`; the run completes it
with its length: `lr_at = instantiate(cfg.lr)(total_steps=N, steps_per_epoch=S)`, and the trainer
sets each group's lr to its base lr times lr_at(step).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

LrAt = Callable[[int], float]


def _warmup(warmup_epochs: float, steps_per_epoch: int, after: LrAt) -> LrAt:
    """Linear warm-up over round(warmup_epochs * steps_per_epoch) steps, then `after`."""
    if warmup_epochs < 0:
        raise ValueError(f"lr.warmup_epochs={warmup_epochs} must be >= 0")
    warmup = round(warmup_epochs * steps_per_epoch)
    return lambda step: (step + 1) / warmup if warmup > 0 and step < warmup else after(step)


def constant(warmup_epochs: float = 0.0, *, total_steps: int, steps_per_epoch: int) -> LrAt:
    """The peak lr throughout (after the warm-up)."""
    return _warmup(warmup_epochs, steps_per_epoch, lambda step: 1.0)


def cosine(warmup_epochs: float = 0.0, min_lr_ratio: float = 0.0, *, total_steps: int,
           steps_per_epoch: int) -> LrAt:
    """Cosine decay per step from the peak to min_lr_ratio x peak at the end of training."""
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"lr.min_lr_ratio={min_lr_ratio} must be in [0, 1]")
    warmup = round(warmup_epochs * steps_per_epoch)

    def at(step: int) -> float:
        if total_steps <= warmup:
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return _warmup(warmup_epochs, steps_per_epoch, at)


def step(warmup_epochs: float = 0.0, milestones: Sequence[float] = (0.5, 0.75), gamma: float = 0.1, *,
         total_steps: int, steps_per_epoch: int) -> LrAt:
    """Multiply the peak lr by gamma at each milestone (fractions of training)."""
    marks = tuple(float(m) for m in milestones)
    warmup = round(warmup_epochs * steps_per_epoch)

    def at(t: int) -> float:
        if total_steps <= warmup:
            return 1.0
        return gamma ** sum(t >= m * total_steps for m in marks)

    return _warmup(warmup_epochs, steps_per_epoch, at)
