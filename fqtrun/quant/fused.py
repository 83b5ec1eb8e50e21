"""Fused quantize-to-int8 of the forward operands for the int8 backend (spec/performance.md).

`nearest_int8(x, scale, zero, bits)` returns the codes of MinMaxQuantizer,
clamp(round(x / scale) + zero, 0, B), stored as int8 `code - 128` (B <= 255), in one pass:
eager torch over blocks of rows that stay in the L2 cache (the default), or one
torch.compile'd kernel (compile=True; first call compiles, cached by inductor on disk; eager
again if compilation fails). Both run the same float operations in the same order as
grid.quantize_nearest, so the codes equal MinMaxQuantizer.codes(x) exactly.

The stochastic-rounding gradient codes come from the gradient quantizers themselves
(gradient.py: quantize(), eager or compiled SR from the counter-based hash of grid.py).
"""

from __future__ import annotations

import functools
import warnings

import torch

from fqtrun.quant.grid import levels

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


def nearest_int8(x: Tensor, scale: Tensor, zero: Tensor, bits: int, compile: bool = False) -> Tensor:
    """int8 (code - 128) of round-to-nearest codes on the grid (scale, zero), x's shape.

    scale/zero: per tensor or per index of dim 0 (broadcastable against x), zero integer-valued.
    """
    if bits > 8:
        raise ValueError(f"nearest_int8: bits={bits} do not fit int8 codes: use bits <= 8")
    x2, s, z = _as_rows(x.detach().float(), scale, zero)
    big = float(levels(bits))
    if compile:
        try:
            return _compiled_nearest()(x2, s, z, big).view(x.shape)
        except Exception as err:  # noqa: BLE001 (no C++ compiler, unsupported device: stay correct, eager)
            warnings.warn(f"nearest_int8: torch.compile failed ({err!r:.200}); running eager")
    return _nearest_eager(x2, s, z, big).view(x.shape)


def _epilogue(acc: Tensor, alpha_a: Tensor, col_term: Tensor, row_a: Tensor, alpha_b: Tensor,
              scale_a: Tensor, scale_b: Tensor, offset_a: Tensor) -> Tensor:
    """float32 ((acc + alpha_a col_term + row_a alpha_b) * scale_a) * scale_b + offset_a (col_term * scale_b):
    integer part exact in int32."""
    exact = acc + alpha_a * col_term + row_a * alpha_b
    return exact.to(torch.float32) * scale_a * scale_b + offset_a * (col_term.to(torch.float32) * scale_b)


@functools.lru_cache(maxsize=1)
def _compiled_epilogue():
    return torch.compile(_epilogue, dynamic=True)


def int_gemm_epilogue(acc: Tensor, alpha_a: Tensor, col_term: Tensor, row_a: Tensor, alpha_b: Tensor,
                      scale_a: Tensor, scale_b: Tensor, offset_a: Tensor | None = None,
                      compile: bool = False) -> Tensor:
    """The int8 GEMM's zero-point corrections, scales and left offset on its int32 (M, N) output `acc`.

    alpha_a, row_a, scale_a, offset_a are (M, 1) or (1, 1); col_term (colsum of b's integers, K alpha_b
    included), alpha_b, scale_b (1, N) or (1, 1). offset_a (a span grid's lo; None: 0) adds
    offset_a * colsum(b's values), a rank-1 term. Eager: two in-place broadcast addcmuls on acc (no
    (M, N) temporary), the float pass, and the rank-1 addcmul; compile=True: one fused pass over acc
    (same integers, same float products in the same order).
    """
    if compile:
        off = torch.zeros(1, 1, device=acc.device) if offset_a is None else offset_a  # + 0 leaves values as they are
        try:
            return _compiled_epilogue()(acc, alpha_a, col_term, row_a, alpha_b, scale_a, scale_b, off)
        except Exception as err:  # noqa: BLE001 (no C++ compiler, unsupported device: stay correct, eager)
            warnings.warn(f"int_gemm_epilogue: torch.compile failed ({err!r:.200}); running eager")
    acc.addcmul_(alpha_a, col_term)
    acc.addcmul_(row_a, alpha_b)
    out = acc.to(torch.float32).mul_(scale_a).mul_(scale_b)
    return out if offset_a is None else out.addcmul_(offset_a, col_term.to(torch.float32) * scale_b)
