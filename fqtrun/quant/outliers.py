"""Outlier measures of one GEMM operand (the numerics probe's crest and kurtosis, docs/numerics.md).

    crest        max|x| / sqrt(mean x^2) over the whole operand (QuIP's incoherence mu): 1 for +-1 entries,
                 sqrt(n) for one spike among n - 1 zeros, just under sqrt(2 ln n) for n Gaussian samples
    kurtosis     E[(x - mean)^4] / var^2 over the whole operand (Pearson's, not the excess): 3 for a
                 Gaussian, 1 for +-1 entries, large for heavy tails
    crest_block  the mean over the operand's scale blocks (a block format's blocks along its GEMM's
                 reduction, or its rows) of the block's max|x| / RMS; all-zero blocks are left out

A few float32 passes with float64 sums, on probe steps only; 0-d tensors, so one device sync when the
probe reads them. A figure that is undefined (an all-zero operand, a constant one for the kurtosis) is nan.
"""

from __future__ import annotations

import math

import torch

from fqtrun.quant.formats.blocks import Layout, layout
from fqtrun.quant.formats.quantizer import FormatQuantizer

Tensor = torch.Tensor

NAMES = ("crest", "kurtosis", "crest_block")


def crest_kurtosis(x: Tensor) -> tuple[Tensor, Tensor]:
    """(max|x| / RMS, Pearson kurtosis) over all elements, float64 0-d tensors; nan for an all-zero x (and
    the kurtosis of a constant x). In float32 with float64 sums, on x / max|x| (in [-1, 1]: no overflow,
    and what underflows in the fourth powers is below 2^-126 of the largest term)."""
    xf = x.detach().float().reshape(-1)
    n = xf.numel()
    if not n:
        return _nan(x), _nan(x)
    amax = xf.abs().amax()
    z = xf / amax.clamp(min=torch.finfo(torch.float32).tiny)  # max|z| = 1, or z = 0 for an all-zero x
    mean = z.mean(dtype=torch.float64)
    c2 = (z - mean.float()).square_()
    m2 = c2.sum(dtype=torch.float64) / n
    m4 = c2.square_().sum(dtype=torch.float64) / n
    zmax = (amax > 0).double()  # max|z|: 0 / 0 = nan for an all-zero x
    return zmax / (m2 + mean.square()).sqrt(), m4 / m2.square()


def block_crest(x: Tensor, lay: Layout) -> Tensor:
    """The mean over lay's blocks of x of max|x| / RMS (the RMS over the block's own elements, not its
    padding), over the blocks that are not all zero (nan when every block is), as 1 / RMS(block / max)."""
    if not x.numel():
        return _nan(x)
    xb = lay.to_blocks(x.detach().float())
    amax = xb.abs().amax(lay.axes, keepdim=True)
    ss = (xb / amax).square_().sum(lay.axes, dtype=torch.float64)  # an all-zero block: nan (0 / 0)
    if lay.padded == lay.flat:
        counts = float(math.prod(xb.shape[a] for a in lay.axes))
    else:
        ones = torch.ones(x.shape, dtype=torch.float32, device=x.device)
        counts = lay.to_blocks(ones).sum(lay.axes, dtype=torch.float64)
    return torch.nanmean((counts / ss).sqrt())


def scale_blocks(q, shape: tuple[int, ...], dim: int | None = None) -> Layout | None:
    """The blocks that share a scale when number-format slot q quantizes a tensor of `shape` along dim
    (q's own GEMM dim by default): its blocks or rows; None for one tensor scale or a non-format slot."""
    if not isinstance(q, FormatQuantizer) or q.format.scaling == "tensor":
        return None
    f = q.format
    return layout(tuple(shape), q.dim if dim is None else dim, f.scaling, f.block, f.two_d)


def measures(x: Tensor, blocks: Layout | None) -> Tensor:
    """(3,) float64: crest, kurtosis, crest_block of x (crest_block nan without blocks)."""
    return torch.stack([*crest_kurtosis(x), _nan(x) if blocks is None else block_crest(x, blocks)])


def _nan(x: Tensor) -> Tensor:
    return torch.tensor(math.nan, dtype=torch.float64, device=x.device)
