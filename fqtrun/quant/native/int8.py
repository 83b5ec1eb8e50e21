"""The int8 backend's kernels (kernels.c nearest_pass, epilogue): forward codes with the row and column
sums the GEMMs' zero-point corrections need (so no GEMM against ones computes them), and the epilogue
that turns a GEMM's int32 output into float32 in place."""

from __future__ import annotations

import torch

from fqtrun.quant.native import library

Tensor = torch.Tensor


def nearest(x2: Tensor, scale: Tensor, zero: Tensor, big: float) -> tuple[Tensor, Tensor, Tensor] | None:
    """(int8 codes - 128 of fused.nearest_int8, their sums over each row (R, 1) and each column (1, C)) of
    a float32 (R, C) x2 on a grid per tensor or per row ((1, 1) or (R, 1)); None when the kernel cannot run."""
    scale, zero = scale.float().contiguous(), zero.float().contiguous()
    if (library.load() is None or x2.dtype != torch.float32 or x2.dim() != 2 or not library.plain(x2, scale, zero)
            or scale.numel() not in (1, x2.shape[0]) or x2.numel() == 0):
        return None
    n, d = x2.shape
    q = torch.empty(n, d, dtype=torch.int8)
    rowsum, colsum = torch.empty(n, 1, dtype=torch.int32), torch.zeros(1, d, dtype=torch.int32)
    p = library.ptr
    rc = library.load().nearest_pass(p(x2), n, d, int(scale.numel() > 1), p(scale), p(zero), big, p(q), p(rowsum),
                                     p(colsum), library.threads())
    library.check(rc, "nearest_pass")
    return q, rowsum, colsum


def _vector(t: Tensor | None, dtype: torch.dtype, along: int, length: int) -> tuple[Tensor | None, int]:
    """(t flattened and contiguous, 1 if it varies along `along` (0 rows, 1 columns)); t is (R, 1), (1, C) or (1, 1)."""
    if t is None:
        return None, 0
    varies = t.shape[along] == length and length > 1
    return t.to(dtype).reshape(-1).contiguous(), int(varies)


def epilogue(acc: Tensor, alpha_a: Tensor, col_term: Tensor, row_a: Tensor, alpha_b: Tensor, scale_a: Tensor,
             scale_b: Tensor, offset_a: Tensor | None, bias: Tensor | None) -> Tensor | None:
    """fused.int_gemm_epilogue (plus bias) on the int32 (M, N) acc, written over acc's storage as float32
    (same integers, same float operations in the same order); None when the kernel cannot run here."""
    m, n = acc.shape
    vecs = [_vector(alpha_a, torch.int32, 0, m), _vector(row_a, torch.int32, 0, m), _vector(col_term, torch.int32, 1, n),
            _vector(alpha_b, torch.int32, 1, n), _vector(scale_a, torch.float32, 0, m),
            _vector(scale_b, torch.float32, 1, n), _vector(offset_a, torch.float32, 0, m)]
    bias_v = None if bias is None else bias.detach().float().contiguous()
    if (library.load() is None or acc.dtype != torch.int32 or not library.plain(acc, bias_v, *(v for v, _ in vecs))
            or (bias_v is not None and bias_v.numel() != n)):
        return None
    e = library.EpilogueArgs()
    e.alpha_a, e.row_a, e.col_term, e.alpha_b, e.scale_a, e.scale_b, e.offset_a = (library.ptr(v) for v, _ in vecs)
    e.bias = library.ptr(bias_v)
    (e.alpha_a_rows, e.row_a_rows, e.col_term_cols, e.alpha_b_cols, e.scale_a_rows, e.scale_b_cols,
     e.offset_a_rows) = (f for _, f in vecs)
    library.check(library.load().epilogue(library.ptr(acc), m, n, e, library.threads()), "epilogue")
    return acc.view(torch.float32)
