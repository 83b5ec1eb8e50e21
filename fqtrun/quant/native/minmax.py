"""The forward min-max quantizer (MinMaxQuantizer, the w and a slots) in two passes over x (kernels.c
minmax_quant).

Eager torch runs about ten passes for it (amin, amax, divide, round, add, clamp, subtract, multiply, and
the straight-through x + (x_hat - x)), and about ten more launches for the grid, each a cost a small
layer's step notices. Here one C call: a pass for the ranges (per tensor or per row), the grid of
grid.minmax_grid_from_range, and a pass that writes x_hat, or x + (x_hat - x) for the straight-through
value, all with the same float operations in the same order (built with -ffp-contract=off), so the values
equal the torch form's bit for bit (tests/quant/test_native.py). None where it cannot run (no compiler, not
a plain contiguous CPU float32 tensor): the caller runs torch.
"""

from __future__ import annotations

import torch

from fqtrun.quant.grid import levels
from fqtrun.quant.native import library
from fqtrun.quant.numerics import NonFiniteError

Tensor = torch.Tensor

def fake(x: Tensor, bits: int, per_row: bool, straight_through: bool, what: str = "input") -> Tensor | None:
    """MinMaxQuantizer's x_hat of x (per_row: one grid per index of dim 0), or x + (x_hat - x) with
    straight_through; no autograd. None where the kernel cannot run. NonFiniteError naming `what` when x
    holds NaN or inf (the range check of grid.minmax_grid)."""
    so = library.load()
    if so is None or x.dtype != torch.float32 or x.dim() == 0 or x.numel() == 0 or not library.plain(x.detach()):
        return None
    xd = x.detach()
    per_row = per_row and xd.dim() > 1  # as minmax_grid: a 1-D tensor has one range (amin over dims ())
    rows = xd.shape[0] if per_row or xd.dim() > 1 else 1  # the passes run over rows (threads split them)
    scratch = torch.empty(2, rows)
    out = torch.empty_like(xd)
    bad = so.minmax_quant(xd.data_ptr(), out.data_ptr(), rows, xd.numel() // rows, int(per_row),
                          float(levels(bits)), int(straight_through), scratch[0].data_ptr(), scratch[1].data_ptr(),
                          library.threads())
    if bad:
        raise NonFiniteError(what)
    return out
