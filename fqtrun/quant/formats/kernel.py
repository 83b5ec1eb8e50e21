"""The fake-quantization pass of every format (and the random Hadamard transform before it) as one C kernel.

Format.fake runs here when it can, one call per tensor, in work items of a few thousand elements split
evenly over the threads. Each item is read from x once: the transform's butterflies (fast
Walsh-Hadamard, in registers for g = 16 and 32, signs drawn from the key in the kernel) write it to a
small buffer as it is read, then every block's amax (VW blocks folded into one vector), the blocks'
scales (vectorized across blocks) and the dequantized elements (VW lanes at a time; stochastic rounding
draws grid.uniform_noise from the same counter-based hash). A tensor-scaled or NVFP4 tensor first needs
the amax of the whole (transformed) tensor: the same call reads every item once more before that,
transforming in registers without writing anything, and after a barrier computes the tensor scale (and
NVFP4's block scales under it) in the pass above. Only 2-D tiles across a transformed dim other than 0
still take the transform as a pass of its own.

The values are the torch path's bit for bit (format.py, transforms.py; tests/quant/test_formats.py):
the same float operations in the same order per element (-ffp-contract=off), or exact equivalents where
the vector form is shorter, each argued at its code (rounding to the grid by adding and subtracting
2^23 spacings, (t * rsg) * sigma as t * (rsg * sigma)). Every operation is per lane, so the 16-lane
native AVX-512 build and the 8-lane portable one agree too. Built on first use with
quant/native/library.py's builder; `usable` is False (the caller runs torch) when there is no compiler
or the tensor is not a plain contiguous CPU float32 one.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from fqtrun.quant.formats.elements import FloatElement
from fqtrun.quant.grid import seed_keys
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
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

/* ----- the scalar forms (block scales, and the elements past the last whole vector) ----- */
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
   tensor scale; one loop per kind, so each vectorizes (across blocks). */
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
        const float s_t = q->s_t, boost = q->boost, unboost = 1.0f / boost;  /* / boost: * its exact inverse */
        for (int64_t i = 0; i < n; i++) {
            float blk = ((amax[i] * boost) / mx) / s_t;
            blk = blk < 0x1p-6f ? 0x1p-6f : (blk > 448.0f ? 448.0f : blk);
            blk = round_elem(blk, e4m3, up, 0.0f);
            s.mul[i] = ((1.0f / s_t) / blk) * boost; s.div[i] = 1.0f; s.scale[i] = (s_t * blk) * unboost;
        }
    } else
        for (int64_t i = 0; i < n; i++) { s.mul[i] = 1.0f; s.div[i] = 1.0f; s.scale[i] = 1.0f; }
}

/* One element as the torch path computes it: x / div (fp32 scales) or x * mul (E8M0: the exact
   inverse power of two; NVFP4: its reciprocal), * pre, rounded, * scale, / pre. */
static inline float quant_elem(float x, float mul, float div, float scale, float pre, elem_t el, int mode,
                               float noise, int use_div, int use_pre) {
    float v = use_div ? x / div : x * mul;
    if (use_pre) v = v * pre;
    float y = round_elem(v, el, mode, noise) * scale;
    if (use_pre) y = y / pre;
    return y > FLT_MAX ? FLT_MAX : (y < -FLT_MAX ? -FLT_MAX : y);  /* past float32's range: its largest */
}

/* ----- VW-float vectors (GCC/Clang vector extensions): 16 lanes where the build has AVX-512, else 8 (AVX2,
   or halves on narrower units). Every operation is per lane and exact or IEEE-rounded alike, so both
   widths (the native and the portable build) give the same bits. ----- */
#if defined(__AVX512F__)
#define VW 16
#define LANES(f) { f(0), f(1), f(2), f(3), f(4), f(5), f(6), f(7), f(8), f(9), f(10), f(11), f(12), f(13), f(14), f(15) }
#else
#define VW 8
#define LANES(f) { f(0), f(1), f(2), f(3), f(4), f(5), f(6), f(7) }
#endif
typedef float vf __attribute__((vector_size(4 * VW)));
typedef int32_t vi __attribute__((vector_size(4 * VW)));
typedef uint32_t vu __attribute__((vector_size(4 * VW)));

static inline vf vload(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
static inline void vstore(float *p, vf v) { memcpy(p, &v, sizeof v); }
static inline vf vsel(vi m, vf a, vf b) { return (vf)((m & (vi)a) | (~m & (vi)b)); }
#define SAME(j) f
static inline vf vsplat(float f) { return (vf)LANES(SAME); }
static inline vi visplat(int32_t f) { return (vi)LANES(SAME); }
#undef SAME

static inline vi vmin_i(vi a, vi b) {  /* one instruction where there is one (the generic form is two) */
#if VW == 16
    return (vi)_mm512_min_epi32((__m512i)a, (__m512i)b);
#elif defined(__AVX2__)
    return (vi)_mm256_min_epi32((__m256i)a, (__m256i)b);
#else
    vi m = a < b;
    return (m & a) | (~m & b);
#endif
}

static inline vi vmax_i(vi a, vi b) {
#if VW == 16
    return (vi)_mm512_max_epi32((__m512i)a, (__m512i)b);
#elif defined(__AVX2__)
    return (vi)_mm256_max_epi32((__m256i)a, (__m256i)b);
#else
    vi m = a > b;
    return (m & a) | (~m & b);
#endif
}

/* lane permutations: j ^ h (a butterfly partner); FOLDLO / FOLDHI of h: lane j takes lane j & ~h or
   j | h of the first source (j without h) or of the second (j with h) */
#define XOR1(j) ((j) ^ 1)
#define XOR2(j) ((j) ^ 2)
#define XOR4(j) ((j) ^ 4)
#define XOR8(j) ((j) ^ 8)
#define FOLDLO(j, h) ((j) & (h) ? VW + ((j) & ~(h)) : ((j) & ~(h)))
#define FOLDHI(j, h) ((j) & (h) ? VW + ((j) | (h)) : ((j) | (h)))
#define LO1(j) FOLDLO(j, 1)
#define LO2(j) FOLDLO(j, 2)
#define LO4(j) FOLDLO(j, 4)
#define LO8(j) FOLDLO(j, 8)
#define HI1(j) FOLDHI(j, 1)
#define HI2(j) FOLDHI(j, 2)
#define HI4(j) FOLDHI(j, 4)
#define HI8(j) FOLDHI(j, 8)
#define SGN1(j) ((j) & 1 ? -1.0f : 1.0f)
#define SGN2(j) ((j) & 2 ? -1.0f : 1.0f)
#define SGN4(j) ((j) & 4 ? -1.0f : 1.0f)
#define SGN8(j) ((j) & 8 ? -1.0f : 1.0f)

/* p + x * s for s = +-1 in every lane: x * s is exact, so the fused form (one instruction where the build
   has FMA) rounds once, to the same p + x or p - x as the separate operations. */
static inline vf add_signed(vf p, vf x, vf s) {
#if VW == 16
    return (vf)_mm512_fmadd_ps((__m512)x, (__m512)s, (__m512)p);
#elif defined(__FMA__)
    return (vf)_mm256_fmadd_ps((__m256)x, (__m256)s, (__m256)p);
#else
    return p + x * s;
#endif
}

/* Butterfly stage h (< VW) in one vector: lane j's partner is lane j ^ h; the lower lane of a pair
   takes w + u = u + w, the upper u + -w = u - w, as butterfly_stage does (additions commute exactly).
   FOLD(h): lanes without h set max over the pair's lanes of a, the others of b. */
#define LANE_OPS(H)                                                                                     \
    static inline vf stage##H(vf x) {                                                                   \
        return add_signed(__builtin_shuffle(x, (vi)LANES(XOR##H)), x, (vf)LANES(SGN##H));               \
    }                                                                                                   \
    static inline vi fold##H(vi a, vi b) {                                                              \
        return vmax_i(__builtin_shuffle(a, b, (vi)LANES(LO##H)), __builtin_shuffle(a, b, (vi)LANES(HI##H))); \
    }
LANE_OPS(1) LANE_OPS(2) LANE_OPS(4)
#if VW == 16
LANE_OPS(8)
#endif

static inline int32_t hmax(vi m) {  /* the largest lane */
#if VW == 16
    m = vmax_i(m, __builtin_shuffle(m, (vi)LANES(XOR8)));
#endif
    m = vmax_i(m, __builtin_shuffle(m, (vi)LANES(XOR4)));
    m = vmax_i(m, __builtin_shuffle(m, (vi)LANES(XOR2)));
    m = vmax_i(m, __builtin_shuffle(m, (vi)LANES(XOR1)));
    return m[0];
}

/* VW vectors to one: lane j the largest lane of m[j] (a transposing tree of folds). */
static inline vi fold_lanes(vi *m) {
#if VW == 16
    for (int j = 0; j < 8; j++) m[j] = fold8(m[j], m[j + 8]);
#endif
    for (int j = 0; j < 4; j++) m[j] = fold4(m[j], m[j + 4]);
    for (int j = 0; j < 2; j++) m[j] = fold2(m[j], m[j + 2]);
    return fold1(m[0], m[1]);
}

/* noise_at of lanes idx (noise.h), the same 32-bit arithmetic */
static inline vf vnoise(vu i, uint32_t k1, uint32_t k2) {
    vu h = i ^ k1;
    FQTRUN_LOWBIAS32(h);
    h ^= k2;
    return __builtin_convertvector((vi)(h >> 8), vf) * 0x1p-24f;
}

typedef struct { vf pre; vi maxb, emin, shift; uint32_t k1, k2; } vconst_t;  /* a call's constants (bits) */

/* quant_elem on VW lanes, the same values by exact steps: with a = min(|v|, max) and e its exponent (at
   least emin), big = 2^(e - mbits + 23) has grid spacing step = 2^(e - mbits), so (a + big) - big is a
   rounded half-even onto the grid (q * step of nearbyintf(a / step)); one step less where that exceeds
   a is floorf's, and noise * step < a - floor (both exact) is noise < u - q. clamp: y may pass
   float32's range (else the clamp changes nothing). */
static inline __attribute__((always_inline)) vf vquant(vf x, vf mul, vf div, vf scale, vu idx,
                                                       const vconst_t *c, int mode, int use_div, int use_pre,
                                                       int clamp) {
    vf v = use_div ? x / div : x * mul;
    if (use_pre) v = v * c->pre;
    const vi sign = visplat(INT32_MIN);
    const vi vb = (vi)v;
    const vi ab = vmin_i(vb & ~sign, c->maxb);  /* |v| saturated at max (NaN too), as bits */
    const vi eb = vmax_i(ab & visplat(0x7F800000), c->emin);  /* 2^its exponent, at least emin's */
    const vf a = (vf)ab, big = (vf)(eb + c->shift);
    vf r = (a + big) - big;
    if (mode == 1) {  /* r - step where r > a, then + step where noise * step < a - r */
        const vf step = big * 0x1p-23f;
#if VW == 16  /* masked subtract / add: the lanes left out keep r, as r - 0 and r + 0 do (r >= +0) */
        r = (vf)_mm512_mask_sub_ps((__m512)r, _mm512_cmp_ps_mask((__m512)r, (__m512)a, _CMP_GT_OQ), (__m512)r,
                                   (__m512)step);
        r = (vf)_mm512_mask_add_ps((__m512)r, _mm512_cmp_ps_mask((__m512)(vnoise(idx, c->k1, c->k2) * step),
                                   (__m512)(a - r), _CMP_LT_OQ), (__m512)r, (__m512)step);
#else
        r = r - (vf)((vi)step & (r > a));
        r = r + (vf)((vi)step & (vnoise(idx, c->k1, c->k2) * step < a - r));
#endif
    }
    vf y = (vf)((vi)r | (vb & sign)) * scale;
    if (use_pre) y = y / c->pre;
    if (clamp) {
        const vf top = vsplat(FLT_MAX);
        y = vsel(y > top, top, vsel(y < -top, -top, y));
    }
    return y;
}

#define LANE(j) (j)
static const vu IOTA = LANES(LANE);
#undef LANE

/* Blocks of k elements (the last may be shorter), block j with mul[j], div[j], scale[j]: flat loops of
   whole blocks when k is VW or 2 VW, one vquant per VW lanes and quant_elem on a block's tail. */
static inline __attribute__((always_inline)) void quant_blocks(const float *x, float *y, int64_t n, int64_t k,
        const float *mul, const float *div, const float *scale, const qparams_t *q, const vconst_t *c,
        uint32_t idx, int mode, int use_div, int use_pre, int clamp) {
    int64_t j = 0, b0 = 0;
    vu iv = IOTA + idx;
    if (k == VW)
        for (; b0 + VW <= n; b0 += VW, j++, iv += VW)
            vstore(y + b0, vquant(vload(x + b0), vsplat(mul[j]), vsplat(div[j]), vsplat(scale[j]), iv, c, mode,
                                  use_div, use_pre, clamp));
    else if (k == 2 * VW)
        for (; b0 + 2 * VW <= n; b0 += 2 * VW, j++) {
            const vf m = vsplat(mul[j]), d = vsplat(div[j]), s = vsplat(scale[j]);
            vstore(y + b0, vquant(vload(x + b0), m, d, s, iv, c, mode, use_div, use_pre, clamp));
            iv += VW;
            vstore(y + b0 + VW, vquant(vload(x + b0 + VW), m, d, s, iv, c, mode, use_div, use_pre, clamp));
            iv += VW;
        }
    for (; b0 < n; j++, b0 += k) {  /* block j: elements b0 .. e - 1 */
        const int64_t e = n - b0 < k ? n : b0 + k;
        const vf m = vsplat(mul[j]), d = vsplat(div[j]), s = vsplat(scale[j]);
        int64_t i = b0;
        for (iv = IOTA + (idx + (uint32_t)b0); i + VW <= e; i += VW, iv += VW)
            vstore(y + i, vquant(vload(x + i), m, d, s, iv, c, mode, use_div, use_pre, clamp));
        for (; i < e; i++)
            y[i] = quant_elem(x[i], mul[j], div[j], scale[j], q->pre, q->el, mode,
                              mode == 1 ? noise_at(idx + (uint32_t)i, q->k1, q->k2) : 0.0f, use_div, use_pre);
    }
}

/* A scale per element (mul[i], div[i], scale[i]), one vquant per VW lanes and quant_elem on the tail. */
static inline __attribute__((always_inline)) void quant_each(const float *x, float *y, int64_t n,
        const float *mul, const float *div, const float *scale, const qparams_t *q, const vconst_t *c,
        uint32_t idx, int mode, int use_div, int use_pre, int clamp) {
    int64_t i = 0;
    for (vu iv = IOTA + idx; i + VW <= n; i += VW, iv += VW)
        vstore(y + i, vquant(vload(x + i), vload(mul + i), vload(div + i), vload(scale + i), iv, c, mode, use_div,
                             use_pre, clamp));
    for (; i < n; i++)
        y[i] = quant_elem(x[i], mul[i], div[i], scale[i], q->pre, q->el, mode,
                          mode == 1 ? noise_at(idx + (uint32_t)i, q->k1, q->k2) : 0.0f, use_div, use_pre);
}

/* y[i] of x[i], i < n: quant_blocks (k > 0) or quant_each (k == 0). The clamp to float32's range is left
   out when no element can pass it: the largest |y| is max * the largest scale (/ pre), rounding being
   monotonic. The flags are constants at every call (quant_run), so each case is compiled on its own. */
static inline __attribute__((always_inline)) void quant_span(const float *x, float *y, int64_t n, int64_t k,
        const float *mul, const float *div, const float *scale, const qparams_t *q, const vconst_t *c,
        uint32_t idx, int mode, int use_div, int use_pre) {
    const int64_t ns = k == 0 ? n : (n + k - 1) / k;
    uint32_t sb = 0;  /* the largest scale (> 0) as bits */
    for (int64_t j = 0; j < ns; j++) { uint32_t t = abs_bits(scale[j]); sb = t > sb ? t : sb; }
    float top = q->el.max * from_bits(sb);
    if (use_pre) top = top / q->pre;
    const int clamp = !(top <= FLT_MAX);
    if (k == 0 && clamp) quant_each(x, y, n, mul, div, scale, q, c, idx, mode, use_div, use_pre, 1);
    else if (k == 0) quant_each(x, y, n, mul, div, scale, q, c, idx, mode, use_div, use_pre, 0);
    else if (clamp) quant_blocks(x, y, n, k, mul, div, scale, q, c, idx, mode, use_div, use_pre, 1);
    else quant_blocks(x, y, n, k, mul, div, scale, q, c, idx, mode, use_div, use_pre, 0);
}

/* y[i] of x[i], i < n: the scales of block i / k (k > 0: mul[j], div[j], scale[j]) or of the element
   (k == 0: mul[i], ...); noise index idx + i. */
static void quant_run(const float *x, float *y, int64_t n, int64_t k, const float *mul, const float *div,
                      const float *scale, const qparams_t *q, uint32_t idx) {
    const vconst_t c = { vsplat(q->pre), visplat((int32_t)abs_bits(q->el.max)), visplat((q->el.emin + 127) << 23),
                         visplat((23 - q->el.mbits) << 23), q->k1, q->k2 };
    const int use_div = q->kind == 1, use_pre = q->pre != 1.0f;
    if (q->mode == 1) {
        if (use_pre) quant_span(x, y, n, k, mul, div, scale, q, &c, idx, 1, 0, 1);
        else if (use_div) quant_span(x, y, n, k, mul, div, scale, q, &c, idx, 1, 1, 0);
        else quant_span(x, y, n, k, mul, div, scale, q, &c, idx, 1, 0, 0);
    } else if (use_div) quant_span(x, y, n, k, mul, div, scale, q, &c, idx, 0, 1, 0);
    else quant_span(x, y, n, k, mul, div, scale, q, &c, idx, 0, 0, 0);
}

static inline uint32_t max_bits(const float *v, int64_t n) {  /* max |v| as bits */
    const vi mag = visplat(0x7FFFFFFF);
    vi m = visplat(0);
    int64_t i = 0;
    for (; i + VW <= n; i += VW) m = vmax_i(m, (vi)vload(v + i) & mag);
    uint32_t r = (uint32_t)hmax(m);
    for (; i < n; i++) { uint32_t t = abs_bits(v[i]); r = t > r ? t : r; }
    return r;
}

/* amax[j] = max |v| over block j (k consecutive values), j < nb: VW blocks at a time when k is a
   multiple of VW (their maxima folded into one vector), else one by one. */
static void block_amax(const float *v, int64_t nb, int64_t k, float *amax) {
    const vi mag = visplat(0x7FFFFFFF);
    int64_t j = 0;
    if (k % VW == 0)
        for (; j + VW <= nb; j += VW) {
            vi m[VW];
            for (int b = 0; b < VW; b++) {
                const float *p = v + (j + b) * k;
                vi t = (vi)vload(p) & mag;
                for (int64_t i = VW; i < k; i += VW) t = vmax_i(t, (vi)vload(p + i) & mag);
                m[b] = t;
            }
            vstore(amax + j, (vf)fold_lanes(m));
        }
    for (; j < nb; j++) amax[j] = from_bits(max_bits(v + j * k, k));
}

/* ----- the random Hadamard transform ----- */
/* One butterfly stage over n consecutive floats (n a multiple of 2h): the pairs (j, j + h) of every
   2h elements become (u + v, u - v). */
static void butterfly_stage(float *v, int64_t n, int64_t h) {
    for (int64_t i = 0; i < n; i += 2 * h)
        for (int64_t j = i; j < i + h; j++) { float u = v[j], w = v[j + h]; v[j] = u + w; v[j + h] = u - w; }
}

/* Stages h and 2h in one pass (n a multiple of 4h), the same operations in the same order: (x0, x1)
   of stage h, then (x0 + x1) with (x2 + x3) and (x0 - x1) with (x2 - x3) of stage 2h. */
static void butterfly_stages2(float *v, int64_t n, int64_t h) {
    for (int64_t i = 0; i < n; i += 4 * h)
        for (int64_t j = i; j < i + h; j++) {
            float x0 = v[j], x1 = v[j + h], x2 = v[j + 2 * h], x3 = v[j + 3 * h];
            float t0 = x0 + x1, t1 = x0 - x1, t2 = x2 + x3, t3 = x2 - x3;
            v[j] = t0 + t2; v[j + h] = t1 + t3; v[j + 2 * h] = t0 - t2; v[j + 3 * h] = t1 - t3;
        }
}

static inline vf butterflies(vf x) {  /* stages 1 .. VW / 2 */
    x = stage4(stage2(stage1(x)));
#if VW == 16
    x = stage8(x);
#endif
    return x;
}

/* From src to v (n floats, g >= VW): stages 1 .. VW / 2 in registers, with g >= 2 VW also stage VW
   across vector pairs; where that completes the transform also * rs. Returns the next stage. */
static int64_t rht_vec(const float *src, float *v, int64_t n, int64_t g, const float *rs) {
    if (g == VW) {
        for (int64_t i = 0; i < n; i += VW) vstore(v + i, butterflies(vload(src + i)) * vload(rs + i));
        return g;
    }
    for (int64_t i = 0; i < n; i += 2 * VW) {
        vf a = butterflies(vload(src + i)), b = butterflies(vload(src + i + VW));
        vf u = a + b, w = a - b;
        if (g == 2 * VW) { u = u * vload(rs + i); w = w * vload(rs + i + VW); }
        vstore(v + i, u);
        vstore(v + i + VW, w);
    }
    return 2 * VW;
}

/* v = the transform of src (n consecutive floats, n a multiple of g; src may be v): butterflies,
   * rs[i]. */
static void rht_line(const float *src, float *v, int64_t n, int64_t g, const float *rs) {
    int64_t h = 1;
    if (g >= VW) {
        h = rht_vec(src, v, n, g, rs);
        if (h >= g) return;
    } else if (src != v)
        memcpy(v, src, sizeof(float) * (size_t)n);
    for (; 4 * h <= g; h *= 4) butterfly_stages2(v, n, h);
    if (h < g) butterfly_stage(v, n, h);
    for (int64_t i = 0; i < n; i++) v[i] = v[i] * rs[i];
}

/* max |transform| of n consecutive floats (n a multiple of g, VW <= g <= 2 VW) as bits, without writing
   them: |t * rs| = |t| * rsg rounds monotonically in |t|, so it is the largest |butterflies| * rsg. */
static uint32_t rht_max_bits(const float *src, int64_t n, int64_t g, float rsg) {
    const vi mag = visplat(0x7FFFFFFF);
    vi m = visplat(0);
    if (g == VW)
        for (int64_t i = 0; i < n; i += VW) m = vmax_i(m, (vi)butterflies(vload(src + i)) & mag);
    else
        for (int64_t i = 0; i < n; i += 2 * VW) {
            vf a = butterflies(vload(src + i)), b = butterflies(vload(src + i + VW));
            m = vmax_i(m, vmax_i((vi)(a + b) & mag, (vi)(a - b) & mag));
        }
    return abs_bits(from_bits((uint32_t)hmax(m)) * rsg);
}

/* The transform of rows r0 .. r0 + g - 1 of buf (rows of w floats): butterflies across rows, * rs[row]. */
static void rht_rows(float *buf, int64_t r0, int64_t g, int64_t w, const float *rs) {
    for (int64_t h = 1; h < g; h *= 2)
        for (int64_t i = r0; i < r0 + g; i += 2 * h)
            for (int64_t j = i; j < i + h; j++) {
                float *p = buf + j * w, *p2 = buf + (j + h) * w;
                for (int64_t c = 0; c < w; c++) { float u = p[c], v = p2[c]; p[c] = u + v; p2[c] = u - v; }
            }
    for (int64_t r = r0; r < r0 + g; r++) {
        float *p = buf + r * w;
        const float sg = rs[r];
        for (int64_t c = 0; c < w; c++) p[c] = p[c] * sg;
    }
}

/* ----- the passes ----- */
typedef struct {  /* the geometry of one call (see fq_quant) */
    const float *x; float *out; int64_t A, L, Lo, B, Lq, Bq, P, W, k, cb, g; float rsg; const float *rs;
    int fixed; float fmul, fdiv, fscale;
} geom_t;

typedef struct { scales_t s; float *amax; uint32_t *cmax; float *buf; uint32_t vmax; int nf; } work_t;

/* n values v of line a from row l0 (whole blocks of k, zero-padded past Lo) to out rows l0 .. Lo - 1:
   the amax of every block, their scales, then the elements. */
static void line_blocks(const geom_t *G, const qparams_t *q, int64_t a, int64_t l0, const float *v, int64_t n,
                        work_t *w) {
    const int64_t rows = G->Lo - l0 < n ? G->Lo - l0 : n, nb = (rows + G->k - 1) / G->k;
    const uint32_t idx = (uint32_t)(a * G->Lq + l0);
    float *y = G->out ? G->out + a * G->Lo + l0 : NULL;
    if (q->kind == 0) {
        uint32_t m = max_bits(v, rows);
        w->vmax = m > w->vmax ? m : w->vmax;
        if (y) memcpy(y, v, sizeof(float) * (size_t)rows);
        return;
    }
    if (G->fixed) { quant_run(v, y, rows, rows, &G->fmul, &G->fdiv, &G->fscale, q, idx); return; }
    block_amax(v, nb, G->k, w->amax);
    for (int64_t j = 0; j < nb; j++) w->nf |= !(w->amax[j] <= FLT_MAX);
    block_scales(w->amax, nb, q, w->s);
    quant_run(v, y, rows, G->k, w->s.mul, w->s.div, w->s.scale, q, idx);
}

/* Panels p0 .. p0 + np - 1 (P elements each, consecutive in memory) of line a, rows >= L as 0,
   transformed along the line when g > 0 (read from x into the buffer), then quantized block by block. */
static void line_item(const geom_t *G, const qparams_t *q, int64_t a, int64_t p0, int64_t np, work_t *w) {
    const int64_t l0 = p0 * G->P, n = np * G->P;
    int64_t have = G->L - l0 < n ? (G->L - l0 > 0 ? G->L - l0 : 0) : n;
    const float *v = G->x + a * G->L + l0;
    if (have < n) {  /* a padded copy */
        memcpy(w->buf, v, sizeof(float) * (size_t)have);
        for (int64_t r = have; r < n; r++) w->buf[r] = 0.0f;
        v = w->buf;
    }
    if (G->g > 0) {
        const int64_t rows = G->Lo - l0 < n ? G->Lo - l0 : n;
        if (q->kind == 0 && !G->out && G->g >= VW && G->g <= 2 * VW) {  /* only the amax: nothing stored */
            uint32_t m = rht_max_bits(v, rows, G->g, G->rsg);
            w->vmax = m > w->vmax ? m : w->vmax;
            return;
        }
        rht_line(v, w->buf, rows, G->g, G->rs + l0);
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
        for (int64_t r0 = 0; r0 < P && l0 + r0 < G->Lo; r0 += G->g) rht_rows(buf, r0, G->g, cw, G->rs + l0);
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
            float *y = G->out ? G->out + (a * G->Lo + l0 + r) * B + c0 : NULL;
            if (q->kind == 0) {
                uint32_t m = max_bits(p, cw);
                w->vmax = m > w->vmax ? m : w->vmax;
                if (y) memcpy(y, p, sizeof(float) * (size_t)cw);
            } else
                quant_run(p, y, cw, per_column ? 0 : cw, per_column ? w->s.mul : &G->fmul,
                          per_column ? w->s.div : &G->fdiv, per_column ? w->s.scale : &G->fscale, q,
                          (uint32_t)((a * G->Lq + l0 + r) * G->Bq + c0));
        }
    }
}

/* The tensor-level scales from the tensor amax: NVFP4's tensor scale (q), a tensor-scaled format's one
   scale (G->fmul, fdiv, fscale). */
static void tensor_scales(float tamax, qparams_t *q, geom_t *G) {
    if (q->kind == 4) {
        q->boost = tamax < 0x1p-64f ? 0x1p64f : 1.0f;
        q->s_t = (tamax * q->boost) / 2688.0f;
        if (!(q->s_t > 0.0f)) q->s_t = 1.0f;
    }
    block_scales(&tamax, 1, q, (scales_t){ &G->fmul, &G->fdiv, &G->fscale });
}

/* This thread's share of the work items (inside the parallel region): line_item or panel_item each. */
static void run_items(const geom_t *G, const qparams_t *q, int line, int64_t npanels, int64_t ncols,
                      int64_t items, work_t *w, const int *failed) {
    #pragma omp for schedule(static)
    for (int64_t it = 0; it < items; it++) {
        if (*failed) continue;
        if (line) {
            int64_t a = it / ncols, p0 = (it % ncols) * G->W;
            line_item(G, q, a, p0, npanels - p0 < G->W ? npanels - p0 : G->W, w);
        } else {
            int64_t a = it / (npanels * ncols), rest = it % (npanels * ncols), c0 = (rest % ncols) * G->W;
            panel_item(G, q, a, (rest / ncols) * G->P, c0, G->B - c0 < G->W ? G->B - c0 : G->W, w);
        }
    }
}

/* x: (A, L, B) row-major, rows >= L read as 0; out: (A, Lo, B), may be x when nothing is transformed.
   Work items: panels of P rows (a multiple of k and g) by up to W columns; with B == 1 and cb == 1, W
   consecutive panels of one line. The transform (g > 0) mixes each g rows, signs sigma from the keys
   (s1, s2) as RandomHadamard.sign_vector draws them; blocks of k rows x
   cb columns share a scale (fixed: every block has the tensor's; kind 0: no quantization, the values as
   they are, and *vmax their max |value|; with out NULL only *vmax). tamax < 0: the tensor amax (of the
   transformed tensor) is found first, in the same parallel region (every item read once without
   writing, then a barrier), for NVFP4's tensor scale or the fixed scale. Noise index of (a, row, col):
   (a * Lq + row) * Bq + col. Returns 0, or -1 when out of memory; *bad is set on NaN or inf. */
int fq_quant(const float *x, float *out, int64_t A, int64_t L, int64_t Lo, int64_t B, int64_t Lq, int64_t Bq,
             int64_t P, int64_t W, int64_t k, int64_t cb, int64_t g, float rsg, uint32_t s1, uint32_t s2,
             int emin, int mbits, float emax_val, int emax, int kind, int fixed, float tamax, float prescale,
             int mode, uint32_t k1, uint32_t k2, int nthreads, int *bad, float *vmax) {
    const int line = B == 1 && cb == 1, find_tamax = tamax < 0.0f;
    const int64_t npanels = (Lo + P - 1) / P;
    if (!line && W > B) W = B;
    float *rs = g > 0 ? (float *)malloc(sizeof(float) * (size_t)Lo) : NULL;  /* rsg * sigma: (t * rsg) * sigma
        is t * (rsg * sigma) exactly, sigma being +-1 and rounding symmetric */
    if (g > 0 && !rs) return -1;
    for (int64_t i = 0; g > 0 && i < Lo; i++) rs[i] = noise_at((uint32_t)i, s1, s2) < 0.5f ? -rsg : rsg;
    qparams_t q = { { emin, mbits, emax_val }, emax, kind, mode, prescale, 1.0f, 1.0f, k1, k2 };
    geom_t G = { x, out, A, L, Lo, B, Lq, Bq, P, W, k, cb, g, rsg, rs, fixed, 1.0f, 1.0f, 1.0f };
    if (!find_tamax) tensor_scales(tamax, &q, &G);
    const int64_t ncols = line ? (npanels + W - 1) / W : (B + W - 1) / W;
    const int64_t items = A * (line ? ncols : npanels * ncols);
    const int64_t nscale = line ? (P * W) / k + VW : W;
    int nf = 0, failed = 0;
    uint32_t vm = 0, tbits = 0;
    #pragma omp parallel num_threads(nthreads) reduction(|:nf) reduction(max:vm)
    {
        float *mem = (float *)malloc(sizeof(float) * (size_t)(P * W + 5 * nscale));
        work_t w = { { mem, mem + nscale, mem + 2 * nscale }, mem + 3 * nscale, (uint32_t *)(mem + 4 * nscale),
                     mem + 5 * nscale, 0, 0 };
        if (!mem) {
            #pragma omp atomic write
            failed = 1;
        }
        qparams_t ql = q;
        geom_t Gl = G;
        if (find_tamax) {
            qparams_t q0 = q;
            geom_t G0 = G;
            q0.kind = 0;
            G0.out = NULL;
            run_items(&G0, &q0, line, npanels, ncols, items, &w, &failed);
            #pragma omp critical
            tbits = w.vmax > tbits ? w.vmax : tbits;
            #pragma omp barrier
            w.vmax = 0;
            tensor_scales(from_bits(tbits), &ql, &Gl);
        }
        if (tbits < 0x7F800000u) run_items(&Gl, &ql, line, npanels, ncols, items, &w, &failed);
        nf |= w.nf;
        vm = w.vmax > vm ? w.vmax : vm;
        free(mem);
    }
    free(rs);
    *bad = nf || vm >= 0x7F800000u || tbits >= 0x7F800000u;
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
    i64, f32, i32, u32, ptr = ctypes.c_int64, ctypes.c_float, ctypes.c_int, ctypes.c_uint32, ctypes.c_void_p
    so.fq_quant.restype = i32
    so.fq_quant.argtypes = ([ptr, ptr] + [i64] * 11 + [f32, u32, u32, i32, i32, f32, i32, i32, i32, f32, f32, i32,
                                                        ctypes.c_uint32, ctypes.c_uint32, i32, ptr, ptr])
    return so


def usable(x: Tensor) -> bool:
    """Whether the kernel takes x: a plain contiguous CPU float32 tensor under 2^31 elements (noise index)."""
    return (type(x) is torch.Tensor and x.device.type == "cpu" and x.dtype == torch.float32
            and x.is_contiguous() and x.numel() < 2**31 and _library() is not None)


def run(x3: Tensor, out_rows: int, quant_rows: int, quant_cols: int, panel: int, block: int, cols: int,
        rht: tuple[int, float, int] | None, elem: FloatElement, kind: str, emax: int, tamax: float,
        fixed: bool, prescale: float, rounding: str, keys: tuple[int, int],
        out: Tensor | None = None) -> tuple[Tensor, bool, float]:
    """(out (A, out_rows, B), whether NaN or inf was met, max |out| for kind "none") for x3 (A, L, B).

    fq_quant in the C source: blocks of `block` rows x `cols` columns share a scale (rows along the
    quantized dim); `panel` rows (a multiple of block and of the transform's g) are loaded at a time;
    the noise index runs over the padded (A, quant_rows, quant_cols) layout of the torch path; rht is
    (g, rsqrt, key) of RandomHadamard; tamax < 0 has the kernel find the tensor amax first. `out` may be
    x3 itself when nothing is transformed.
    """
    a, length, b = x3.shape
    if out is None:
        out = torch.empty((a, out_rows, b), dtype=torch.float32)
    line = b == 1 and cols == 1  # blocks along a contiguous line: _LINE_PANELS panels per work item
    width = _LINE_PANELS if line else (cols if cols > 1 else _PANEL_COLS)
    g, rsg, key = rht if rht is not None else (0, 1.0, 0)
    s1, s2 = seed_keys(key)
    bad, vmax = ctypes.c_int(0), ctypes.c_float(0.0)
    rc = _library().fq_quant(
        x3.data_ptr(), out.data_ptr(), a, length, out_rows, b, quant_rows, quant_cols, panel, width, block, cols,
        g, rsg, s1, s2, elem.emin, elem.mbits, elem.max, emax,
        SCALE_CODES[kind], int(fixed), tamax, prescale, ROUND_CODES[rounding], keys[0], keys[1],
        torch.get_num_threads(), ctypes.byref(bad), ctypes.byref(vmax))
    if rc != 0:
        raise MemoryError("fq_quant: out of memory for its panel buffers")
    return out, bool(bad.value), vmax.value
