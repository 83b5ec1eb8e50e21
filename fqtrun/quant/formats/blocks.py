"""Which elements share a scale: a tensor seen as a 4-D view whose reduced axes are one scale's block.

A block always runs along `dim`, the reduction dimension of the GEMM that consumes the operand
(spec/formats.md, "Scaling"). With A = prod(shape[:dim]), L = shape[dim], B = prod(shape[dim+1:]):

    tensor   (1, 1, 1, N)          one scale for everything
    row      (A, 1, L, B)          one scale per line along dim (FP8 rowwise)
    block k  (A, L'/k, k, B)       k consecutive elements along dim (MX k=32, NVFP4 k=16, DeepSeek k=128)
    2-D t    (R'/t, t, C'/t, t)    t x t tiles of x as (shape[0], the rest): W and W^T share them

L' (R', C') is rounded up to a multiple of the block with zeros, which leave a block's amax as
it is; the view is a plain reshape when no padding is needed (no copy along any dim).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


@dataclass(frozen=True)
class Layout:
    """How x of `shape` maps onto its 4-D block view `view`; `axes` are the axes one scale spans."""

    shape: tuple[int, ...]
    dim: int  # the blocks' dimension of x (row and 1-D blocks)
    flat: tuple[int, ...]  # x reshaped before padding: (1, N), (A, L, B) or (R, C)
    padded: tuple[int, ...]  # `flat` after padding
    view: tuple[int, int, int, int]
    axes: tuple[int, ...]

    def to_blocks(self, x: Tensor) -> Tensor:
        t = x.reshape(self.flat)
        if self.padded != self.flat:
            pads: list[int] = []
            for have, want in zip(reversed(self.flat), reversed(self.padded)):
                pads += [0, want - have]
            t = F.pad(t, pads)
        return t.view(self.view)

    def from_blocks(self, y: Tensor) -> Tensor:
        t = y.reshape(self.padded)
        if self.padded != self.flat:
            t = t[tuple(slice(0, n) for n in self.flat)]
        return t.reshape(self.shape)

    @property
    def scale_shape(self) -> tuple[int, ...]:
        """One scale per block, as a user reads it: () per tensor, (R/t, C/t) for tiles, else x's
        shape with `dim` replaced by the number of blocks along it (1 for rows)."""
        v = self.view
        if len(self.axes) == 4:
            return ()
        if self.axes == (1, 3):
            return (v[0], v[2])
        return (*self.shape[: self.dim], v[1], *self.shape[self.dim + 1:])

    @property
    def block_scale_shape(self) -> tuple[int, ...]:
        """The scales' shape that broadcasts against the 4-D view (the reduced axes kept as 1)."""
        return tuple(1 if i in self.axes else n for i, n in enumerate(self.view))


def _round_up(n: int, k: int) -> int:
    return -(-n // k) * k


def layout(shape: tuple[int, ...], dim: int, scaling: str, block: int, two_d: bool) -> Layout:
    """The Layout of a tensor of `shape` for blocks along `dim` (see the module docstring)."""
    shape = tuple(shape)
    n = math.prod(shape)
    if scaling == "tensor":
        return Layout(shape, 0, (1, n), (1, n), (1, 1, 1, n), (0, 1, 2, 3))
    if two_d:
        rows = shape[0] if len(shape) >= 2 else 1
        cols = n // max(rows, 1)
        r, c = _round_up(rows, block), _round_up(cols, block)
        return Layout(shape, 0, (rows, cols), (r, c), (r // block, block, c // block, block), (1, 3))
    d = dim % max(len(shape), 1)
    a = math.prod(shape[:d])
    length = shape[d] if shape else 1
    b = math.prod(shape[d + 1:])
    if scaling == "row":
        return Layout(shape, d, (a, length, b), (a, length, b), (a, 1, length, b), (2,))
    padded = _round_up(length, block)
    return Layout(shape, d, (a, length, b), (a, padded, b), (a, padded // block, block, b), (2,))
