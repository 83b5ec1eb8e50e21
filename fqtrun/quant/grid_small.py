"""grid.py's min-max and span grids from ranges, on numpy float32, for the small CPU range tensors quantizer
calls build their grids from (one per tensor, row or column: a few to a few thousand numbers); the
covering grid has a C kernel instead (kernels.c covering_grid).

Why: a torch op on a tensor of 64 numbers costs 5-10 us of dispatch, a numpy op about 1-2 us, and a
grid takes 10-25 ops, which a small layer's step noticed (the GPT's 24 quantized layers, each with its
forward and dW grids). The operations are grid.py's, in the same order, each an IEEE float32 operation
in both libraries (numpy 2 keeps Python scalars weak: float32 stays float32), so scales and zero points
are the same numbers (tests/quant/test_grid.py compares both forms on random and edge-case ranges).
Clamps are written as where(x > m or x is NaN, x, m), torch's vectorised clamp; a zero point of 0 may
differ in the sign of that zero between torch's own scalar and vector paths, which no code or value
depends on.
"""

from __future__ import annotations

import numpy as np
import torch

from fqtrun.quant.numerics import check_range

Tensor = torch.Tensor

MAX_ELEMENTS = 4096  # above this the torch form runs (its launches no longer dominate)
TINY = np.float32(np.finfo(np.float32).tiny)


def applies(*ts: Tensor) -> bool:
    """Whether these range tensors take the numpy form: plain small CPU tensors (not traced, not fake)."""
    return all(type(t) is torch.Tensor and t.device.type == "cpu" and t.numel() <= MAX_ELEMENTS for t in ts)


def _np(t: Tensor) -> np.ndarray:
    return t.detach().float().numpy()


def _check(*arrays: np.ndarray, what: str, intermediate: bool = False) -> None:
    check_range(*map(torch.from_numpy, arrays), what=what, intermediate=intermediate)


def _clamp_min(a: np.ndarray, m: float) -> np.ndarray:
    return np.where((a > m) | np.isnan(a), a, np.float32(m))  # torch.clamp keeps NaN


def _clamp_max(a: np.ndarray, m: float) -> np.ndarray:
    return np.where((a < m) | np.isnan(a), a, np.float32(m))


def _positive(scale: np.ndarray) -> np.ndarray:
    return np.where(scale > 0, _clamp_min(scale, TINY), np.float32(1.0))


def _out(*arrays: np.ndarray) -> tuple[Tensor, ...]:
    return tuple(torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)) for a in arrays)


def minmax(lo: Tensor, hi: Tensor, big: float, what: str) -> tuple[Tensor, Tensor]:
    """grid.minmax_grid_from_range."""
    lo_, hi_ = _np(lo), _np(hi)
    _check(lo_, hi_, what=what)
    with np.errstate(all="ignore"):  # the torch form's overflow and 0 / 0 (a subnormal span) alike
        lo_, hi_ = _clamp_max(lo_, 0.0), _clamp_min(hi_, 0.0)
        span = hi_ - lo_
        scale = np.where(span > 0, span / big, np.float32(1.0))
        zero = _clamp_max(_clamp_min(np.round(-lo_ / scale), 0.0), big)
    return _out(scale, zero)


def span(lo: Tensor, hi: Tensor, big: float, what: str) -> tuple[Tensor, Tensor, Tensor]:
    """grid.span_grid_from_range."""
    lo_, hi_ = _np(lo), _np(hi)
    _check(lo_, hi_, what=what)
    with np.errstate(all="ignore"):
        scale = _positive((hi_ * 0.5 - lo_ * 0.5) / big * 2.0)
        _check(scale * big + lo_, what=f"grid of the {what}", intermediate=True)
    return _out(scale, np.zeros_like(scale), lo_)
