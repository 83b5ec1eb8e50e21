"""Learning-rate schedule as a pure function of the step (linear warm-up, then cosine/step)."""

from __future__ import annotations

import math


def lr_factor(step: int, total_steps: int, warmup_steps: int, kind: str, min_ratio: float = 0.0,
              milestones: tuple[float, ...] = (), gamma: float = 0.1) -> float:
    """Multiplier of the peak lr at `step` (0-based) of `total_steps`."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant" or total_steps <= warmup_steps:
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if kind == "cosine":
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    if kind == "step":
        return gamma ** sum(step >= m * total_steps for m in milestones)
    raise ValueError(f"lr.kind={kind!r} is unknown: use cosine, step or constant")
