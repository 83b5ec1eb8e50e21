"""Number formats in a notebook, without the trainer (spec/formats.md).

    import torch
    from fqtrun.formats import quantize_dequantize, quantize

    x = torch.randn(4, 64)
    y = quantize_dequantize(x, "mxfp4", rounding="stochastic", dim=-1, seed=0)   # x's shape and dtype
    q = quantize(x, "nvfp4")            # q.codes (uint8 element bits), q.scales (one per block of 16)
    q.dequantize()                      # == quantize_dequantize(x, "nvfp4")

Formats: FORMAT_NAMES (fp8_e4m3, fp8_e5m2 with one FP32 scale per tensor; fp8_e4m3_row, fp8_e5m2_row;
fp8_e4m3_b128; mxfp8_e4m3, mxfp8_e5m2, mxfp6_e3m2, mxfp6_e2m3, mxfp4; nvfp4; int8 ... int2, the
integer min-max grids of fqtrun's QAT/FQT quantizers, one per tensor). Blocks run along `dim`;
`scale_rule` floor | rceil picks the MX scale rule; `block_2d` tiles a matrix (NVFP4 16x16,
fp8_e4m3_b128 128x128). Stochastic rounding draws counter-based noise from `seed`: the same seed
gives the same result, and E[quantize_dequantize] = x wherever nothing saturates.
`transform="rht"` returns R^T Q(x R): the random Hadamard transform (block `rht_block`, signs
from `seed`, independent of the rounding noise) along dim, the quantization in the transformed
domain, mapped back.
"""

from __future__ import annotations

import torch

from fqtrun.quant import grid
from fqtrun.quant.bits import check_bits
from fqtrun.quant.formats import FORMATS, Format, Quantized
from fqtrun.quant.formats.elements import ROUNDINGS
from fqtrun.quant.quantizers import QuantCodes
from fqtrun.quant.transforms import make_transform

Tensor = torch.Tensor

__all__ = ["FORMAT_NAMES", "quantize", "quantize_dequantize", "saturated"]

INT_FORMATS = {f"int{b}": b for b in range(8, 1, -1)}
_RHT_TAG = 0x726874  # "rht": the transform's key is mix_seed(seed, _RHT_TAG)
FORMAT_NAMES = (*FORMATS, *INT_FORMATS)


def _format(fmt: str, scale_rule: str, block_2d: bool) -> Format | int:
    """The Format of a name (its options applied), or the bits of an integer grid; one-line ValueError."""
    if fmt in INT_FORMATS:
        if scale_rule != "floor" or block_2d:
            raise ValueError(f"format {fmt}: scale_rule and block_2d apply to block-scaled float formats only")
        return INT_FORMATS[fmt]
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r} is unknown: use one of {', '.join(FORMAT_NAMES)}")
    f = FORMATS[fmt]
    return f.with_options(scale_rule if f.scale == "e8m0" or scale_rule != "floor" else None, block_2d)


def _int_codes(x: Tensor, bits: int, rounding: str, seed: int) -> QuantCodes:
    """The integer grid over the whole tensor: min-max + nearest (QAT), covering grid + SR (FQT)."""
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding={rounding!r} is unknown: use one of {', '.join(ROUNDINGS)}")
    xf = x.detach().float()
    if rounding == "nearest":
        scale, zero = grid.minmax_grid(xf, check_bits(bits, "format"))
        return QuantCodes(grid.quantize_nearest(xf, scale, zero, bits), scale, zero)
    scale, zero = grid.covering_grid(xf, check_bits(bits, "format", "gradient"))
    return QuantCodes(grid.sr_quantize(xf, scale, zero, bits, seed), scale, zero)


def quantize(x: Tensor, fmt: str, rounding: str = "nearest", dim: int = -1, seed: int = 0,
             scale_rule: str = "floor", block_2d: bool = False) -> Quantized | QuantCodes:
    """The codes and scales of x in format `fmt`; .dequantize() gives the fake-quantized tensor.

    Float formats return a Quantized (codes: uint8 element bit patterns; scales: float32 per block;
    scale_codes: E8M0 exponents or E4M3 bits of the block scales). int formats return QuantCodes
    (integer codes, scale and zero point of the tensor's grid).
    """
    f = _format(fmt, scale_rule, block_2d)
    if isinstance(f, int):
        return _int_codes(x, f, rounding, seed)
    return f.quantize(x, dim, rounding, seed)


def quantize_dequantize(x: Tensor, fmt: str, rounding: str = "nearest", dim: int = -1, seed: int = 0,
                        scale_rule: str = "floor", block_2d: bool = False, transform: str | None = None,
                        rht_block: int = 16) -> Tensor:
    """x fake-quantized in format `fmt` along dim (x's shape and dtype); see the module docstring."""
    f = _format(fmt, scale_rule, block_2d)
    t = make_transform(transform, rht_block, setting="transform")
    if t is None:
        if isinstance(f, int):
            return _int_codes(x, f, rounding, seed).dequantize().to(x.dtype)
        return f.fake(x, dim, rounding, seed)
    d, key = dim % x.dim(), grid.mix_seed(seed, _RHT_TAG)  # signs independent of the rounding noise
    if isinstance(f, int):
        y = _int_codes(t.forward(x, d, key), f, rounding, seed).dequantize()
    else:
        y = f.fake(x, d, rounding, seed, t, key)
    return t.inverse(y, d, key).narrow(d, 0, x.shape[d]).to(x.dtype)


def saturated(x: Tensor, fmt: str, dim: int = -1, rounding: str = "nearest", scale_rule: str = "floor",
              block_2d: bool = False) -> Tensor:
    """bool, x's shape: the elements that format `fmt` clips to its largest value (none for int grids)."""
    f = _format(fmt, scale_rule, block_2d)
    if isinstance(f, int):
        return torch.zeros(x.shape, dtype=torch.bool, device=x.device)
    return f.saturated(x, dim, rounding)
