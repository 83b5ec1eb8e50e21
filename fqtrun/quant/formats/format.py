"""A scaled number format: element codec + scale rule + the blocks that share a scale (spec/formats.md).

    fmt = FORMATS["mxfp4"]
    q = fmt.quantize(x, dim=-1, rounding="stochastic", seed=7)   # codes (uint8) + scales
    q.dequantize()                                                 # == fmt.fake(x, -1, "stochastic", 7)

Pure functions of (x, dim, rounding, seed): stochastic rounding draws grid.uniform_noise of the
element's flat index in the (padded) block view. `fake` is the fused quantize-dequantize the
training path runs, eager or through one torch.compile'd kernel (`compile=True`, same values).
With floor E8M0 scales and stochastic rounding the elements are multiplied by 3/4 before rounding
and divided after (Tseng et al.): the block maximum cannot clip, so SR stays unbiased.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from dataclasses import dataclass

import torch

from fqtrun.quant.formats import scales
from fqtrun.quant.formats.blocks import Layout, layout
from fqtrun.quant.formats.elements import E4M3, ROUNDINGS, FloatElement
from fqtrun.quant.grid import index_noise, seed_keys
from fqtrun.quant.numerics import check_range

Tensor = torch.Tensor

SCALINGS = ("tensor", "row", "block")
SCALE_KINDS = ("fp32", "e8m0", "e4m3")  # e4m3: NVFP4's E4M3 block scales times an FP32 tensor scale
SCALE_RULES = ("floor", "rceil")
SR_PRESCALE = 0.75  # floor E8M0 scales + SR (spec/formats.md, "Rounding")


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
        return self.layout.from_blocks(y).to(self.dtype)


@dataclass(frozen=True)
class Format:
    """One number format. scaling: tensor | row | block; scale: fp32 | e8m0 | e4m3 (see scales.py)."""

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

    def layout_of(self, x: Tensor, dim: int) -> Layout:
        return layout(tuple(x.shape), dim, self.scaling, self.block, self.two_d)

    def prescale(self, rounding: str) -> float:
        return SR_PRESCALE if rounding == "stochastic" and self.scale == "e8m0" and self.rule == "floor" else 1.0

    # ----- the passes ------------------------------------------------------------------------
    def fake(self, x: Tensor, dim: int = -1, rounding: str = "nearest", seed: int = 0,
             compile: bool = False) -> Tensor:
        """Quantize-dequantize x along dim in one pass (x's shape and dtype)."""
        xb, lay = self._blocks(x, dim, rounding)
        if xb is None:
            return x.clone()
        keys = _keys(seed, xb.device) if rounding == "stochastic" else None
        if compile:
            try:
                y, amax = _compiled(self, rounding)(xb, keys)
            except Exception as err:  # noqa: BLE001 (no compiler, unsupported device: stay correct, eager)
                warnings.warn(f"{self.name}: torch.compile failed ({err!r:.200}); running eager")
                compile = False
        if not compile:
            y, amax = _fake_blocks(xb, keys, self, rounding)
        check_range(amax)
        return lay.from_blocks(y).to(x.dtype)

    def quantize(self, x: Tensor, dim: int = -1, rounding: str = "nearest", seed: int = 0) -> Quantized:
        """Codes and scales of x along dim (dequantize() == fake(x, dim, rounding, seed))."""
        xb, lay = self._blocks(x, dim, rounding)
        if xb is None:
            raise ValueError(f"{self.name}: cannot quantize an empty tensor (shape {tuple(x.shape)})")
        keys = _keys(seed, xb.device) if rounding == "stochastic" else None
        amax, tamax = _amax(xb, lay.axes)
        check_range(tamax)
        v, scale, block, t_scale = _scaled(xb, amax, tamax, self, rounding)
        elems = self.element.round(v, rounding, _noise(xb, keys))
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
        """bool, x's shape: elements beyond the largest element value after scaling (clipped to it)."""
        xb, lay = self._blocks(x, dim, rounding)
        if xb is None:
            return torch.zeros(x.shape, dtype=torch.bool, device=x.device)
        amax, tamax = _amax(xb, lay.axes)
        check_range(tamax)
        v = _scaled(xb, amax, tamax, self, rounding)[0]
        return lay.from_blocks(v.abs() > self.element.max)

    def _blocks(self, x: Tensor, dim: int, rounding: str) -> tuple[Tensor | None, Layout]:
        if rounding not in ROUNDINGS:
            raise ValueError(f"rounding={rounding!r} is unknown: use one of {', '.join(ROUNDINGS)}")
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise ValueError(f"{self.name}: expects a floating-point tensor, got "
                             f"{x.dtype if isinstance(x, Tensor) else type(x).__name__}")
        if x.dim() and not -x.dim() <= dim < x.dim():
            raise ValueError(f"dim={dim} is out of range for a tensor of shape {tuple(x.shape)}")
        lay = self.layout_of(x.reshape(-1) if x.dim() == 0 else x, dim if x.dim() else 0)
        if x.numel() == 0:
            return None, lay
        return lay.to_blocks(x.detach().float()), lay


# ----- the math, shared by the eager and the compiled pass -----------------------------------------
def _keys(seed: int, device) -> Tensor:
    """The noise keys of a seed as an int64 tensor (an input, not a constant, under torch.compile)."""
    return torch.tensor(seed_keys(seed), dtype=torch.int64, device=device)


def _noise(xb: Tensor, keys: Tensor | None) -> Tensor | None:
    """uniform_noise of every element of the block view (its flat index), or None (nearest)."""
    if keys is None:
        return None
    index = torch.arange(xb.numel(), dtype=torch.int64, device=xb.device).view(xb.shape)
    return index_noise(index, keys[0], keys[1])


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


def _fake_blocks(xb: Tensor, keys: Tensor | None, fmt: Format, rounding: str) -> tuple[Tensor, Tensor]:
    """(dequantized block view, tensor amax): the whole fake-quantization pass."""
    amax, tamax = _amax(xb, _axes(fmt, xb))
    v, scale, _, _ = _scaled(xb, amax, tamax, fmt, rounding)
    y = fmt.element.round(v, rounding, _noise(xb, keys)) * scale
    pre = fmt.prescale(rounding)
    return (y / pre if pre != 1.0 else y), tamax


def _axes(fmt: Format, xb: Tensor) -> tuple[int, ...]:
    if fmt.scaling == "tensor":
        return (0, 1, 2, 3)
    return (1, 3) if fmt.two_d else (2,)


@functools.cache
def _compiled(fmt: Format, rounding: str):
    """One compiled pass per (format, rounding): dynamo keeps few graphs per function, so each
    combination gets its own (dynamic shapes: one graph serves every size)."""
    return torch.compile(functools.partial(_fake_blocks, fmt=fmt, rounding=rounding), dynamic=True)
