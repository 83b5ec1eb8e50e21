"""Range and stochastic-rounding passes over a float32 (N, D) gradient matrix (kernels.c range_pass, sr_pass).

sr_pass writes one or two targets in one pass over x, each with its own grid and noise: the dX and
dW codes of the same dY read it once. A "row_span" target finds each row's span grid (grid.py) while
the row is in cache, so PSQ is a single pass; the other kinds take a grid built from range_pass's
ranges (or any other), exactly as grid.sr_quantize takes it, so PTQ and per-column SR are a read-only
range pass and the SR pass. The SR arithmetic runs in AVX2 + FMA intrinsics where the library is built
for them (every x86-64-v3 or newer CPU; 16-lane AVX-512 in a native build on such a CPU: the same
operations, the same bits);
on a zero-aligned grid (lo 0) it skips the x - 0 and + 0 that cannot change a value.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch

from fqtrun.quant.grid import levels, seed_keys
from fqtrun.quant.native import library

Tensor = torch.Tensor
KINDS = {"tensor": 0, "rows": 1, "cols": 2, "row_span": 3}


def _takes(x: Tensor) -> bool:
    return (x.dtype == torch.float32 and x.dim() == 2 and 0 < x.numel() < 2**32 and library.plain(x)
            and library.load() is not None)


def ranges(x: Tensor, rows: bool, cols: bool) -> tuple[tuple[Tensor, Tensor] | None, tuple[Tensor, Tensor] | None] | None:
    """((row min, row max) as (N, 1) or None, (column min, column max) as (1, D) or None), NaN-propagating
    as torch.amin/amax, in one pass; None when the kernel cannot run here."""
    if not _takes(x):
        return None
    n, d = x.shape
    r = (torch.empty(n, 1), torch.empty(n, 1)) if rows else None
    c = (torch.empty(1, d), torch.empty(1, d)) if cols else None
    rp, cp = r or (None, None), c or (None, None)
    library.check(library.load().range_pass(library.ptr(x), n, d, *map(library.ptr, rp), *map(library.ptr, cp),
                                            library.threads()), "range_pass")
    return r, c


@dataclass
class SRJob:
    """One target of sr_pass: a grid kind (KINDS), its bits and noise seed, the grid (scale, zero, lo) shaped
    (1, 1), (N, 1) or (1, D) (None for row_span), and whether to write uint8 codes with their row and
    column sums (else dequantized float32 values)."""

    kind: str
    bits: int
    seed: int
    grid: tuple[Tensor, Tensor, Tensor | None] | None = None
    codes: bool = False


@dataclass
class SRResult:
    """What one target wrote: out (codes uint8 or values float32, x's shape), its grid, and with codes the
    sums of code - 128 over each row (N, 1) and each column (1, D), int32."""

    out: Tensor
    scale: Tensor
    zero: Tensor
    lo: Tensor | None
    rowsum: Tensor | None = None
    colsum: Tensor | None = None


def sr_pass(x: Tensor, jobs: list[SRJob]) -> list[SRResult] | None:
    """grid.sr_quantize(x, scale, zero, bits, seed, dequant, lo) for every job (same noise, same roundings),
    all in one pass over x; None when the kernel cannot run here (codes need bits <= 8)."""
    if not _takes(x) or any(j.codes and j.bits > 8 for j in jobs):
        return None
    n, d = x.shape
    structs = (library.SRTarget * len(jobs))()
    results, alive = [], []
    for job, st in zip(jobs, structs):
        if job.kind == "row_span":
            scale, zero, lo = torch.empty(n, 1), torch.zeros(n, 1), torch.empty(n, 1)
            inv = torch.empty(n, 1)
        else:
            scale, zero, lo = job.grid
            scale, zero = scale.float().contiguous(), zero.float().contiguous()
            lo = None if lo is None else lo.float().contiguous()
            inv = torch.reciprocal(scale)
        res = SRResult(torch.empty(n, d, dtype=torch.uint8 if job.codes else torch.float32), scale, zero, lo)
        if job.codes:
            res.rowsum, res.colsum = torch.empty(n, 1, dtype=torch.int32), torch.zeros(1, d, dtype=torch.int32)
        lo_arg = torch.zeros_like(zero) if lo is None else lo  # x - 0 is x: a zero-aligned grid as it is
        fill_target(st, job.kind, job.bits, job.seed, (scale, inv, zero, lo_arg))
        st.values = None if job.codes else library.ptr(res.out)
        st.codes = library.ptr(res.out) if job.codes else None
        st.rowsum, st.colsum = library.ptr(res.rowsum), library.ptr(res.colsum)
        results.append(res)
        alive += [inv, lo_arg]
    library.check(library.load().sr_pass(library.ptr(x), n, d, structs, len(jobs), library.threads()), "sr_pass")
    del alive
    return results


def fill_target(st: ctypes.Structure, kind: str, bits: int, seed: int, grid: tuple[Tensor, ...]) -> None:
    """Set the grid part of an SR target (also bhq.py's): kind, B, noise keys, the (scale, inv, zero, lo) pointers."""
    k1, k2 = seed_keys(seed)
    st.kind, st.big, st.k1, st.k2 = KINDS[kind], float(levels(bits)), k1, k2
    st.scale, st.inv, st.zero, st.lo = map(library.ptr, grid)
