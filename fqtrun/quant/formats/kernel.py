"""The fake-quantization pass of every format (and the random Hadamard transform before it) as one C kernel.

Format.fake runs here when it can: one pass over the tensor that loads a panel of rows into a small
buffer, applies the transform's butterflies (fast Walsh-Hadamard, O(log g) per element), takes
each block's amax, and writes the dequantized elements; stochastic rounding draws grid.uniform_noise
from the same counter-based hash. The float operations are the torch path's, in the same order
(format.py and transforms.py; built with -ffp-contract=off), so the two give the same values bit for
bit (tests/quant/test_formats.py). A tensor-scaled or NVFP4 tensor needs its amax first (one extra
read, the `amax` pass); with a transform as well, the transform runs as its own pass first. Built
on first use with quant/native/library.py's builder; `usable` is False (the caller runs torch) when there
is no compiler or the tensor is not a plain contiguous CPU float32 one.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from fqtrun.quant.formats.elements import FloatElement
from fqtrun.quant.native.library import build

Tensor = torch.Tensor

# scale kinds of the kernel
SCALE_CODES = {"none": 0, "fp32": 1, "floor": 2, "rceil": 3, "e4m3": 4}
ROUND_CODES = {"nearest": 0, "stochastic": 1}
_PANEL_COLS = 2048  # columns of a work item's buffer when blocks run down the rows (B > 1): long reads
_LINE_PANELS = 64  # panels of a work item when blocks run along contiguous lines (B == 1)

_SOURCE = r"""
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "noise.h"

typedef struct { int emin, mbits; float max; } elem_t;
typedef struct {  /* what every block of one call shares */
    elem_t el; int emax, kind, mode; float pre, s_t, boost; uint32_t k1, k2;
} qparams_t;
typedef struct { float *mul, *div, *scale; } scales_t;  /* per block: element = x * mul or x / div; x ~ element * scale */

static inline float pow2i(int e) {  /* exact 2^e, e in [-149, 127] */
    union { uint32_t u; float f; } r;
    r.u = e >= -126 ? (uint32_t)(e + 127) << 23 : 1u << (e + 149);
    return r.f;
}

static inline float pow2n(int e) {  /* exact 2^e for e in [-126, 127] (the element grids' spacings) */
    union { uint32_t u; float f; } r = { (uint32_t)(e + 127) << 23 };
    return r.f;
}

static inline int exponent_of(float a) {  /* floor(log2 a) for normal a >= 0; -127 for 0 and subnormals */
    union { float f; uint32_t u; } b = { a };
    return (int)((b.u >> 23) & 0xFF) - 127;
}

static inline uint32_t abs_bits(float v) {  /* |v|'s bits: ordered as |v| (NaN above inf), so max vectorizes */
    union { float f; uint32_t u; } b = { v };
    return b.u & 0x7FFFFFFFu;
}

static inline float from_bits(uint32_t u) {
    union { uint32_t u; float f; } b = { u };
    return b.f;
}

/* FloatElement.round: saturate, grid spacing from the exponent, RNE / SR / ceil, sign back (the
   spacing is a power of two, so multiplying by its inverse is the torch form's exact division). */
static inline float round_elem(float v, elem_t el, int mode, float noise) {
    float a = fabsf(v);
    a = a < el.max ? a : el.max;
    int e = exponent_of(a);
    e = e < el.emin ? el.emin : e;
    float u = a * pow2n(el.mbits - e), q;
    if (mode == 0) q = nearbyintf(u);
    else if (mode == 1) { q = floorf(u); q = q + (noise < u - q ? 1.0f : 0.0f); }
    else q = ceilf(u);
    return copysignf(q * pow2n(e - el.mbits), v);  /* <= max: max is on the grid */
}

static inline int rceil_exponent(float d) {  /* ceil(log2 d) clamped to [-127, 127], exact */
    union { float f; uint32_t u; } b = { d };
    int e = (int)((b.u >> 23) & 0xFF) - 127 + ((b.u & 0x7FFFFF) != 0);
    e = d < 0x1p-126f ? -126 : e;
    e = d > 0x1p-127f ? e : -127;
    return e > 127 ? 127 : e;
}

/* scales.py for n block amaxes: fp32 (divide), E8M0 floor / rceil, NVFP4's E4M3 block scale under the
   tensor scale; one loop per kind, so each vectorizes. */
static void block_scales(const float *amax, int64_t n, const qparams_t *q, scales_t s) {
    const float mx = q->el.max;
    if (q->kind == 1)
        for (int64_t i = 0; i < n; i++) {
            float d = amax[i] / mx;
            d = d < 0x1p-149f ? 0x1p-149f : d;
            d = amax[i] > 0.0f ? d : 1.0f;
            s.mul[i] = 1.0f; s.div[i] = d; s.scale[i] = d;
        }
    else if (q->kind == 2 || q->kind == 3)
        for (int64_t i = 0; i < n; i++) {
            int e = q->kind == 3 ? rceil_exponent(amax[i] / mx) : exponent_of(amax[i]) - q->emax;
            e = e < -127 ? -127 : (e > 127 ? 127 : e);
            s.mul[i] = pow2i(-e); s.div[i] = 1.0f; s.scale[i] = pow2i(e);
        }
    else if (q->kind == 4) {
        const elem_t e4m3 = { -6, 3, 448.0f };
        const int up = q->mode == 1 ? 2 : 0;
        const float s_t = q->s_t, boost = q->boost;
        for (int64_t i = 0; i < n; i++) {
            float blk = ((amax[i] * boost) / mx) / s_t;
            blk = blk < 0x1p-6f ? 0x1p-6f : (blk > 448.0f ? 448.0f : blk);
            blk = round_elem(blk, e4m3, up, 0.0f);
            s.mul[i] = ((1.0f / s_t) / blk) * boost; s.div[i] = 1.0f; s.scale[i] = (s_t * blk) / boost;
        }
    } else
        for (int64_t i = 0; i < n; i++) { s.mul[i] = 1.0f; s.div[i] = 1.0f; s.scale[i] = 1.0f; }
}

/* One element as the torch path computes it: x / div (fp32 scales) or x * mul (E8M0: the exact
   inverse power of two; NVFP4: its reciprocal), * pre, rounded, * scale, / pre. The flags are
   constants at every call, so each loop below is compiled for its own case (and vectorized). */
static inline float quant_elem(float x, float mul, float div, float scale, float pre, elem_t el, int mode,
                               float noise, int use_div, int use_pre) {
    float v = use_div ? x / div : x * mul;
    if (use_pre) v = v * pre;
    float y = round_elem(v, el, mode, noise) * scale;
    if (use_pre) y = y / pre;
    return y > FLT_MAX ? FLT_MAX : (y < -FLT_MAX ? -FLT_MAX : y);  /* past float32's range: its largest */
}

#define QUANT_LOOP(MODE, DIV, PRE)                                                                        \
    if (ss == 0) {                                                                                        \
        const float m0 = mul[0], d0 = div[0], s0 = scale[0];                                              \
        for (uint32_t i = 0; i < (uint32_t)n; i++)                                                        \
            y[i] = quant_elem(x[i], m0, d0, s0, pre, el, MODE,                                            \
                              MODE == 1 ? noise_at(idx + i, k1, k2) : 0.0f, DIV, PRE);                    \
    } else                                                                                                \
        for (uint32_t i = 0; i < (uint32_t)n; i++)                                                        \
            y[i] = quant_elem(x[i], mul[i], div[i], scale[i], pre, el, MODE,                              \
                              MODE == 1 ? noise_at(idx + i, k1, k2) : 0.0f, DIV, PRE);

/* y[i] of x[i], i < n: one scale (ss == 0: mul[0], div[0], scale[0]) or one per column (ss == 1);
   noise index idx + i; kind 0 copies. */
static void quant_run(const float *x, float *y, int64_t n, const float *mul, const float *div,
                      const float *scale, int ss, const qparams_t *q, uint32_t idx) {
    if (q->kind == 0) { memcpy(y, x, sizeof(float) * (size_t)n); return; }
    const elem_t el = q->el;
    const float pre = q->pre;
    const uint32_t k1 = q->k1, k2 = q->k2;
    const int use_div = q->kind == 1, use_pre = pre != 1.0f;
    if (q->mode == 1) {
        if (use_pre) { QUANT_LOOP(1, 0, 1) }
        else if (use_div) { QUANT_LOOP(1, 1, 0) }
        else { QUANT_LOOP(1, 0, 0) }
    } else if (use_div) { QUANT_LOOP(0, 1, 0) }
    else { QUANT_LOOP(0, 0, 0) }
}

/* One butterfly stage over n consecutive floats (n a multiple of 2h): the pairs (j, j + h) of every
   2h elements become (u + v, u - v). Strides 1, 2, 4 are written out so they vectorize across groups. */
static void butterfly_stage(float *v, int64_t n, int64_t h) {
    if (h == 1)
        for (int64_t i = 0; i < n; i += 2) { float u = v[i], w = v[i + 1]; v[i] = u + w; v[i + 1] = u - w; }
    else if (h == 2)
        for (int64_t i = 0; i < n; i += 4) {
            float u0 = v[i], u1 = v[i + 1], w0 = v[i + 2], w1 = v[i + 3];
            v[i] = u0 + w0; v[i + 1] = u1 + w1; v[i + 2] = u0 - w0; v[i + 3] = u1 - w1;
        }
    else if (h == 4)
        for (int64_t i = 0; i < n; i += 8)
            for (int j = 0; j < 4; j++) { float u = v[i + j], w = v[i + j + 4]; v[i + j] = u + w; v[i + j + 4] = u - w; }
    else
        for (int64_t i = 0; i < n; i += 2 * h)
            for (int64_t j = i; j < i + h; j++) { float u = v[j], w = v[j + h]; v[j] = u + w; v[j + h] = u - w; }
}

/* Stages h and 2h in one pass (n a multiple of 4h), the same operations in the same order: (x0, x1)
   of stage h, then (x0 + x1) with (x2 + x3) and (x0 - x1) with (x2 - x3) of stage 2h. */
static void butterfly_stages2(float *v, int64_t n, int64_t h) {
    if (h == 1)
        for (int64_t i = 0; i < n; i += 4) {
            float t0 = v[i] + v[i + 1], t1 = v[i] - v[i + 1], t2 = v[i + 2] + v[i + 3], t3 = v[i + 2] - v[i + 3];
            v[i] = t0 + t2; v[i + 1] = t1 + t3; v[i + 2] = t0 - t2; v[i + 3] = t1 - t3;
        }
    else
        for (int64_t i = 0; i < n; i += 4 * h)
            for (int64_t j = i; j < i + h; j++) {
                float x0 = v[j], x1 = v[j + h], x2 = v[j + 2 * h], x3 = v[j + 3 * h];
                float t0 = x0 + x1, t1 = x0 - x1, t2 = x2 + x3, t3 = x2 - x3;
                v[j] = t0 + t2; v[j + h] = t1 + t3; v[j + 2 * h] = t0 - t2; v[j + 3 * h] = t1 - t3;
            }
}

#ifdef __AVX__
#include <immintrin.h>
/* Stages h = 1, 2, 4 of 8 floats in registers: the partner of lane j is lane j ^ h; lanes without
   h set take u + w, the others u - w (u the lower lane), as butterfly_stage does. */
static inline __m256 butterflies8(__m256 x) {
    __m256 p = _mm256_permute_ps(x, 0xB1);  /* lanes 1 0 3 2 */
    x = _mm256_blend_ps(_mm256_add_ps(x, p), _mm256_sub_ps(p, x), 0xAA);
    p = _mm256_permute_ps(x, 0x4E);  /* lanes 2 3 0 1 */
    x = _mm256_blend_ps(_mm256_add_ps(x, p), _mm256_sub_ps(p, x), 0xCC);
    p = _mm256_permute2f128_ps(x, x, 0x01);  /* halves swapped */
    return _mm256_blend_ps(_mm256_add_ps(x, p), _mm256_sub_ps(p, x), 0xF0);
}

/* Stages 1 .. 8 (g >= 16) or 1 .. 4 (g == 8) on each 16 / 8 floats; with g <= 16 also * rsg, * sigma.
   Returns the next stage left to do. */
static int64_t rht_avx(float *v, int64_t n, int64_t g, float rsg, const float *sigma) {
    const __m256 r = _mm256_set1_ps(rsg);
    if (g == 8) {
        for (int64_t i = 0; i < n; i += 8) {
            __m256 t = _mm256_mul_ps(butterflies8(_mm256_loadu_ps(v + i)), r);
            _mm256_storeu_ps(v + i, _mm256_mul_ps(t, _mm256_loadu_ps(sigma + i)));
        }
        return 8;
    }
    for (int64_t i = 0; i < n; i += 16) {
        __m256 a = butterflies8(_mm256_loadu_ps(v + i)), b = butterflies8(_mm256_loadu_ps(v + i + 8));
        __m256 u = _mm256_add_ps(a, b), w = _mm256_sub_ps(a, b);
        if (g == 16) {
            u = _mm256_mul_ps(_mm256_mul_ps(u, r), _mm256_loadu_ps(sigma + i));
            w = _mm256_mul_ps(_mm256_mul_ps(w, r), _mm256_loadu_ps(sigma + i + 8));
        }
        _mm256_storeu_ps(v + i, u);
        _mm256_storeu_ps(v + i + 8, w);
    }
    return 16;
}
#endif

/* The transform of n consecutive floats (n a multiple of g): butterflies, * rsg, * sigma[i]. */
static void rht_line(float *v, int64_t n, int64_t g, float rsg, const float *sigma) {
    int64_t h = 1;
#ifdef __AVX__
    if (g >= 8) {
        h = rht_avx(v, n, g, rsg, sigma);
        if (h >= g) return;
    }
#endif
    for (; 4 * h <= g; h *= 4) butterfly_stages2(v, n, h);
    if (h < g) butterfly_stage(v, n, h);
    for (int64_t i = 0; i < n; i++) { float t = v[i] * rsg; v[i] = t * sigma[i]; }
}

/* The transform of rows r0 .. r0 + g - 1 of buf (rows of w floats): butterflies across rows, * rsg,
   * sigma[row]. */
static void rht_rows(float *buf, int64_t r0, int64_t g, int64_t w, float rsg, const float *sigma) {
    for (int64_t h = 1; h < g; h *= 2)
        for (int64_t i = r0; i < r0 + g; i += 2 * h)
            for (int64_t j = i; j < i + h; j++) {
                float *p = buf + j * w, *p2 = buf + (j + h) * w;
                for (int64_t c = 0; c < w; c++) { float u = p[c], v = p2[c]; p[c] = u + v; p2[c] = u - v; }
            }
    for (int64_t r = r0; r < r0 + g; r++) {
        float *p = buf + r * w;
        const float sg = sigma[r];
        for (int64_t c = 0; c < w; c++) { float t = p[c] * rsg; p[c] = t * sg; }
    }
}

static inline uint32_t max_bits(const float *v, int64_t n) {  /* max |v| as bits */
    uint32_t m = 0;
    for (int64_t i = 0; i < n; i++) { uint32_t t = abs_bits(v[i]); m = t > m ? t : m; }
    return m;
}

/* max |x| over n elements; sets *bad when one is NaN or inf. */
float fq_amax(const float *x, int64_t n, int nthreads, int *bad) {
    uint32_t m = 0;
    #pragma omp parallel for num_threads(nthreads) reduction(max:m) schedule(static)
    for (int64_t i = 0; i < n; i++) { uint32_t t = abs_bits(x[i]); m = t > m ? t : m; }
    *bad = m >= 0x7F800000u;
    return from_bits(m);
}

typedef struct {  /* the geometry of one call (see fq_quant) */
    const float *x; float *out; int64_t A, L, Lo, B, Lq, Bq, P, W, k, cb, g; float rsg; const float *sigma;
    int fixed; float fmul, fdiv, fscale;
} geom_t;

typedef struct { scales_t s; float *amax; uint32_t *cmax; float *buf; uint32_t vmax; int nf; } work_t;

/* n values v of line a from row l0 (whole blocks of k, zero-padded past Lo) to out rows l0 .. Lo - 1. */
static void line_blocks(const geom_t *G, const qparams_t *q, int64_t a, int64_t l0, const float *v, int64_t n,
                        work_t *w) {
    int64_t rows = G->Lo - l0 < n ? G->Lo - l0 : n, nb = (rows + G->k - 1) / G->k;
    uint32_t idx = (uint32_t)(a * G->Lq + l0);
    float *y = G->out + a * G->Lo + l0;
    if (G->fixed || q->kind == 0) {
        if (q->kind == 0) { uint32_t m = max_bits(v, rows); w->vmax = m > w->vmax ? m : w->vmax; }
        quant_run(v, y, rows, &G->fmul, &G->fdiv, &G->fscale, 0, q, idx);
        return;
    }
    for (int64_t j = 0; j < nb; j++) w->amax[j] = from_bits(max_bits(v + j * G->k, G->k));
    for (int64_t j = 0; j < nb; j++) w->nf |= !(w->amax[j] <= FLT_MAX);
    block_scales(w->amax, nb, q, w->s);
    for (int64_t j = 0; j < nb; j++) {
        int64_t r0 = j * G->k, m = rows - r0 < G->k ? rows - r0 : G->k;
        quant_run(v + r0, y + r0, m, w->s.mul + j, w->s.div + j, w->s.scale + j, 0, q, idx + (uint32_t)r0);
    }
}

/* Panels p0 .. p0 + np - 1 (P elements each, consecutive in memory) of line a, rows >= L as 0,
   transformed along the line when g > 0, then quantized block by block. */
static void line_item(const geom_t *G, const qparams_t *q, int64_t a, int64_t p0, int64_t np, work_t *w) {
    const int64_t l0 = p0 * G->P, n = np * G->P;
    int64_t have = G->L - l0 < n ? (G->L - l0 > 0 ? G->L - l0 : 0) : n;
    const float *v = G->x + a * G->L + l0;
    if (have < n || G->g > 0) {  /* a copy: padded, or transformed in place */
        memcpy(w->buf, v, sizeof(float) * (size_t)have);
        for (int64_t r = have; r < n; r++) w->buf[r] = 0.0f;
        if (G->g > 0) rht_line(w->buf, G->Lo - l0 < n ? G->Lo - l0 : n, G->g, G->rsg, G->sigma + l0);
        v = w->buf;
    }
    line_blocks(G, q, a, l0, v, n, w);
}

/* Rows l0 .. l0 + P - 1 by columns c0 .. c0 + cw - 1 of slab a: blocks of k rows x cb columns. */
static void panel_item(const geom_t *G, const qparams_t *q, int64_t a, int64_t l0, int64_t c0, int64_t cw,
                       work_t *w) {
    const int64_t P = G->P, k = G->k, B = G->B;
    float *buf = w->buf;
    for (int64_t r = 0; r < P; r++) {
        if (l0 + r < G->L) memcpy(buf + r * cw, G->x + (a * G->L + l0 + r) * B + c0, sizeof(float) * (size_t)cw);
        else memset(buf + r * cw, 0, sizeof(float) * (size_t)cw);
    }
    if (G->g > 0)
        for (int64_t r0 = 0; r0 < P && l0 + r0 < G->Lo; r0 += G->g) rht_rows(buf, r0, G->g, cw, G->rsg, G->sigma + l0);
    const int per_column = !G->fixed && q->kind != 0;
    for (int64_t r0 = 0; r0 < P && l0 + r0 < G->Lo; r0 += k) {
        if (per_column) {  /* amax per column over the block's rows, then per cb columns */
            for (int64_t c = 0; c < cw; c++) w->cmax[c] = 0;
            for (int64_t r = r0; r < r0 + k; r++) {
                const float *p = buf + r * cw;
                for (int64_t c = 0; c < cw; c++) { uint32_t t = abs_bits(p[c]); w->cmax[c] = t > w->cmax[c] ? t : w->cmax[c]; }
            }
            for (int64_t c1 = 0; c1 < cw; c1 += G->cb) {
                uint32_t m = 0;
                for (int64_t c = c1; c < c1 + G->cb && c < cw; c++) m = w->cmax[c] > m ? w->cmax[c] : m;
                for (int64_t c = c1; c < c1 + G->cb && c < cw; c++) w->amax[c] = from_bits(m);
            }
            for (int64_t c = 0; c < cw; c++) w->nf |= !(w->amax[c] <= FLT_MAX);
            block_scales(w->amax, cw, q, w->s);
        }
        for (int64_t r = r0; r < r0 + k && l0 + r < G->Lo; r++) {
            const float *p = buf + r * cw;
            if (q->kind == 0) { uint32_t m = max_bits(p, cw); w->vmax = m > w->vmax ? m : w->vmax; }
            quant_run(p, G->out + (a * G->Lo + l0 + r) * B + c0, cw, per_column ? w->s.mul : &G->fmul,
                      per_column ? w->s.div : &G->fdiv, per_column ? w->s.scale : &G->fscale, per_column, q,
                      (uint32_t)((a * G->Lq + l0 + r) * G->Bq + c0));
        }
    }
}

/* x: (A, L, B) row-major, rows >= L read as 0; out: (A, Lo, B), may be x when nothing is transformed.
   Work items: panels of P rows (a multiple of k and g) by up to W columns; with B == 1 and cb == 1, W
   consecutive panels of one line. The transform (g > 0) mixes each g rows; blocks of k rows x cb
   columns share a scale (fixed: every block has tamax's; kind 0: no quantization, the values as they
   are, and *vmax their max |value|). Noise index of (a, row, col): (a * Lq + row) * Bq + col.
   Returns 0, or -1 when out of memory; *bad is set on NaN or inf. */
int fq_quant(const float *x, float *out, int64_t A, int64_t L, int64_t Lo, int64_t B, int64_t Lq, int64_t Bq,
             int64_t P, int64_t W, int64_t k, int64_t cb, int64_t g, float rsg, const float *sigma,
             int emin, int mbits, float emax_val, int emax, int kind, int fixed, float tamax, float prescale,
             int mode, uint32_t k1, uint32_t k2, int nthreads, int *bad, float *vmax) {
    qparams_t q = { { emin, mbits, emax_val }, emax, kind, mode, prescale, 1.0f, 1.0f, k1, k2 };
    if (kind == 4) {
        q.boost = tamax < 0x1p-64f ? 0x1p64f : 1.0f;
        q.s_t = (tamax * q.boost) / 2688.0f;
        if (!(q.s_t > 0.0f)) q.s_t = 1.0f;
    }
    const int line = B == 1 && cb == 1;
    const int64_t npanels = (Lo + P - 1) / P;
    if (!line && W > B) W = B;
    geom_t G = { x, out, A, L, Lo, B, Lq, Bq, P, W, k, cb, g, rsg, sigma, fixed, 1.0f, 1.0f, 1.0f };
    block_scales(&tamax, 1, &q, (scales_t){ &G.fmul, &G.fdiv, &G.fscale });
    const int64_t ncols = line ? (npanels + W - 1) / W : (B + W - 1) / W;
    const int64_t items = A * (line ? ncols : npanels * ncols);
    const int64_t nscale = line ? (P * W) / k + 1 : W;
    int nf = 0, failed = 0;
    uint32_t vm = 0;
    #pragma omp parallel num_threads(nthreads) reduction(|:nf) reduction(max:vm)
    {
        float *mem = (float *)malloc(sizeof(float) * (size_t)(P * W + 5 * nscale));
        work_t w = { { mem, mem + nscale, mem + 2 * nscale }, mem + 3 * nscale, (uint32_t *)(mem + 4 * nscale),
                     mem + 5 * nscale, 0, 0 };
        if (!mem) {
            #pragma omp atomic write
            failed = 1;
        }
        #pragma omp for schedule(static)
        for (int64_t it = 0; it < items; it++) {
            if (failed) continue;
            if (line) {
                int64_t a = it / ncols, p0 = (it % ncols) * W;
                line_item(&G, &q, a, p0, npanels - p0 < W ? npanels - p0 : W, &w);
            } else {
                int64_t a = it / (npanels * ncols), rest = it % (npanels * ncols), c0 = (rest % ncols) * W;
                panel_item(&G, &q, a, (rest / ncols) * P, c0, B - c0 < W ? B - c0 : W, &w);
            }
        }
        nf |= w.nf;
        vm = w.vmax > vm ? w.vmax : vm;
        free(mem);
    }
    *bad = nf || vm >= 0x7F800000u;
    *vmax = from_bits(vm);
    return failed ? -1 : 0;
}
"""


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The compiled kernels (built once per source, compiler and machine), or None."""
    so = build("formats", _SOURCE)
    if so is None:
        return None
    i64, f32, i32, ptr = ctypes.c_int64, ctypes.c_float, ctypes.c_int, ctypes.c_void_p
    so.fq_amax.restype = f32
    so.fq_amax.argtypes = [ptr, i64, i32, ptr]
    so.fq_quant.restype = i32
    so.fq_quant.argtypes = ([ptr, ptr] + [i64] * 11 + [f32, ptr, i32, i32, f32, i32, i32, i32, f32, f32, i32,
                                                        ctypes.c_uint32, ctypes.c_uint32, i32, ptr, ptr])
    return so


def usable(x: Tensor) -> bool:
    """Whether the kernel takes x: a plain contiguous CPU float32 tensor under 2^31 elements (noise index)."""
    return (type(x) is torch.Tensor and x.device.type == "cpu" and x.dtype == torch.float32
            and x.is_contiguous() and x.numel() < 2**31 and _library() is not None)


def amax(x: Tensor) -> tuple[float, bool]:
    """(max |x|, whether x holds NaN or inf) in one pass."""
    bad = ctypes.c_int(0)
    m = _library().fq_amax(x.data_ptr(), x.numel(), torch.get_num_threads(), ctypes.byref(bad))
    return m, bool(bad.value)


def run(x3: Tensor, out_rows: int, quant_rows: int, quant_cols: int, panel: int, block: int, cols: int,
        rht: tuple[int, float, Tensor] | None, elem: FloatElement, kind: str, emax: int, tamax: float,
        fixed: bool, prescale: float, rounding: str, keys: tuple[int, int],
        out: Tensor | None = None) -> tuple[Tensor, bool, float]:
    """(out (A, out_rows, B), whether NaN or inf was met, max |out| for kind "none") for x3 (A, L, B).

    fq_quant in the C source: blocks of `block` rows x `cols` columns share a scale (rows along the
    quantized dim); `panel` rows (a multiple of block and of the transform's g) are loaded at a time;
    the noise index runs over the padded (A, quant_rows, quant_cols) layout of the torch path. `out`
    may be x3 itself when nothing is transformed.
    """
    a, length, b = x3.shape
    if out is None:
        out = torch.empty((a, out_rows, b), dtype=torch.float32)
    line = b == 1 and cols == 1  # blocks along a contiguous line: _LINE_PANELS panels per work item
    width = _LINE_PANELS if line else (cols if cols > 1 else _PANEL_COLS)
    g, rsg, sigma = rht if rht is not None else (0, 1.0, None)
    bad, vmax = ctypes.c_int(0), ctypes.c_float(0.0)
    rc = _library().fq_quant(
        x3.data_ptr(), out.data_ptr(), a, length, out_rows, b, quant_rows, quant_cols, panel, width, block, cols,
        g, rsg, None if sigma is None else sigma.data_ptr(), elem.emin, elem.mbits, elem.max, emax,
        SCALE_CODES[kind], int(fixed), tamax, prescale, ROUND_CODES[rounding], keys[0], keys[1],
        torch.get_num_threads(), ctypes.byref(bad), ctypes.byref(vmax))
    if rc != 0:
        raise MemoryError("fq_quant: out of memory for its panel buffers")
    return out, bool(bad.value), vmax.value
