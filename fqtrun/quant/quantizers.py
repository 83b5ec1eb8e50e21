"""Forward quantizers: min-max uniform grid, round-to-nearest, straight-through backward.

Used for the weights and input activations of every quantized layer (QAT and FQT forward,
spec/fqt.md "The three regimes"). `bits` is a plain attribute so precision schedules can
change it at every step. MinMaxQuantizer dequantizes on its own grid (STE backward);
RidgeQuantizer dequantizes with a ridge fit of x on the codes (spec/denoise_bn.md, part A).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fqtrun.quant import grid, ops, ridge
from fqtrun.quant.bits import check_bits
from fqtrun.quant.native import minmax as native_minmax

Tensor = torch.Tensor

GRANULARITIES = ("tensor", "channel")


@dataclass
class QuantCodes:
    """Integer codes (float tensor of integers in 0..B) with the grid that maps them back."""

    codes: Tensor
    scale: Tensor
    zero: Tensor

    def dequantize(self) -> Tensor:
        return grid.dequantize(self.codes, self.scale, self.zero)


class MinMaxQuantizer:
    """Uniform min-max quantizer with exact zero, per tensor or per channel (dim 0)."""

    def __init__(self, bits: int, granularity: str = "tensor", setting: str = "quant.bits"):
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity={granularity!r} is unknown: use one of {', '.join(GRANULARITIES)}")
        self.setting = setting
        self.bits = check_bits(bits, setting)
        self.granularity = granularity

    def grid_of(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(scale, zero) of x's min-max grid, per tensor or per channel."""
        return grid.minmax_grid(x, self.bits, keep_dim=0 if self.granularity == "channel" else None)

    def codes(self, x: Tensor) -> QuantCodes:
        scale, zero = self.grid_of(x)
        return QuantCodes(grid.quantize_nearest(x.detach(), scale, zero, self.bits), scale, zero)

    def saturated(self, x: Tensor) -> Tensor:
        """Elements the clamp to 0..B clips (numerics health): rounding the zero point can leave an end of
        the range half a step off the grid, e.g. 2 bits on [-1.5, 1.5] (scale 1, zero 2) clips 1.5 to 1.
        Codes grow with x, so elements are compared only when a grid's smallest or largest one clips."""
        scale, zero = self.grid_of(x)
        xd = x.detach()
        rows = xd.reshape(len(xd), -1) if self.granularity == "channel" else xd.reshape(1, -1)
        ends = torch.stack([rows.amin(1), rows.amax(1)], 1)  # (grids, 2)
        big = grid.levels(self.bits)

        def clipped(t: Tensor, s: Tensor, z: Tensor) -> Tensor:
            u = torch.round(t / s) + z
            return (u < 0) | (u > big)

        if not bool(clipped(ends, scale.reshape(-1, 1), zero.reshape(-1, 1)).any()):
            return torch.zeros(x.shape, dtype=torch.bool, device=x.device)
        return clipped(xd, scale, zero)

    def fake(self, x: Tensor) -> Tensor:
        """codes(x).dequantize(), no autograd: two C passes where they run (native/minmax.py); the op
        fqtrun::minmax_fake while torch traces (quant/ops.py)."""
        if ops.tracing():
            return ops.minmax_fake(x.detach(), self.bits, self.granularity)
        fast = native_minmax.fake(x, self.bits, self.granularity == "channel", straight_through=False)
        return self.codes(x).dequantize() if fast is None else fast

    def __call__(self, x: Tensor) -> Tensor:
        """Fake-quantized x, x + (x_hat - x) with the identity as its backward (straight-through estimator):
        its value from the C passes in eager mode where they run."""
        if not ops.tracing():
            fast = native_minmax.fake(x, self.bits, self.granularity == "channel", straight_through=True)
            if fast is not None:
                return _StraightThrough.apply(x, fast)
        return x + (self.fake(x) - x).detach()

    def __repr__(self) -> str:
        return f"MinMaxQuantizer(bits={self.bits}, granularity={self.granularity!r})"


class _StraightThrough(torch.autograd.Function):
    """value: the given straight-through value (computed without autograd); gradient: the identity to x."""

    @staticmethod
    def forward(ctx, x: Tensor, value: Tensor) -> Tensor:
        return value

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


def _minmax_op(x: Tensor, bits: int, granularity: str) -> Tensor:
    """fqtrun::minmax_fake's implementation (quant/ops.py): MinMaxQuantizer.fake run eager (its C call where
    it runs)."""
    return MinMaxQuantizer(bits, granularity).fake(x).to(x.dtype)


ops.implement(ops.minmax_fake, _minmax_op)

RIDGE_FORMS = ("affine", "linear")


@dataclass
class RidgeCodes:
    """Integer codes with the per-block affine map the ridge fit found: x_hat = codes * scale + offset."""

    codes: Tensor
    scale: Tensor
    offset: Tensor

    def dequantize(self) -> Tensor:
        return self.codes * self.scale + self.offset


class RidgeQuantizer:
    """Fake quantization with denoising (ridge) dequantization, spec/denoise_bn.md part A.

    Granularity: "tensor", "channel" (one block per index of channel_dim) or sub-channel blocks of
    `block` elements along each channel row (`block` set). ternary=True uses codes -1, 0, 1 whatever
    `bits` says (bits stays the storage width, 2, for bookkeeping). Gradients flow through the scaled
    input, the fit statistics and the fit; only the rounding residual is detached. A sparsity `mask`
    (see QuantLayerMixin) is fed separately: the codes see mask * x, the fit sees the dense x, and the
    masked entries are exactly zero in the forward value (straight-through to the dense x).
    """

    takes_mask = True  # the layer passes (dense weight, mask) instead of the masked weight

    def __init__(self, bits: int, form: str = "affine", lam: float = 0.01, granularity: str = "tensor",
                 block: int | None = None, channel_dim: int = 0, ternary: bool = False,
                 setting: str = "quant.bits"):
        if form not in RIDGE_FORMS:
            raise ValueError(f"quant.ridge_form={form!r} is unknown: use one of {', '.join(RIDGE_FORMS)}")
        if not lam >= 0:
            raise ValueError(f"quant.ridge_lambda={lam} must be >= 0 (the paper uses 0.01)")
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity={granularity!r} is unknown: use one of {', '.join(GRANULARITIES)}")
        if block is not None and (isinstance(block, bool) or not isinstance(block, int) or block < 1):
            raise ValueError(f"quant.block={block!r} must be a positive number of elements (or null)")
        self.setting = setting
        self.bits = check_bits(bits, setting, "ridge")
        self.form, self.lam, self.ternary = form, float(lam), bool(ternary)
        self.granularity, self.block, self.channel_dim = granularity, block, channel_dim

    def _kwargs(self, x: Tensor, mask: Tensor | None) -> dict:
        if mask is not None:
            mask = torch.broadcast_to(mask, x.shape).to(torch.bool)
            if self.bits == 1 and not self.ternary:
                raise ValueError(f"{self.setting}=1 with a sparsity mask: 1-bit codes have no zero level; "
                                 f"use quant.ternary=true or {self.setting} >= 2")
        return dict(bits="ternary" if self.ternary else check_bits(self.bits, self.setting, "ridge"),
                    form=self.form, granularity="block" if self.block else self.granularity,
                    block=self.block or 1, channel_dim=self.channel_dim, mask=mask)

    def codes(self, x: Tensor, mask: Tensor | None = None) -> RidgeCodes:
        """Integer codes (float tensor of integers) and the fitted per-block scale and offset, x's shape."""
        return RidgeCodes(*ridge.ridge_parts(x, lam=self.lam, **self._kwargs(x, mask)))

    def __call__(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """Ridge-dequantized x (same shape), differentiable through the fit."""
        kw = self._kwargs(x, mask)
        y = ridge.ridge_quantize(x, lam=self.lam, **kw)
        if kw["mask"] is not None:  # the affine fit maps the zero code off 0: keep pruned entries at 0
            y = y + (torch.where(kw["mask"], y, torch.zeros_like(y)) - y).detach()
        return y

    def __repr__(self) -> str:
        where = f"block={self.block}" if self.block else f"granularity={self.granularity!r}"
        bits = "ternary" if self.ternary else self.bits
        return f"RidgeQuantizer(bits={bits}, form={self.form!r}, lambda={self.lam}, {where})"
