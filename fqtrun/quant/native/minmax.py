"""The forward min-max quantizer (MinMaxQuantizer, the w and a slots) in two passes over x.

Eager torch runs about ten passes for it (amin, amax, divide, round, add, clamp, subtract, multiply, and
the straight-through x + (x_hat - x)), each a launch that a small layer's step notices. Here: one pass
for the ranges (per tensor or per row), the grid from them with grid.minmax_grid_from_range (the same torch
ops on a few numbers), and one pass that writes x_hat, or x + (x_hat - x) for the straight-through value,
with the same float operations in the same order (built with -ffp-contract=off), so the values equal the
torch form's bit for bit (tests/quant/test_native.py). None where it cannot run (no compiler, not a plain
contiguous CPU float32 tensor): the caller runs torch.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from fqtrun.quant.grid import levels, minmax_grid_from_range
from fqtrun.quant.native import library

Tensor = torch.Tensor

_SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <string.h>

typedef float vf __attribute__((vector_size(32)));
typedef int32_t vi __attribute__((vector_size(32)));
#define W 8

static inline vf vload(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
static inline vf vsel(vi m, vf a, vf b) { return (vf)(((vi)a & m) | ((vi)b & ~m)); }

/* min and max of x[0..m-1], both NaN when x holds a NaN (torch.amin / amax propagate it) */
static void row_range(const float *x, int64_t m, float *plo, float *phi) {
    vf lo = {0}, hi = {0};
    lo += x[0]; hi += x[0];
    vi bad = {0};
    int64_t c = 0;
    for (; c + W <= m; c += W) {
        vf v = vload(x + c);
        lo = vsel(v < lo, v, lo);
        hi = vsel(v > hi, v, hi);
        bad |= v != v;
    }
    float l = lo[0], h = hi[0];
    int nan = 0;
    for (int k = 0; k < W; k++) { l = lo[k] < l ? lo[k] : l; h = hi[k] > h ? hi[k] : h; nan |= bad[k]; }
    for (; c < m; c++) { float v = x[c]; l = v < l ? v : l; h = v > h ? v : h; nan |= v != v; }
    *plo = nan ? NAN : l;
    *phi = nan ? NAN : h;
}

/* lo, hi of each of the n rows of x (n x d) */
int minmax_ranges(const float *x, int64_t n, int64_t d, float *lo, float *hi, int nthreads) {
    #pragma omp parallel for num_threads(nthreads) schedule(static) if (n * d > 65536)
    for (int64_t r = 0; r < n; r++) row_range(x + r * d, d, lo + r, hi + r);
    return 0;
}

/* x_hat = (clamp(round(x / s) + z, 0, big) - z) * s with the grid (s, z) of the row (per_row) or the tensor;
   out = ste ? x + (x_hat - x) : x_hat (out may be x) */
int minmax_fake(const float *x, float *out, int64_t n, int64_t d, const float *scale, const float *zero,
                int per_row, float big, int ste, int nthreads) {
    #pragma omp parallel for num_threads(nthreads) schedule(static) if (n * d > 65536)
    for (int64_t r = 0; r < n; r++) {
        const float s = scale[per_row ? r : 0], z = zero[per_row ? r : 0];
        const float *xr = x + r * d;
        float *o = out + r * d;
        for (int64_t c = 0; c < d; c++) {
            float u = nearbyintf(xr[c] / s) + z;
            u = u < 0.0f ? 0.0f : u;
            u = u > big ? big : u;
            float xh = (u - z) * s;
            o[c] = ste ? xr[c] + (xh - xr[c]) : xh;
        }
    }
    return 0;
}
"""

_p, _i64 = ctypes.c_void_p, ctypes.c_int64


@functools.cache
def _load() -> ctypes.CDLL | None:
    so = library.build("minmax", _SOURCE)
    if so is not None:
        so.minmax_ranges.argtypes = [_p, _i64, _i64, _p, _p, ctypes.c_int]
        so.minmax_fake.argtypes = [_p, _p, _i64, _i64, _p, _p, ctypes.c_int, ctypes.c_float, ctypes.c_int,
                                   ctypes.c_int]
    return so


def fake(x: Tensor, bits: int, per_row: bool, straight_through: bool, what: str = "input") -> Tensor | None:
    """MinMaxQuantizer's x_hat of x (per_row: one grid per index of dim 0), or x + (x_hat - x) with
    straight_through; no autograd. None where the kernels cannot run. NonFiniteError naming `what` when x
    holds NaN or inf (the range check of grid.minmax_grid)."""
    so = _load()
    if so is None or x.dtype != torch.float32 or x.dim() == 0 or x.numel() == 0 or not library.plain(x.detach()):
        return None
    xd = x.detach()
    per_row = per_row and xd.dim() > 1  # as minmax_grid: a 1-D tensor has one range (amin over dims ())
    rows = xd.shape[0] if per_row or xd.dim() > 1 else 1  # the passes run over rows (threads split them)
    d = xd.numel() // rows
    lo, hi = torch.empty(rows, 1), torch.empty(rows, 1)
    so.minmax_ranges(xd.data_ptr(), rows, d, lo.data_ptr(), hi.data_ptr(), library.threads())
    if not per_row:
        lo, hi = lo.amin().view(1, 1), hi.amax().view(1, 1)
    scale, zero = minmax_grid_from_range(lo, hi, bits, what)
    scale, zero = scale.contiguous(), zero.contiguous()
    out = torch.empty_like(xd)
    so.minmax_fake(xd.data_ptr(), out.data_ptr(), rows, d, scale.data_ptr(), zero.data_ptr(), int(per_row),
                   float(levels(bits)), int(straight_through), library.threads())
    return out
