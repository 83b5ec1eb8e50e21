"""A scaled number format: element codec + scale rule + the blocks that share a scale (spec/formats.md).

    fmt = FORMATS["mxfp4"]
    q = fmt.quantize(x, dim=-1, rounding="stochastic", seed=7)   # codes (uint8) + scales
    q.dequantize()                                                 # == fmt.fake(x, -1, "stochastic", 7)

Pure functions of (x, dim, rounding, seed): stochastic rounding draws grid.uniform_noise of the
element's flat index in the (padded) block view. `fake` is the fused quantize-dequantize the
training path runs: one C kernel pass (kernel.py) where it builds, else these torch operations
(the same values bit for bit).
With floor E8M0 scales and stochastic rounding the elements are multiplied by 3/4 before rounding
and divided after (Tseng et al.): the block maximum cannot clip, so SR stays unbiased.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

import fqtrun.quant.formats.kernel as kernel
import fqtrun.quant.formats.scales as scales
from fqtrun.quant.formats.blocks import Layout, layout
from fqtrun.quant.formats.elements import E4M3, ROUNDINGS, FloatElement
from fqtrun.quant.grid import seed_keys, uniform_noise
from fqtrun.quant.numerics import NonFiniteError, check_range
from fqtrun.quant.transforms import RandomHadamard

Tensor = torch.Tensor

SCALE_RULES = ("floor", "rceil")
SR_PRESCALE = 0.75  # floor E8M0 scales + SR (spec/formats.md, "Rounding")
# a dequantized value past float32's range (a block at ~3e38 whose top code maps higher) saturates there
FLOAT32_MAX = torch.finfo(torch.float32).max


@dataclass(frozen=True)
class Quantized:
    """Codes and scales of a quantized tensor; dequantize() gives back the fake-quantized values.

    codes:  uint8 element bit patterns (sign | exponent | mantissa), x's shape
    scales: float32, one per block (Layout.scale_shape): what each block's elements are multiplied by
    scale_codes: uint8 E8M0 biased exponents (MX) or E4M3 bit patterns (NVFP4 block scales); None (fp32)
    tensor_scale: NVFP4's FP32 tensor scale (already inside `scales`); None otherwise
    """

    codes: Tensor
    scales: Tensor
    scale_codes: Tensor | None
    tensor_scale: Tensor | None
    format: Format
    layout: Layout
    prescale: float
    dtype: torch.dtype

    def dequantize(self) -> Tensor:
        elems = self.layout.to_blocks(self.format.element.decode(self.codes))
        y = elems * self.scales.reshape(self.layout.block_scale_shape)
        if self.prescale != 1.0:
            y = y / self.prescale
        return self.layout.from_blocks(y.clamp(-FLOAT32_MAX, FLOAT32_MAX)).to(self.dtype)


@dataclass(frozen=True)
class Format:
    """One number format. scaling: tensor | row | block (blocks.py); scale: fp32 | e8m0 | e4m3, NVFP4's E4M3
    block scales times an FP32 tensor scale (scales.py)."""

    name: str
    element: FloatElement
    scaling: str = "tensor"
    block: int = 0  # elements per block along dim (scaling=block); tiles of block x block with two_d
    scale: str = "fp32"
    rule: str = "floor"  # e8m0 only
    two_d: bool = False

    @property
    def bits(self) -> int:
        return self.element.bits

    @property
    def orientation_free(self) -> bool:
        """True when the quantized values do not depend on dim (one tensor scale, or 2-D tiles)."""
        return self.scaling == "tensor" or self.two_d

    def label(self) -> str:
        """The name with the options that change it (rceil, 2-D blocks)."""
        extra = [self.rule] if self.scale == "e8m0" and self.rule != "floor" else []
        return "+".join([self.name, *extra, *(["2d"] if self.two_d else [])])

    def with_options(self, scale_rule: str | None = None, block_2d: bool | None = None) -> Format:
        """This format with another MX scale rule or 2-D tiles (one-line ValueError when it has no such option)."""
        out = self
        if scale_rule is not None and scale_rule != self.rule:
            if scale_rule not in SCALE_RULES:
                raise ValueError(f"scale_rule={scale_rule!r} is unknown: use one of {', '.join(SCALE_RULES)}")
            if self.scale != "e8m0":
                raise ValueError(f"scale_rule={scale_rule} applies to MX formats (E8M0 scales), not {self.name}")
            out = dataclasses.replace(out, rule=scale_rule)
        if block_2d:
            if self.scaling != "block":
                raise ValueError(f"2-D blocks apply to block-scaled formats (mx*, nvfp4, fp8_e4m3_b128), "
                                 f"not {self.name}")
            out = dataclasses.replace(out, two_d=True)
        return out

    def prescale(self, rounding: str) -> float:
        return SR_PRESCALE if rounding == "stochastic" and self.scale == "e8m0" and self.rule == "floor" else 1.0

    # ----- the passes ------------------------------------------------------------------------
    def fake(self, x: Tensor, dim: int = -1, rounding: str = "nearest", seed: int = 0,
             transform: RandomHadamard | None = None, key: int = 0) -> Tensor:
        """Quantize-dequantize x along dim, after `transform` along dim with `key` if given (then dim
        has the transform's padded length), in one pass where the C kernel runs; x's dtype."""
        self._check(x, dim, rounding)
        if x.numel() == 0:
            return x.clone() if transform is None else transform.forward(x, dim, key)
        xf = x.detach().float().contiguous()
        d = dim % x.dim() if x.dim() else 0
        if x.dim() and kernel.usable(xf):
            return self._kernel_fake(xf, d, rounding, seed, transform, key).to(x.dtype)
        if transform is not None:
            xf = transform.forward(xf, d, key)
        xb, lay = self._blocks(xf, d)
        y, amax = _fake_blocks(xb, lay.axes, seed if rounding == "stochastic" else None, self, rounding)
        check_range(amax)
        return lay.from_blocks(y).to(x.dtype)

    def _kernel_fake(self, xf: Tensor, d: int, rounding: str, seed: int, transform: RandomHadamard | None,
                     key: int) -> Tensor:
        """fake() through the C kernel (the torch path's values) in one pass that transforms and quantizes;
        a tensor scale (tensor-scaled, NVFP4) first needs the amax of the (transformed) tensor: one more
        read, nothing written. Only 2-D tiles across a transformed dim other than 0 transform as a pass of
        their own first (their tiles span rows the line pass does not hold together)."""
        shape = tuple(xf.shape)
        a, length, b = math.prod(shape[:d]), shape[d], math.prod(shape[d + 1:])
        out_len = length if transform is None else transform.padded(length)
        out_shape = (*shape[:d], out_len, *shape[d + 1:])
        src, rht, g, into = xf.view(a, length, b), None, 0, None
        tamax, fixed = 0.0, self.scaling == "tensor"
        if transform is not None:
            rht = (transform.block, transform.rsqrt, key)  # the kernel draws sign_vector's signs from the key
            if self.two_d and (d != 0 or len(shape) < 2):
                src, bad, tamax = kernel.run(src, out_len, out_len, b, transform.block, transform.block, 1, rht,
                                             self.element, "none", 0, 0.0, False, 1.0, "nearest", (0, 0))
                _raise_if(bad)
                rht, length, into = None, out_len, src
            else:
                g = transform.block
        if (fixed or self.scale == "e4m3") and into is None:
            tamax = -1.0  # the kernel finds the tensor amax first, in the same call
        lay = layout(out_shape, d, self.scaling, self.block, self.two_d)
        kind = self.rule if self.scale == "e8m0" else self.scale
        common = (self.element, kind, self.element.emax, tamax, fixed, self.prescale(rounding), rounding,
                  seed_keys(seed))
        if fixed and g:  # one scale; lines along dim to transform (noise index: the flat one)
            x3, args = src, (out_len, out_len, b, g, g, 1)
        elif fixed:
            n = src.numel()
            x3, args = src.view(1, n, 1), (n, n, 1, 256, 256, 1)
        elif self.two_d:
            (rows, cols), (rq, cq) = lay.flat, lay.padded
            x3, args = src.reshape(1, -1, cols), (rows, rq, cq, max(self.block, g), self.block, self.block)
        else:
            k = out_len if self.scaling == "row" else self.block
            x3, args = src, (out_len, lay.padded[1], b, max(k, g), k, 1)
        y, bad, _ = kernel.run(x3, *args, rht, *common, out=None if into is None else x3)
        _raise_if(bad)
        return y.view(out_shape)

    def quantize(self, x: Tensor, dim: int = -1, rounding: str = "nearest", seed: int = 0) -> Quantized:
        """Codes and scales of x along dim (dequantize() == fake(x, dim, rounding, seed)); the torch path."""
        self._check(x, dim, rounding)
        if x.numel() == 0:
            raise ValueError(f"{self.name}: cannot quantize an empty tensor (shape {tuple(x.shape)})")
        xb, lay = self._blocks(x.detach().float(), dim % x.dim() if x.dim() else 0)
        amax, tamax = _amax(xb, lay.axes)
        check_range(tamax)
        v, scale, block, t_scale = _scaled(xb, amax, tamax, self, rounding)
        elems = self.element.round(v, rounding, _noise(xb, seed if rounding == "stochastic" else None))
        codes = lay.from_blocks(self.element.encode(elems))
        shape = lay.scale_shape
        if self.scale == "e8m0":
            scale_codes = (scales.e8m0_exponent(amax, self.element, self.rule) + 127).to(torch.uint8)
        elif self.scale == "e4m3":
            scale_codes = E4M3.encode(block)
        else:
            scale_codes = None
        return Quantized(codes, scale.reshape(shape),
                         None if scale_codes is None else scale_codes.reshape(shape),
                         t_scale, self, lay, self.prescale(rounding), x.dtype)

    def saturated(self, x: Tensor, dim: int = -1, rounding: str = "nearest") -> Tensor:
        """bool, x's shape: elements beyond the largest element value after scaling (clipped to it), past
        float rounding of the scale (a block maximum that lands a few ulps above the top code is not)."""
        self._check(x, dim, rounding)
        if x.numel() == 0:
            return torch.zeros(x.shape, dtype=torch.bool, device=x.device)
        xb, lay = self._blocks(x.detach().float(), dim % x.dim() if x.dim() else 0)
        amax, tamax = _amax(xb, lay.axes)
        check_range(tamax)
        v = _scaled(xb, amax, tamax, self, rounding)[0]
        return lay.from_blocks(v.abs() > self.element.max * (1.0 + 2.0**-20))

    def _check(self, x: Tensor, dim: int, rounding: str) -> None:
        if rounding not in ROUNDINGS:
            raise ValueError(f"rounding={rounding!r} is unknown: use one of {', '.join(ROUNDINGS)}")
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise ValueError(f"{self.name}: expects a floating-point tensor, got "
                             f"{x.dtype if isinstance(x, Tensor) else type(x).__name__}")
        if x.dim() and not -x.dim() <= dim < x.dim():
            raise ValueError(f"dim={dim} is out of range for a tensor of shape {tuple(x.shape)}")

    def _blocks(self, xf: Tensor, d: int) -> tuple[Tensor, Layout]:
        """xf (float32) as its 4-D block view along dim d, and the layout (a 0-d tensor counts as 1-D)."""
        lay = layout(tuple(xf.shape) if xf.dim() else (1,), d, self.scaling, self.block, self.two_d)
        return lay.to_blocks(xf), lay


def _raise_if(bad: bool) -> None:
    if bad:
        raise NonFiniteError()


# ----- the math of the torch path --------------------------------------------------------------------
def _noise(xb: Tensor, seed: int | None) -> Tensor | None:
    """uniform_noise of every element of the block view (its flat index), or None (nearest)."""
    return None if seed is None else uniform_noise(xb.shape, seed, xb.device)


def _amax(xb: Tensor, axes: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """(amax per block, kept dims; amax of the tensor): NaN or inf anywhere makes the latter non-finite."""
    amax = xb.abs().amax(dim=axes, keepdim=True)
    return amax, amax.amax()


def _scaled(xb: Tensor, amax: Tensor, tamax: Tensor, fmt: Format,
            rounding: str) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """(elements before rounding, per-block dequantization scale, E4M3 block scales, tensor scale)."""
    pre = fmt.prescale(rounding)
    if fmt.scale == "e4m3":
        to_elements, scale, block, t_scale = scales.nvfp4_scales(amax, tamax, fmt.element,
                                                                 up=rounding == "stochastic")
        return xb * to_elements, scale, block, t_scale
    if fmt.scale == "e8m0":
        scale = scales.pow2(scales.e8m0_exponent(amax, fmt.element, fmt.rule))
    else:
        scale = scales.fp32_scale(amax, fmt.element)
    v = xb / scale
    return (v * pre if pre != 1.0 else v), scale, None, None


def _fake_blocks(xb: Tensor, axes: tuple[int, ...], seed: int | None, fmt: Format,
                 rounding: str) -> tuple[Tensor, Tensor]:
    """(dequantized block view, tensor amax): the whole fake-quantization pass."""
    amax, tamax = _amax(xb, axes)
    v, scale, _, _ = _scaled(xb, amax, tamax, fmt, rounding)
    y = fmt.element.round(v, rounding, _noise(xb, seed)) * scale
    pre = fmt.prescale(rounding)
    return (y / pre if pre != 1.0 else y).clamp(-FLOAT32_MAX, FLOAT32_MAX), tamax

