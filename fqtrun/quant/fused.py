"""Fused quantize-to-int8 of the forward operands, and the int8 GEMM epilogue (spec/performance.md).

`nearest_int8(x, scale, zero, bits)` returns the codes of MinMaxQuantizer,
clamp(round(x / scale) + zero, 0, B), stored as int8 `code - 128` (B <= 255), in one pass: the C
kernel (quant/native/int8.py, which also sums the codes over rows and columns for the GEMMs'
zero-point corrections), else one torch.compile'd kernel (compile=True; first call compiles,
cached by inductor on disk; eager again if compilation fails), else eager torch over blocks of rows
that stay in the L2 cache. All run the same float operations in the same order as
grid.quantize_nearest, so the codes equal MinMaxQuantizer.codes(x) exactly.

The stochastic-rounding gradient codes come from the gradient quantizers themselves (gradient.py).
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import torch

from fqtrun.quant.grid import levels
from fqtrun.quant.native import int8 as native_int8

Tensor = torch.Tensor

OFFSET = 128  # int8 value = code - OFFSET: codes 0..255 map onto -128..127 exactly
_CPU_BLOCK = 1 << 15  # elements per eager block: the block's float temporaries stay in L2


def _as_rows(x: Tensor, scale: Tensor, zero: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """x as (R, C) with scale/zero as (R, 1) or (1, 1): per-tensor or per-dim-0 grids only."""
    if scale.numel() not in (1, x.shape[0] if x.dim() else 1):
        raise ValueError(f"nearest_int8: scale of shape {tuple(scale.shape)} is neither per tensor nor per "
                         f"dim 0 of x {tuple(x.shape)}")
    x2 = x.reshape(x.shape[0], -1) if x.dim() > 1 else x.reshape(1, -1)
    rows = 1 if scale.numel() == 1 else -1
    return x2, scale.reshape(rows, 1).float(), zero.reshape(rows, 1).float()


def _nearest_eager(x2: Tensor, scale: Tensor, zero: Tensor, big: float) -> Tensor:
    out = torch.empty(x2.shape, dtype=torch.int8, device=x2.device)
    n_rows, per_row = x2.shape
    step = max(1, _CPU_BLOCK // max(1, per_row)) if x2.device.type == "cpu" else max(1, n_rows)
    per_row_grid = scale.shape[0] > 1
    for r0 in range(0, n_rows, step):
        r1 = min(n_rows, r0 + step)
        s = scale[r0:r1] if per_row_grid else scale
        z = zero[r0:r1] if per_row_grid else zero
        u = torch.div(x2[r0:r1], s)  # same ops and order as grid.quantize_nearest
        torch.round(u, out=u)
        u.add_(z).clamp_(0.0, big).sub_(OFFSET)
        out[r0:r1].copy_(u)
    return out


def _nearest_fused(x2: Tensor, scale: Tensor, zero: Tensor, big: float) -> Tensor:
    return (torch.clamp(torch.round(x2 / scale) + zero, 0.0, big) - OFFSET).to(torch.int8)


@functools.lru_cache(maxsize=1)
def _compiled_nearest():
    return torch.compile(_nearest_fused, dynamic=True)


@dataclass
class Int8Codes:
    """int8 codes (code - 128, x's shape) and, when the C kernel made them, their int32 sums over each row
    (R, 1) and each column (1, C) of the 2-D view (R, C) = (x.shape[0], -1)."""

    q: Tensor
    rowsum: Tensor | None = None
    colsum: Tensor | None = None


def nearest_int8(x: Tensor, scale: Tensor, zero: Tensor, bits: int, compile: bool = False) -> Int8Codes:
    """int8 (code - 128) of round-to-nearest codes on the grid (scale, zero), x's shape.

    scale/zero: per tensor or per index of dim 0 (broadcastable against x), zero integer-valued.
    """
    if bits > 8:
        raise ValueError(f"nearest_int8: bits={bits} do not fit int8 codes: use bits <= 8")
    x2, s, z = _as_rows(x.detach().float(), scale, zero)
    big = float(levels(bits))
    fast = native_int8.nearest(x2.contiguous(), s, z, big)
    if fast is not None:
        return Int8Codes(fast[0].view(x.shape), fast[1], fast[2])
    if compile:
        try:
            return Int8Codes(_compiled_nearest()(x2, s, z, big).view(x.shape))
        except Exception as err:  # noqa: BLE001 (no C++ compiler, unsupported device: stay correct, eager)
            warnings.warn(f"nearest_int8: torch.compile failed ({err!r:.200}); running eager")
    return Int8Codes(_nearest_eager(x2, s, z, big).view(x.shape))


def _epilogue(acc: Tensor, alpha_a: Tensor, col_term: Tensor, row_a: Tensor, alpha_b: Tensor,
              scale_a: Tensor, scale_b: Tensor, offset_a: Tensor, bias: Tensor) -> Tensor:
    """float32 ((acc + alpha_a col_term + row_a alpha_b) * scale_a) * scale_b + offset_a (col_term * scale_b)
    + bias: integer part exact in int32."""
    exact = acc + alpha_a * col_term + row_a * alpha_b
    v = exact.to(torch.float32) * scale_a * scale_b
    return v + offset_a * (col_term.to(torch.float32) * scale_b) + bias


@functools.lru_cache(maxsize=1)
def _compiled_epilogue():
    return torch.compile(_epilogue, dynamic=True)


def int_gemm_epilogue(acc: Tensor, alpha_a: Tensor, col_term: Tensor, row_a: Tensor, alpha_b: Tensor,
                      scale_a: Tensor, scale_b: Tensor, offset_a: Tensor | None = None, bias: Tensor | None = None,
                      compile: bool = False) -> Tensor:
    """The int8 GEMM's zero-point corrections, scales, left offset and bias on its int32 (M, N) output `acc`.

    alpha_a, row_a, scale_a, offset_a are (M, 1) or (1, 1); col_term (colsum of b's integers, K alpha_b
    included), alpha_b, scale_b (1, N) or (1, 1); bias (N,). offset_a (a span grid's lo; None: 0) adds
    offset_a * colsum(b's values), a rank-1 term. The C kernel writes the result over acc's storage in
    one pass; else compile=True: one fused torch.compile'd pass; else eager: two in-place broadcast
    addcmuls on acc, the float pass, the rank-1 term and the bias (same integers, same float operations
    in the same order).
    """
    fast = native_int8.epilogue(acc, alpha_a, col_term, row_a, alpha_b, scale_a, scale_b, offset_a, bias)
    if fast is not None:
        return fast
    if compile:
        zero = torch.zeros(1, 1, device=acc.device)  # + 0 leaves the values as they are
        off = zero if offset_a is None else offset_a
        b = zero if bias is None else bias
        try:
            return _compiled_epilogue()(acc, alpha_a, col_term, row_a, alpha_b, scale_a, scale_b, off, b)
        except Exception as err:  # noqa: BLE001 (no C++ compiler, unsupported device: stay correct, eager)
            warnings.warn(f"int_gemm_epilogue: torch.compile failed ({err!r:.200}); running eager")
    acc.addcmul_(alpha_a, col_term)
    acc.addcmul_(row_a, alpha_b)
    out = acc.to(torch.float32).mul_(scale_a).mul_(scale_b)
    if offset_a is not None:
        out.add_(offset_a * (col_term.to(torch.float32) * scale_b))
    return out if bias is None else out.add_(bias)
