"""BitOPs accounting for quantized training (spec/cpt.md, "Cost accounting").

Per layer and step: MACs x (b_w b_a + b_w b_g + b_a b_g), one term per GEMM: forward
(weights x activations), input gradient (weights x grad) and weight gradient
(activations x grad); all three GEMMs have the forward's MAC count.
MACs are measured once for ONE training step's batch (the whole batch passed in, not per
sample), so summing step_bitops over the steps gives the run's total.
"""

from __future__ import annotations

import math
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
