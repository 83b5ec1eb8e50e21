"""The forward min-max quantizer (MinMaxQuantizer, the w and a slots) in two passes over x.

Eager torch runs about ten passes for it (amin, amax, divide, round, add, clamp, subtract, multiply, and
the straight-through x + (x_hat - x)), and about ten more launches for the grid, each a cost a small
layer's step notices. Here one C call: a pass for the ranges (per tensor or per row), the grid of
grid.minmax_grid_from_range, and a pass that writes x_hat, or x + (x_hat - x) for the straight-through
value, all with the same float operations in the same order (built with -ffp-contract=off), so the values
equal the torch form's bit for bit (tests/quant/test_native.py). None where it cannot run (no compiler, not a plain
contiguous CPU float32 tensor): the caller runs torch.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from fqtrun.quant.grid import levels
from fqtrun.quant.native import library
from fqtrun.quant.numerics import NonFiniteError

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

/* minmax_grid_from_range on one range, the same float32 operations (the clamps keep NaN, as torch's):
   scale = span > 0 ? span / big : 1, zero = clamp(round(-lo / scale), 0, big) */
static void grid_of(float lo, float hi, float big, float *scale, float *zero) {
    lo = lo < 0.0f ? lo : 0.0f;
    hi = hi > 0.0f ? hi : 0.0f;
    float span = hi - lo, s = span > 0.0f ? span / big : 1.0f;
    float z = nearbyintf(-lo / s);
    z = (z > 0.0f || z != z) ? z : 0.0f;
    *scale = s;
    *zero = (z < big || z != z) ? z : big;
}

/* out = x_hat = (clamp(round(x / s) + z, 0, big) - z) * s on the min-max grid of each row (per_row) or of
   the tensor, or x + (x_hat - x) with ste; x is n rows of d. lo, hi: n floats of scratch (the ranges, then
   the scales and zero points). Returns 1 (nothing written) when a range is NaN or inf. */
int minmax_quant(const float *x, float *out, int64_t n, int64_t d, int per_row, float big, int ste, float *lo,
                 float *hi, int nthreads) {
    #pragma omp parallel for num_threads(nthreads) schedule(static) if (n * d > 65536)
    for (int64_t r = 0; r < n; r++) row_range(x + r * d, d, lo + r, hi + r);
    int64_t grids = per_row ? n : 1;
    if (!per_row)
        for (int64_t r = 1; r < n; r++) {  /* amin / amax of the rows' ranges (a NaN stays NaN) */
            lo[0] = (lo[r] < lo[0] || lo[r] != lo[r]) ? lo[r] : lo[0];
            hi[0] = (hi[r] > hi[0] || hi[r] != hi[r]) ? hi[r] : hi[0];
        }
    for (int64_t r = 0; r < grids; r++) {
        if (!isfinite(lo[r]) || !isfinite(hi[r])) return 1;
        grid_of(lo[r], hi[r], big, lo + r, hi + r);
    }
    #pragma omp parallel for num_threads(nthreads) schedule(static) if (n * d > 65536)
    for (int64_t r = 0; r < n; r++) {
        const float s = lo[per_row ? r : 0], z = hi[per_row ? r : 0];
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
        so.minmax_quant.argtypes = [_p, _p, _i64, _i64, ctypes.c_int, ctypes.c_float, ctypes.c_int, _p, _p,
                                    ctypes.c_int]
    return so


def fake(x: Tensor, bits: int, per_row: bool, straight_through: bool, what: str = "input") -> Tensor | None:
    """MinMaxQuantizer's x_hat of x (per_row: one grid per index of dim 0), or x + (x_hat - x) with
    straight_through; no autograd. None where the kernel cannot run. NonFiniteError naming `what` when x
    holds NaN or inf (the range check of grid.minmax_grid)."""
    so = _load()
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
