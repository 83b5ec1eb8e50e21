"""BitOPs accounting for quantized training (spec/cpt.md, "Cost accounting").

Per layer and step: MACs x (b_w b_a + b_w b_g + b_a b_g), one term per GEMM: forward
(weights x activations), input gradient (weights x grad) and weight gradient
(activations x grad); all three GEMMs have the forward's MAC count.
MACs are measured once for ONE training step's batch (the whole batch passed in, not per
sample), so summing step_bitops over the steps gives the run's total.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d)


def _layer_macs(module: nn.Module, output: torch.Tensor) -> int:
    """MACs of one call: each output element costs one dot product of the layer's fan-in."""
    if isinstance(module, nn.Linear):
        return output.numel() * module.in_features
    # Conv: fan-in = (in_channels / groups) * kernel volume
    return output.numel() * (module.in_channels // module.groups) * math.prod(module.kernel_size)


def measure_macs(
    model: nn.Module, sample_input: Any, layer_types: tuple[type[nn.Module], ...] = LAYER_TYPES
) -> dict[str, int]:
    """MACs per Linear/Conv1d/Conv2d (and subclasses) for one forward of `sample_input`.

    Pass one training step's batch: the counts are for that whole batch. A module called
    several times in the forward has its calls summed. Runs in eval mode under no_grad and
    restores each module's training flag, so BatchNorm statistics are left untouched.
    """
    macs: dict[str, int] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, layer_types):

            def hook(mod, _inputs, output, name=name):
                macs[name] = macs.get(name, 0) + _layer_macs(mod, output)

            handles.append(module.register_forward_hook(hook))
    if not handles:
        raise ValueError(
            f"measure_macs: the model has no {', '.join(t.__name__ for t in layer_types)} layer to count"
        )
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            if isinstance(sample_input, Mapping):
                model(**sample_input)
            elif isinstance(sample_input, (tuple, list)):
                model(*sample_input)
            else:
                model(sample_input)
    finally:
        for handle in handles:
            handle.remove()
        for module, mode in modes.items():
            module.training = mode
    return macs


def _pair_cost(bits: Sequence[int]) -> int:
    b_w, b_a, b_g = bits
    return b_w * b_a + b_w * b_g + b_a * b_g


def step_bitops(macs: Mapping[str, int], bits: Mapping[str, Sequence[int]] | Sequence[int]) -> float:
    """BitOPs of one training step: sum over layers of MACs x (b_w b_a + b_w b_g + b_a b_g).

    bits: {layer: (b_w, b_a, b_g)} per layer, or one (b_w, b_a, b_g) shared by every layer.
    """
    if isinstance(bits, Mapping):
        missing = [name for name in macs if name not in bits]
        if missing:
            raise ValueError(
                f"step_bitops: no (b_w, b_a, b_g) for layers {missing}; give bits for every measured layer"
            )
        return float(sum(count * _pair_cost(bits[name]) for name, count in macs.items()))
    if len(bits) != 3:
        raise ValueError(f"step_bitops: bits={tuple(bits)} must be (b_w, b_a, b_g)")
    return float(sum(macs.values()) * _pair_cost(bits))


class BitOpsMeter:
    """Accumulates step BitOPs over training; `gbitops` is the cumulative total in GBitOPs."""

    def __init__(self, macs: Mapping[str, int]) -> None:
        self.macs = dict(macs)
        self.steps = 0
        self.total = 0.0  # BitOPs

    def update(self, bits: Mapping[str, Sequence[int]] | Sequence[int]) -> float:
        """Add one step at these bits; returns the cumulative GBitOPs (metric cost/gbitops)."""
        self.total += step_bitops(self.macs, bits)
        self.steps += 1
        return self.gbitops

    @property
    def gbitops(self) -> float:
        return self.total / 1e9


def _bits_of(schedule_or_bits: Any, step: int) -> int:
    return schedule_or_bits if isinstance(schedule_or_bits, int) else schedule_or_bits.bits_at(step)


def savings(
    fwd_schedule: Any,
    grad_schedule: Any,
    static_bits: int,
    static_grad_bits: int,
    total_steps: int,
    macs: Mapping[str, int] | None = None,
) -> float:
    """Fraction of BitOPs saved over `total_steps` against a static (b, g) run.

    Weights and activations follow fwd_schedule, gradients grad_schedule (a schedule or an
    int); with all layers sharing bits this is 1 - E_t[q_t^2 + 2 g q_t] / (b^2 + 2 b g).
    """
    if total_steps < 1:
        raise ValueError(f"savings: total_steps={total_steps} must be >= 1")
    macs = {"all": 1} if macs is None else macs
    per_bits = Counter((_bits_of(fwd_schedule, t), _bits_of(grad_schedule, t)) for t in range(total_steps))
    scheduled = sum(n * step_bitops(macs, (q, q, g)) for (q, g), n in per_bits.items())
    static = total_steps * step_bitops(macs, (static_bits, static_bits, static_grad_bits))
    return 1.0 - scheduled / static
