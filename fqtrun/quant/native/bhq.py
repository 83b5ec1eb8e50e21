"""BHQ in C (kernels.c bhq_setup, bhq_pass): the grouping, and y = T x, its row ranges, its SR and T^-1.

With c = u - e_1 per group (gradient.BlockHouseholderTransform), H y = y - c (weight^T y): a segment
sum and a gather. bhq_pass does them per group and block of columns, the block's rows and group sums in
cache, so a whole BHQ quantization is three passes over the gradient (row ranges; T x with its row
ranges; SR and T^-1 in place) and one gradient-sized buffer, where the torch form makes about a dozen.
"""

from __future__ import annotations

import torch

from fqtrun.quant.native import library
from fqtrun.quant.native.sr import SRResult, fill_target

Tensor = torch.Tensor
_BLOCK = 1024  # columns per bhq_pass task: a group's rows of one block stay in the L2 cache


def setup(ranges: Tensor) -> dict[str, Tensor] | None:
    """The fields of gradient.BlockHouseholderTransform from the (N,) float32 row ranges (the same double
    formulas in the same order); None when the kernel cannot run here."""
    if library.load() is None or not library.plain(ranges) or ranges.dtype != torch.float32 or ranges.dim() != 1:
        return None
    n = ranges.numel()
    f = {"group": torch.empty(n, dtype=torch.int64), "is_leader": torch.empty(n, dtype=torch.bool),
         "leader": torch.empty(n, dtype=torch.int64), "sizes": torch.empty(n, dtype=torch.int64),
         "num_groups": torch.empty((), dtype=torch.int64), "row_scale": torch.empty(n, 1),
         "coef": torch.empty(n, 1), "weight": torch.empty(n, 1)}
    library.check(library.load().bhq_setup(library.ptr(ranges), n, *(library.ptr(v) for v in f.values())), "bhq_setup")
    return f


def _run(x: Tensor, out: Tensor | None, group: Tensor, coef: Tensor, *, w_in=None, pre=None, target=None, w_out=None,
         post=None, ylo=None, yhi=None) -> None:
    n, k = x.shape
    lib = library.load()
    p = library.ptr
    rc = lib.bhq_pass(p(x), p(out), n, k, _BLOCK, p(group), p(coef), p(w_in), p(pre), target, p(w_out), p(post),
                      p(ylo), p(yhi), library.threads())
    library.check(rc, "bhq_pass")


def _takes(x: Tensor, t, *vectors: Tensor | None) -> bool:
    vs = [t.group, t.coef, t.weight, t.row_scale, *vectors]
    return (library.load() is not None and x.dtype == torch.float32 and x.dim() == 2 and x.numel() < 2**32
            and library.plain(x, *vs) and all(v is None or v.numel() == x.shape[0] for v in vs))


def reflect(out: Tensor, y: Tensor, t, w: Tensor, pre: Tensor | None = None, post: Tensor | None = None) -> Tensor | None:
    """out <- (pre * y - coef * S(w * y)) * (1 / post) for the groups of transform t (pre or post, not both);
    None when the kernel cannot run here. out may be y."""
    if pre is not None and post is not None:
        return None
    if out.shape != y.shape or out.dtype != torch.float32 or not library.plain(out) or not _takes(y, t, w, pre, post):
        return None
    if post is None:
        _run(y, out, t.group, t.coef, w_in=w, pre=pre)
    else:
        _run(y, out, t.group, t.coef, w_out=w, post=post)
    return out


def transformed(x: Tensor, t) -> tuple[Tensor, Tensor, Tensor] | None:
    """(y = T x, the min and max of each row of y as (N, 1), NaN-propagating), in one pass over x; None when
    the kernel cannot run here."""
    if not _takes(x, t):
        return None
    n = x.shape[0]
    y, ylo, yhi = torch.empty_like(x), torch.empty(n, 1), torch.empty(n, 1)
    _run(x, y, t.group, t.coef, w_in=t.weight * t.row_scale, pre=t.row_scale, ylo=ylo, yhi=yhi)
    return y, ylo, yhi


def quantize(y: Tensor, t, grid: tuple[Tensor, Tensor, Tensor], bits: int, seed: int, codes: bool) -> SRResult | None:
    """SR of y = T x onto the per-row grid (scale, zero, lo), noise grid.uniform_noise(y.shape, seed): uint8
    codes with their row and column sums (codes=True, bits <= 8), or the dequantized T^-1 (values of x), the
    latter written over y; the values of gradient.BlockHouseholder's torch form. None when the kernel cannot
    run here."""
    scale, zero, lo = (g.float().contiguous() for g in grid)
    if not _takes(y, t, scale, zero, lo) or (codes and bits > 8):
        return None
    n, d = y.shape
    inv = torch.reciprocal(scale)
    res = SRResult(torch.empty(n, d, dtype=torch.uint8) if codes else y, scale, zero, lo)
    target = library.SRTarget()
    fill_target(target, "rows", bits, seed, (scale, inv, zero, lo))
    if codes:
        res.rowsum, res.colsum = torch.zeros(n, 1, dtype=torch.int32), torch.zeros(1, d, dtype=torch.int32)
        target.codes, target.rowsum, target.colsum = map(library.ptr, (res.out, res.rowsum, res.colsum))
        _run(y, None, t.group, t.coef, target=target)
    else:
        _run(y, y, t.group, t.coef, target=target, w_out=t.weight, post=t.row_scale)
    return res
