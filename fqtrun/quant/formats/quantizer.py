"""A quantizer slot (w, a, dx, dw) in a number format: fake-quantizes the operands it feeds.

The simulate backend hands it each operand with the dimension the consuming GEMM reduces over
(`fake(t, dim, seed)`), so one slot quantizes W along in-features for the forward GEMM and along
out-features for the dX GEMM (spec/formats.md: "A block always runs along the reduction dimension
of the GEMM that consumes the operand"). A gradient slot may carry the transform of its GEMM
(quant/transforms.py), which the backend applies to both of that GEMM's operands first.
`dim` is the slot's own GEMM orientation in the layer's 2-D view (w, a, dx: 1; dw: 0), the default
of every method; `saturated(x)` is what the numerics probe asks.
"""

from __future__ import annotations

import torch

from fqtrun.quant import ops
from fqtrun.quant.formats import make_format
from fqtrun.quant.formats.elements import ROUNDINGS
from fqtrun.quant.formats.format import Format, Quantized
from fqtrun.quant.transforms import RandomHadamard

Tensor = torch.Tensor

SLOT_DIMS = {"w": 1, "a": 1, "dx": 1, "dw": 0}  # reduction dim of the slot's own GEMM (Linear: (rows, features))


class FormatQuantizer:
    """Format + rounding (+ its GEMM's transform) of one slot; plain object, no trainer needed."""

    takes_mask = False

    def __init__(self, fmt: Format, rounding: str = "nearest", transform: RandomHadamard | None = None,
                 dim: int = 1, setting: str = "quant.format"):
        self.format, self.rounding, self.transform = fmt, rounding, transform
        self.dim, self.setting = dim, setting
        if rounding not in ROUNDINGS:
            raise ValueError(f"{setting}: rounding={rounding!r} is unknown: use nearest or stochastic")

    @property
    def name(self) -> str:
        return self.format.label()

    @property
    def bits(self) -> int:
        """The element's bits (fixed by the format)."""
        return self.format.bits

    @bits.setter
    def bits(self, value: int) -> None:
        if value != self.format.bits:
            raise ValueError(f"{self.setting}={self.format.name} has {self.format.bits}-bit elements: a precision "
                             f"schedule cannot set {value} bits on it (schedules change integer slots only)")

    @property
    def orientation_free(self) -> bool:
        return self.format.orientation_free

    def fake(self, x: Tensor, dim: int | None = None, seed: int | Tensor = 0,
             transform: RandomHadamard | None = None, key: int | Tensor | None = 0) -> Tensor:
        """x quantize-dequantized along dim (the consuming GEMM's reduction), after `transform` along dim
        with `key` when given (one fused pass); no autograd. While torch traces, the op fqtrun::format_fake
        (quant/ops.py), whose seed and key may be 0-d int64 tensors."""
        dim = self.dim if dim is None else dim
        if ops.tracing():
            f, t = self.format, transform
            return ops.format_fake(x.detach(), f.name, f.rule, f.two_d, self.rounding, dim, ops.as_seed(seed),
                                   0 if t is None else t.block, "step" if t is None else t.signs,
                                   ops.as_seed(0 if key is None else key))
        with torch.no_grad():
            return self.format.fake(x, dim, self.rounding, ops.seed_value(seed), transform,
                                    ops.seed_value(0 if key is None else key))

    def __call__(self, x: Tensor, seed: int = 0, dim: int | None = None) -> Tensor:
        """Fake-quantized x with a straight-through backward (the slot interface of the other quantizers)."""
        return x + (self.fake(x, dim, seed) - x).detach()

    def quantize(self, x: Tensor, seed: int = 0, dim: int | None = None) -> Quantized:
        """Codes and scales (Quantized.dequantize() == fake(x, dim, seed))."""
        return self.format.quantize(x.detach(), self.dim if dim is None else dim, self.rounding, seed)

    def saturated(self, x: Tensor, dim: int | None = None) -> Tensor:
        """bool, x's shape: the elements clipped to the largest element value (numerics health)."""
        with torch.no_grad():
            return self.format.saturated(x, self.dim if dim is None else dim, self.rounding)

    def __repr__(self) -> str:
        t = f", transform=rht{self.transform.block}" if self.transform is not None else ""
        return f"FormatQuantizer({self.name}, {self.rounding}{t})"


def _format_op(x: Tensor, format: str, rule: str, two_d: bool, rounding: str, dim: int, seed: Tensor, rht_block: int,
               rht_signs: str, key: Tensor) -> Tensor:
    """fqtrun::format_fake's implementation (quant/ops.py): Format.fake run eager."""
    transform = RandomHadamard(rht_block, rht_signs) if rht_block else None
    with torch.no_grad():
        return make_format(format, rule, two_d).fake(x, dim, rounding, ops.seed_value(seed), transform,
                                                     ops.seed_value(key))


ops.implement(ops.format_fake, _format_op)
