"""BHQ in C (kernels.c bhq_setup, bhq_pass, bhq_sr): the grouping, the reflections, and the whole quantization.

With c = u - e_1 per group (gradient.BlockHouseholderTransform), H y = y - c (weight^T y): a segment
sum and a gather. bhq_pass does them per group and block of columns (T, T^-1 and H of any matrix).
bhq_sr quantizes a gradient group by group, the group's rows in cache: y = T x and its row ranges, each
row's grid, then y again from x and the group sums, its SR and T^-1 on the values; y is never stored. A
whole BHQ quantization is then the row-range pass over the gradient, the set-up, and that one pass (which
reads a group's rows from memory once where they fit the L2 cache), writing only the codes or values,
where the torch form makes about a dozen passes.
"""

from __future__ import annotations

import torch

from fqtrun.quant.native import library
from fqtrun.quant.native.sr import SRResult, fill_target

Tensor = torch.Tensor
_BLOCK = 1024  # columns per block of bhq_pass and bhq_sr: a group's rows of one block stay in the L2 cache


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


def _run(x: Tensor, out: Tensor | None, group: Tensor, coef: Tensor, *, w_in=None, pre=None, w_out=None,
         post=None, ylo=None, yhi=None) -> None:
    n, k = x.shape
    lib = library.load()
    p = library.ptr
    rc = lib.bhq_pass(p(x), p(out), n, k, _BLOCK, p(group), p(coef), p(w_in), p(pre), p(w_out), p(post),
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


def quantize(x: Tensor, t, bits: int, seed: int, codes: bool) -> tuple[SRResult, Tensor] | None:
    """BHQ of x with transform t in one pass (kernels.c bhq_sr): y = T x, each row's min-max grid of y
    (grid.span_grid_from_range), SR of y with noise grid.uniform_noise(x.shape, seed), and uint8 codes with
    their row and column sums (codes=True, bits <= 8) or the dequantized T^-1 (values of x, a new tensor);
    the values of gradient.BlockHouseholder's torch form. Returns (the result, whose lo is each row's min
    of y, and the rows' max of y), both (N, 1); a row whose range is not finite has lo NaN and zeros (the
    caller raises). None when the kernel cannot run here."""
    if not _takes(x, t) or (codes and bits > 8):
        return None
    n, d = x.shape
    scale, inv, zero, ylo, yhi = torch.empty(n, 1), torch.empty(n, 1), torch.zeros(n, 1), torch.empty(n, 1), torch.empty(n, 1)
    res = SRResult(torch.empty(n, d, dtype=torch.uint8 if codes else torch.float32), scale, zero, ylo)
    target = library.SRTarget()
    fill_target(target, "rows", bits, seed, (scale, inv, zero, ylo))
    if codes:
        res.rowsum, res.colsum = torch.zeros(n, 1, dtype=torch.int32), torch.zeros(1, d, dtype=torch.int32)
        target.codes, target.rowsum, target.colsum = map(library.ptr, (res.out, res.rowsum, res.colsum))
    else:
        target.values = library.ptr(res.out)
    p = library.ptr
    w_in = t.weight * t.row_scale
    rc = library.load().bhq_sr(p(x), n, d, _BLOCK, p(t.group), p(t.coef), p(w_in), p(t.row_scale), p(t.weight),
                               p(t.row_scale), target, p(ylo), p(yhi), library.threads())
    library.check(rc, "bhq_sr")
    return res, yhi
