"""Static activation scales for deployment: the trained model's activation quantizers use the min-max
range of each batch; integer BN needs fixed output grids, so each is frozen to the range its input
takes over the first training samples (spec/denoise_bn.md B)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Subset

from fqtrun.quant import grid
from fqtrun.quant.convert import quant_layers
from fqtrun.quant.quantizers import QuantCodes
from fqtrun.tasks.base import outputs


class StaticQuantizer:
    """Min-max grid frozen from a calibrated range [lo, hi]: same codes rule as MinMaxQuantizer."""

    def __init__(self, bits: int, lo: float, hi: float):
        self.bits = bits
        self.scale, self.zero = grid.minmax_grid(torch.tensor([lo, hi]), bits)

    def codes(self, x: torch.Tensor) -> QuantCodes:
        return QuantCodes(grid.quantize_nearest(x.detach(), self.scale, self.zero, self.bits), self.scale, self.zero)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.codes(x).dequantize()

    def __repr__(self) -> str:
        return f"StaticQuantizer(bits={self.bits}, scale={float(self.scale):.4g}, zero={int(self.zero)})"


@torch.no_grad()
def calibrate(model: nn.Module, dataset, samples: int, batch_size: int,
              device: torch.device) -> dict[str, tuple[float, float]]:
    """Min and max of every quantized layer's input over the first `samples` samples of `dataset`."""
    ranges: dict[str, list[float]] = {}
    handles = []
    for name, layer in quant_layers(model):
        def hook(_m, args, name=name):
            lo, hi = float(args[0].min()), float(args[0].max())
            old = ranges.get(name, [lo, hi])
            ranges[name] = [min(old[0], lo), max(old[1], hi)]
        handles.append(layer.register_forward_pre_hook(hook))
    try:
        for _ in outputs(model, Subset(dataset, range(min(samples, len(dataset)))), batch_size, device):
            pass
    finally:
        for h in handles:
            h.remove()
    return {k: (v[0], v[1]) for k, v in ranges.items()}


def freeze_activations(model: nn.Module, ranges: dict[str, tuple[float, float]], bits: int | None) -> None:
    """Swap every activation quantizer for a StaticQuantizer over its calibrated range (bits None: as trained)."""
    for name, layer in quant_layers(model):
        q = layer.slots["a"]
        if q is not None:
            layer.slots["a"] = StaticQuantizer(bits or q.bits, *ranges[name])
