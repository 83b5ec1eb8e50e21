/* The quantizers' C kernels (fqtrun/quant/native): each makes the float operations of the torch form it
   replaces, in the same order (multiply-adds fused with one rounding where the torch form uses addcmul,
   nothing else contracted), so on CPUs with FMA the results are the same bit for bit.

   range_pass   row and column min/max of a matrix in one pass (NaN-propagating, as torch.amin/amax)
   sr_pass      stochastic rounding (grid.sr_quantize) onto up to two grids in one pass over x: per
                tensor, row or column grids, or each row's span grid found in the same pass while the
                row is in cache; dequantized values or uint8 codes with their row and column sums
                (sr_span: AVX2 + FMA intrinsics where built for them, AVX-512 in native builds on
                such CPUs, the scalar form elsewhere: the same operations, the same bits)
   bhq_setup    BHQ's groups and scales from the row ranges (gradient.block_householder_transform)
   bhq_pass     BHQ's reflections (T x, optionally with the row ranges of T x; T^-1 y; H y) in one pass over
                column blocks whose group sums stay in cache
   bhq_sr       BHQ's quantization after the set-up: T x, its row grids, SR and T^-1 group by group, the
                group's rows in cache, T x never stored
   nearest_pass round-to-nearest int8 codes (fused.nearest_int8) with their row and column sums
   epilogue     an int8 GEMM's zero-point corrections, scales, offset and bias on its int32 output, in place

   Every kernel returns 0, or -1 when a scratch allocation failed. */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define OFFSET 128 /* int8 value = code - OFFSET */

/* 8-float vectors (GCC/Clang vector extensions: AVX2 here, split into halves on narrower units), for the
   reductions the compiler does not vectorise by itself without -ffast-math (min/max that honour NaN) */
typedef float vf __attribute__((vector_size(32)));
typedef int32_t vi __attribute__((vector_size(32)));
#define W 8

static inline vf vload(const float *p) {
    vf v;
    memcpy(&v, p, sizeof v);
    return v;
}
static inline vf vsel(vi m, vf a, vf b) { return (vf)(((vi)a & m) | ((vi)b & ~m)); }

/* a < b ? a : b and a > b ? a : b lane by lane: exactly what vminps / vmaxps compute (the second operand
   on ties and NaN), one instruction instead of a compare and a select (whose latency bound the range loops) */
#if defined(__AVX__)
#include <immintrin.h>
static inline vf vmin(vf a, vf b) { return (vf)_mm256_min_ps((__m256)a, (__m256)b); }
static inline vf vmax(vf a, vf b) { return (vf)_mm256_max_ps((__m256)a, (__m256)b); }
#else
static inline vf vmin(vf a, vf b) { return vsel(a < b, a, b); }
static inline vf vmax(vf a, vf b) { return vsel(a > b, a, b); }
#endif

/* The SR loops in AVX2 + FMA intrinsics (x86-64-v3 and every native build on those CPUs; 16-lane AVX-512
   ones in native builds on AVX-512 CPUs, below): the compiler's own vectorisation of the scalar form spends
   about a third more instructions on the clamp and the rounding up. The same operations per element;
   elsewhere the scalar form runs. */
#if defined(__AVX2__) && defined(__FMA__)
#define SR_AVX2 1
#endif

#include "noise.h"

/* min / max that keep a NaN once seen (torch.amin / amax propagate NaN) */
static inline float min_nan(float a, float v) { return ((v < a) | (v != v)) ? v : a; }
static inline float max_nan(float a, float v) { return ((v > a) | (v != v)) ? v : a; }

/* min and max of x[0..m-1] (m >= 1), both NaN when x holds a NaN */
static void row_range(const float *x, int64_t m, float *plo, float *phi) {
    const vf zero = {0};
    vf lo0 = zero + x[0], hi0 = lo0, lo1 = lo0, hi1 = lo0;
    vi bad = {0};
    int64_t c = 0;
    for (; c + 2 * W <= m; c += 2 * W) {
        vf v = vload(x + c), u = vload(x + c + W);
        lo0 = vmin(v, lo0);
        hi0 = vmax(v, hi0);
        lo1 = vmin(u, lo1);
        hi1 = vmax(u, hi1);
        bad |= (v != v) | (u != u);
    }
    lo0 = vmin(lo1, lo0);
    hi0 = vmax(hi1, hi0);
    float l = x[0], h = x[0];
    int32_t b = 0;
    for (int j = 0; j < W; j++) {
        l = lo0[j] < l ? lo0[j] : l;
        h = hi0[j] > h ? hi0[j] : h;
        b |= bad[j];
    }
    for (; c < m; c++) {
        l = x[c] < l ? x[c] : l;
        h = x[c] > h ? x[c] : h;
        b |= x[c] != x[c];
    }
    *plo = b ? NAN : l;
    *phi = b ? NAN : h;
}

/* lo[c] = min(lo[c], x[r][c]) and hi[c] likewise for the rows r0 <= r < r1 in row order (rows of length d), as
   min_nan / max_nan do while no NaN turns up; returns whether one did (then the caller redoes these rows with
   min_nan / max_nan). Four rows per sweep of lo and hi: a quarter of their loads and stores. */
static int col_range(const float *x, int64_t d, int64_t r0, int64_t r1, float *lo, float *hi) {
    vi bad = {0};
    int sbad = 0;
    for (int64_t r = r0; r < r1; r += 4) {
        const int64_t nr = r1 - r < 4 ? r1 - r : 4;
        int64_t c = 0;
        for (; c + W <= d; c += W) {
            vf l = vload(lo + c), h = vload(hi + c);
            for (int64_t j = 0; j < nr; j++) {
                vf v = vload(x + (r + j) * d + c);
                l = vmin(v, l);
                h = vmax(v, h);
                bad |= v != v;
            }
            memcpy(lo + c, &l, sizeof l);
            memcpy(hi + c, &h, sizeof h);
        }
        for (; c < d; c++)
            for (int64_t j = 0; j < nr; j++) {
                const float v = x[(r + j) * d + c];
                lo[c] = v < lo[c] ? v : lo[c];
                hi[c] = v > hi[c] ? v : hi[c];
                sbad |= v != v;
            }
    }
    for (int j = 0; j < W; j++) sbad |= bad[j];
    return sbad;
}

/* rlo/rhi (n): each row's min/max; clo/chi (d): each column's; any pair may be NULL. Each thread takes a run
   of rows in batches of four: the batch's column ranges, then each of its rows' ranges (the batch in L2). */
int range_pass(const float *x, int64_t n, int64_t d, float *rlo, float *rhi, float *clo, float *chi,
               int nthreads) {
    int failed = 0;
    const int64_t nbatch = (n + 3) / 4;
    if (clo)
        for (int64_t c = 0; c < d; c++) clo[c] = chi[c] = x[c];
    #pragma omp parallel num_threads(nthreads)
    {
        float *tlo = NULL, *thi = NULL;
        int64_t first = -1, last = -1; /* this thread's batches (a contiguous run: static schedule) */
        int nan_seen = 0;
        if (clo) {
            tlo = (float *)malloc(sizeof(float) * (size_t)d);
            thi = (float *)malloc(sizeof(float) * (size_t)d);
            if (tlo && thi) {
                memcpy(tlo, x, sizeof(float) * (size_t)d);
                memcpy(thi, x, sizeof(float) * (size_t)d);
            } else {
                #pragma omp atomic write
                failed = 1;
            }
        }
        #pragma omp for schedule(static)
        for (int64_t b = 0; b < nbatch; b++) {
            const int64_t r0 = 4 * b, r1 = r0 + 4 < n ? r0 + 4 : n;
            if (first < 0) first = b;
            last = b;
            if (tlo && thi) nan_seen |= col_range(x, d, r0, r1, tlo, thi);
            if (rlo)
                for (int64_t r = r0; r < r1; r++) row_range(x + r * d, d, rlo + r, rhi + r);
        }
        if (tlo && thi && nan_seen && first >= 0) { /* redo with NaN propagated, as torch.amin/amax */
            memcpy(tlo, x, sizeof(float) * (size_t)d);
            memcpy(thi, x, sizeof(float) * (size_t)d);
            for (int64_t r = 4 * first; r < n && r < 4 * (last + 1); r++)
                for (int64_t c = 0; c < d; c++) {
                    tlo[c] = min_nan(tlo[c], x[r * d + c]);
                    thi[c] = max_nan(thi[c], x[r * d + c]);
                }
        }
        if (tlo && thi) {
            #pragma omp critical
            for (int64_t c = 0; c < d; c++) {
                clo[c] = min_nan(clo[c], tlo[c]);
                chi[c] = max_nan(chi[c], thi[c]);
            }
        }
        free(tlo);
        free(thi);
    }
    return failed ? -1 : 0;
}

/* ------------------------------------------------------------------------------------------------ SR */

typedef struct {
    int32_t kind;     /* 0: one grid; 1: a grid per row; 2: a grid per column; 3: each row's span grid,
                         found here (scale, inv, lo written per row; zero is 0) */
    float big;        /* B = 2^bits - 1 */
    uint32_t k1, k2;  /* noise keys (grid.seed_keys) */
    float *scale, *inv, *zero, *lo; /* the grid: u = fma(x - lo, inv, zero), value (code - zero) * scale + lo */
    float *values;    /* (n, d) dequantized values, or NULL */
    uint8_t *codes;   /* (n, d) codes (bits <= 8), or NULL */
    int32_t *rowsum;  /* (n) sum over the row of code - 128 (with codes), or NULL */
    int32_t *colsum;  /* (d) sum over the column of code - 128 (with codes; zeroed by the caller), or NULL */
} sr_target;

/* SR(clamp(fma(x - lo, inv, zero), 0, B)) with noise v: grid.sr_quantize, element by element */
static inline float sr_code(float x, float lo, float inv, float zero, float big, float v) {
    float u = fmaf(x - lo, inv, zero);
    u = u < 0.0f ? 0.0f : (u > big ? big : u);
    float f = floorf(u);
    return f + (v < u - f ? 1.0f : 0.0f);
}

/* grid.span_grid_from_range for one row: scale = (hi / 2 - lo / 2) / B * 2, zeros -> 1, >= FLT_MIN */
static inline float span_scale(float lo, float hi, float big) {
    float s = (hi * 0.5f - lo * 0.5f) / big * 2.0f;
    return s > 0.0f ? (s < FLT_MIN ? FLT_MIN : s) : 1.0f;
}

/* The grid of one SR span: one value for the whole span (cols 0) or one per column (cols 1, indexed by the
   span's own columns). lo_zero: every lo is +0, every scale > 0 and every zero an integer, so x - lo is x and
   (code - zero) * scale + lo is (code - zero) * scale (that product is never -0: code - zero is 0 or at
   least 1 in size), the same values with two operations fewer per element. */
typedef struct {
    const float *s, *iv, *z, *l;
    int cols, lo_zero;
} span_grid;

/* BHQ's additions to an SR span (bhq_sr), NULL elsewhere: the span rounds y = fma(-seg, coef, x * pre)
   instead of x (bhq_y's operations), and adds its values times w_out to seg2 (add_scaled's) */
typedef struct {
    const float *seg;
    float coef, pre;
    float *seg2;
    float w_out;
} span_bhq;

#ifdef SR_AVX2
/* noise_at(i + lane, k1, k2) for lanes 0..7: noise.h's mixing steps on an 8-lane vector (GCC/Clang vector
   extensions give the same instructions as the intrinsics) */
typedef uint32_t vu8 __attribute__((vector_size(32)));
static inline __m256 noise8(uint32_t i, __m256i k1, __m256i k2) {
    vu8 h = (vu8)_mm256_add_epi32(_mm256_set1_epi32((int32_t)i), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)) ^ (vu8)k1;
    FQTRUN_LOWBIAS32(h);
    h ^= (vu8)k2;
    return _mm256_mul_ps(_mm256_cvtepi32_ps((__m256i)(h >> 8)), _mm256_set1_ps(0x1p-24f));
}

#if defined(__AVX512F__) && defined(__AVX512BW__)
/* The same on 16 lanes, for native builds on AVX-512 CPUs: the same operations on wider registers (fewer
   instructions per element; the values are those of the 8-lane and scalar forms) */
#define SR_AVX512 1
typedef uint32_t vu16 __attribute__((vector_size(64)));
static inline __m512 noise16(uint32_t i, __m512i k1, __m512i k2) {
    vu16 h = (vu16)_mm512_add_epi32(_mm512_set1_epi32((int32_t)i),
                                    _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15)) ^ (vu16)k1;
    FQTRUN_LOWBIAS32(h);
    h ^= (vu16)k2;
    return _mm512_mul_ps(_mm512_cvtepi32_ps((__m512i)(h >> 8)), _mm512_set1_ps(0x1p-24f));
}
static inline __m512 sr_code16(__m512 x, __m512 lo, __m512 inv, __m512 zero, __m512 big, __m512 v, int lo_zero) {
    __m512 u = _mm512_fmadd_ps(lo_zero ? x : _mm512_sub_ps(x, lo), inv, zero);
    u = _mm512_max_ps(_mm512_setzero_ps(), _mm512_min_ps(big, u));
    __m512 f = _mm512_roundscale_ps(u, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    __mmask16 up = _mm512_cmp_ps_mask(v, _mm512_sub_ps(u, f), _CMP_LT_OQ);
    return _mm512_add_ps(f, _mm512_maskz_mov_ps(up, _mm512_set1_ps(1.0f))); /* + 1.0f or + 0.0f, as ever */
}
#endif

/* sr_code on 8 lanes: max(0, min(B, u)) is the clamp's two selects exactly (vminps / vmaxps return the second
   operand on NaN and on ties, so a NaN u stays u and -0 stays -0), and the 0 or 1 added is 1.0f & mask */
static inline __m256 sr_code8(__m256 x, __m256 lo, __m256 inv, __m256 zero, __m256 big, __m256 v, int lo_zero) {
    __m256 u = _mm256_fmadd_ps(lo_zero ? x : _mm256_sub_ps(x, lo), inv, zero);
    u = _mm256_max_ps(_mm256_setzero_ps(), _mm256_min_ps(big, u));
    __m256 f = _mm256_floor_ps(u);
    __m256 up = _mm256_and_ps(_mm256_cmp_ps(v, _mm256_sub_ps(u, f), _CMP_LT_OQ), _mm256_set1_ps(1.0f));
    return _mm256_add_ps(f, up);
}
#endif

/* SR of x[0..m) (the noise of flat elements base + c) onto grid g: dequantized values into values, and/or
   uint8 codes into codes with *acc += the sum of code - 128 and colsum[c] += code - 128 (colsum may be NULL);
   bhq (or NULL) as span_bhq says. Sixteen elements per step in AVX2 where built for it, the rest (or all)
   element by element. */
static inline __attribute__((always_inline)) void sr_span(const float *x, int64_t m, uint32_t base, uint32_t k1,
                                                          uint32_t k2, float big, span_grid g, float *values,
                                                          uint8_t *codes, int32_t *acc, int32_t *colsum,
                                                          const span_bhq *bhq) {
    int64_t c = 0;
    int32_t sum = 0;
#ifdef SR_AVX512
    {
        const __m512i vk1 = _mm512_set1_epi32((int32_t)k1), vk2 = _mm512_set1_epi32((int32_t)k2);
        const __m512i off = _mm512_set1_epi32(OFFSET);
        const __m512 vbig = _mm512_set1_ps(big), s0 = _mm512_set1_ps(g.s[0]), iv0 = _mm512_set1_ps(g.iv[0]);
        const __m512 z0 = _mm512_set1_ps(g.z[0]), l0 = _mm512_set1_ps(g.l[0]);
        const __m512 bcoef = _mm512_set1_ps(bhq ? bhq->coef : 0.0f), bpre = _mm512_set1_ps(bhq ? bhq->pre : 0.0f);
        const __m512 bw = _mm512_set1_ps(bhq ? bhq->w_out : 0.0f);
        __m512i vsum = _mm512_setzero_si512();
#define GRID(p, p0) (g.cols ? _mm512_loadu_ps((p) + c) : (p0))
        for (; c + 16 <= m; c += 16) {
            const __m512 l = GRID(g.l, l0), z = GRID(g.z, z0);
            __m512 xv = _mm512_loadu_ps(x + c);
            if (bhq) xv = _mm512_fnmadd_ps(_mm512_loadu_ps(bhq->seg + c), bcoef, _mm512_mul_ps(xv, bpre));
            const __m512 q = sr_code16(xv, l, GRID(g.iv, iv0), z, vbig, noise16(base + (uint32_t)c, vk1, vk2),
                                       g.lo_zero);
            if (values) {
                __m512 v = _mm512_mul_ps(_mm512_sub_ps(q, z), GRID(g.s, s0));
                v = g.lo_zero ? v : _mm512_add_ps(v, l);
                _mm512_storeu_ps(values + c, v);
                if (bhq && bhq->seg2) {
                    float *s2 = bhq->seg2 + c;
                    _mm512_storeu_ps(s2, _mm512_add_ps(_mm512_loadu_ps(s2), _mm512_mul_ps(v, bw)));
                }
            }
            if (codes) {
                const __m512i qi = _mm512_cvttps_epi32(q), sq = _mm512_sub_epi32(qi, off);
                vsum = _mm512_add_epi32(vsum, sq);
                if (colsum) _mm512_storeu_si512(colsum + c, _mm512_add_epi32(_mm512_loadu_si512(colsum + c), sq));
                _mm_storeu_si128((__m128i *)(codes + c), _mm512_cvtepi32_epi8(qi)); /* 0..255: the low byte */
            }
        }
#undef GRID
        sum += _mm512_reduce_add_epi32(vsum);
    }
#elif defined(SR_AVX2)
    const __m256i vk1 = _mm256_set1_epi32((int32_t)k1), vk2 = _mm256_set1_epi32((int32_t)k2);
    const __m256i off = _mm256_set1_epi32(OFFSET);
    const __m256 vbig = _mm256_set1_ps(big), s0 = _mm256_set1_ps(g.s[0]), iv0 = _mm256_set1_ps(g.iv[0]);
    const __m256 z0 = _mm256_set1_ps(g.z[0]), l0 = _mm256_set1_ps(g.l[0]);
    __m256i vsum = _mm256_setzero_si256();
    const __m256 bcoef = _mm256_set1_ps(bhq ? bhq->coef : 0.0f), bpre = _mm256_set1_ps(bhq ? bhq->pre : 0.0f);
    const __m256 bw = _mm256_set1_ps(bhq ? bhq->w_out : 0.0f);
#define GRID(p, p0, at) (g.cols ? _mm256_loadu_ps((p) + (at)) : (p0))
    for (; c + 16 <= m; c += 16) {
        __m256 q[2];
        for (int h = 0; h < 2; h++) {
            const int64_t at = c + 8 * h;
            const __m256 l = GRID(g.l, l0, at), z = GRID(g.z, z0, at);
            __m256 xv = _mm256_loadu_ps(x + at);
            if (bhq) /* fma(-seg, coef, x * pre): fnmadd rounds -(seg coef) + v once, the same */
                xv = _mm256_fnmadd_ps(_mm256_loadu_ps(bhq->seg + at), bcoef, _mm256_mul_ps(xv, bpre));
            q[h] = sr_code8(xv, l, GRID(g.iv, iv0, at), z, vbig, noise8(base + (uint32_t)at, vk1, vk2), g.lo_zero);
            if (values) {
                __m256 v = _mm256_mul_ps(_mm256_sub_ps(q[h], z), GRID(g.s, s0, at));
                v = g.lo_zero ? v : _mm256_add_ps(v, l);
                _mm256_storeu_ps(values + at, v);
                if (bhq && bhq->seg2) {
                    float *s2 = bhq->seg2 + at;
                    _mm256_storeu_ps(s2, _mm256_add_ps(_mm256_loadu_ps(s2), _mm256_mul_ps(v, bw)));
                }
            }
        }
        if (codes) {
            const __m256i a = _mm256_cvttps_epi32(q[0]), b = _mm256_cvttps_epi32(q[1]);
            const __m256i sa = _mm256_sub_epi32(a, off), sb = _mm256_sub_epi32(b, off);
            vsum = _mm256_add_epi32(vsum, _mm256_add_epi32(sa, sb));
            if (colsum) {
                __m256i *cs = (__m256i *)(colsum + c);
                _mm256_storeu_si256(cs, _mm256_add_epi32(_mm256_loadu_si256(cs), sa));
                _mm256_storeu_si256(cs + 1, _mm256_add_epi32(_mm256_loadu_si256(cs + 1), sb));
            }
            /* 0..255 as int32 -> int16 (lanes a0-3 b0-3 a4-7 b4-7, put back in order) -> uint8 */
            const __m256i w = _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), 0xD8);
            _mm_storeu_si128((__m128i *)(codes + c),
                             _mm_packus_epi16(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1)));
        }
    }
#undef GRID
    int32_t lanes[8];
    _mm256_storeu_si256((__m256i *)lanes, vsum);
    for (int j = 0; j < 8; j++) sum += lanes[j];
#endif
    for (; c < m; c++) {
        const int64_t at = g.cols ? c : 0;
        const float s = g.s[at], iv = g.iv[at], z = g.z[at], l = g.l[at];
        float xc = x[c];
        if (bhq) {
            float v = xc * bhq->pre;
            xc = fmaf(-bhq->seg[c], bhq->coef, v);
        }
        const float q = sr_code(xc, l, iv, z, big, noise_at(base + (uint32_t)c, k1, k2));
        if (values) {
            values[c] = (q - z) * s + l;
            if (bhq && bhq->seg2) {
                float t = values[c] * bhq->w_out;
                bhq->seg2[c] = bhq->seg2[c] + t;
            }
        }
        if (codes) {
            const int32_t qi = (int32_t)q;
            codes[c] = (uint8_t)qi;
            sum += qi - OFFSET;
            if (colsum) colsum[c] += qi - OFFSET;
        }
    }
    if (acc) *acc += sum;
}

/* whether every lo of a grid of `count` entries is +0, every scale > 0 and every zero an integer (span_grid) */
static int grid_lo_zero(const sr_target *t, int64_t count) {
    for (int64_t i = 0; i < count; i++)
        if (t->lo[i] != 0.0f || signbit(t->lo[i]) || !(t->scale[i] > 0.0f) || t->zero[i] != floorf(t->zero[i]))
            return 0;
    return 1;
}

/* one row r of x into target t; colsum_t: the thread's column sums or NULL; lo_zero as span_grid's */
static void sr_row(sr_target *t, const float *xr, int64_t r, int64_t d, int32_t *colsum_t, int lo_zero) {
    const uint32_t base = (uint32_t)(r * d);
    float *values = t->values ? t->values + r * d : NULL;
    uint8_t *codes = t->codes ? t->codes + r * d : NULL;
    int32_t acc = 0;
    if (t->kind == 2) {
        const span_grid g = {t->scale, t->inv, t->zero, t->lo, 1, lo_zero};
        sr_span(xr, d, base, t->k1, t->k2, t->big, g, values, codes, &acc, colsum_t, NULL);
    } else {
        const int64_t at = t->kind == 0 ? 0 : r;
        if (t->kind == 3) {
            float lo, hi;
            row_range(xr, d, &lo, &hi);
            float s = span_scale(lo, hi, t->big);
            t->scale[r] = s;
            t->inv[r] = 1.0f / s;
            t->lo[r] = lo;
            if (!(isfinite(lo) && isfinite(hi))) { /* the caller raises NonFiniteError: write nothing meaningful */
                t->lo[r] = NAN;
                if (values) memset(values, 0, sizeof(float) * (size_t)d);
                if (codes) memset(codes, 0, (size_t)d);
                if (t->rowsum) t->rowsum[r] = 0;
                return;
            }
        }
        const span_grid g = {t->scale + at, t->inv + at, t->zero + at, t->lo + at, 0, lo_zero};
        sr_span(xr, d, base, t->k1, t->k2, t->big, g, values, codes, &acc, colsum_t, NULL);
    }
    if (codes && t->rowsum) t->rowsum[r] = acc;
}

/* x (n, d) row-major into ntargets (1 or 2) targets, each with its own grid and noise, in one pass. */
int sr_pass(const float *x, int64_t n, int64_t d, sr_target *targets, int ntargets, int nthreads) {
    int failed = 0, lo_zero[2] = {0, 0};
    for (int t = 0; t < ntargets; t++)
        if (targets[t].kind != 3)
            lo_zero[t] = grid_lo_zero(&targets[t], targets[t].kind == 0 ? 1 : targets[t].kind == 1 ? n : d);
    #pragma omp parallel num_threads(nthreads)
    {
        int32_t *cs[2] = {NULL, NULL};
        for (int t = 0; t < ntargets; t++)
            if (targets[t].codes && targets[t].colsum) {
                cs[t] = (int32_t *)calloc((size_t)d, sizeof(int32_t));
                if (!cs[t]) {
                    #pragma omp atomic write
                    failed = 1;
                }
            }
        #pragma omp for schedule(static)
        for (int64_t r = 0; r < n; r++)
            for (int t = 0; t < ntargets; t++) sr_row(&targets[t], x + r * d, r, d, cs[t], lo_zero[t]);
        for (int t = 0; t < ntargets; t++)
            if (cs[t]) {
                #pragma omp critical
                for (int64_t c = 0; c < d; c++) targets[t].colsum[c] += cs[t][c];
                free(cs[t]);
            }
    }
    return failed ? -1 : 0;
}

/* ----------------------------------------------------------------------------------------------- BHQ */

typedef struct {
    double v;
    int64_t i;
} ranked;

static int by_range_desc(const void *pa, const void *pb) { /* descending, ties in row order: a stable sort */
    const ranked *a = (const ranked *)pa, *b = (const ranked *)pb;
    if (a->v != b->v) return a->v > b->v ? -1 : 1;
    return (a->i > b->i) - (a->i < b->i);
}

/* gradient._householder_maxabs */
static double householder_maxabs(double n) {
    double rs = 1.0 / sqrt(n > 1.0 ? n : 1.0);
    double den = n - sqrt(n);
    double a = n >= 2.0 ? 1.0 / (den > 1e-12 ? den : 1e-12) : 0.0;
    double m = fmax(rs, fabs(1.0 - a));
    m = fmax(m, n >= 3.0 ? a : 0.0);
    return n >= 2.0 ? m : 1.0;
}

static double neg_cbrt(double w) { return pow(w > 1e-300 ? w : 1e-300, -1.0 / 3.0); }

/* gradient.block_householder_transform from the float row ranges (n), the same double formulas in the
   same order; outputs as the BlockHouseholderTransform fields (is_leader as bytes). */
int bhq_setup(const float *ranges, int64_t n, int64_t *group, uint8_t *is_leader, int64_t *leader,
              int64_t *sizes, int64_t *num_groups, float *row_scale, float *coef, float *weight) {
    ranked *rk = (ranked *)malloc(sizeof(ranked) * (size_t)n);
    double *prefix = (double *)malloc(sizeof(double) * (size_t)n);
    double *cut = (double *)malloc(sizeof(double) * (size_t)n);
    double *s1 = (double *)malloc(sizeof(double) * (size_t)n);
    double *s2 = (double *)malloc(sizeof(double) * (size_t)n);
    double *rs = (double *)malloc(sizeof(double) * (size_t)n);
    double *inv_den = (double *)malloc(sizeof(double) * (size_t)n);
    int ok = rk && prefix && cut && s1 && s2 && rs && inv_den;
    if (ok) {
        for (int64_t i = 0; i < n; i++) {
            rk[i].v = (double)ranges[i];
            rk[i].i = i;
        }
        qsort(rk, (size_t)n, sizeof(ranked), by_range_desc);
        double acc = 0.0;
        for (int64_t i = 0; i < n; i++) prefix[i] = acc = acc + rk[i].v;
        /* after Z steps of the spec's loop S = prefix[N-Z-1]; stop when Z lam[N-Z-1] > S or Z = N-1 */
        int64_t n_small = n - 1;
        for (int64_t p = 0; p < n; p++) {
            int64_t z = p + 1, last = n - z - 1 > 0 ? n - z - 1 : 0;
            if ((double)z * rk[last].v > prefix[last] || z >= n - 1) {
                n_small = z < n - 1 ? z : n - 1;
                break;
            }
        }
        int64_t n_lead = n - n_small;
        double total = prefix[n_lead - 1], den = total > 0 ? total : 1.0;
        acc = 0.0;
        for (int64_t i = 0; i < n; i++) {
            double share = i < n_lead ? (double)n_small * rk[i].v / den : 0.0;
            acc = acc + share;
            cut[i] = i >= n_lead - 1 ? (double)n_small : nearbyint(acc);
        }
        for (int64_t i = 0; i < n; i++) sizes[i] = 0;
        int64_t small = 0; /* searchsorted(cut, i - n_lead, right=True): cut is sorted and i - n_lead grows */
        for (int64_t i = 0; i < n; i++) {
            int64_t g = i;
            if (i >= n_lead) {
                while (small < n && cut[small] <= (double)(i - n_lead)) small++;
                g = small;
            }
            group[rk[i].i] = g;
            is_leader[rk[i].i] = i < n_lead;
            leader[i] = rk[i].i;
            sizes[g] += 1;
        }
        for (int64_t g = 0; g < n; g++) {
            double m = (double)sizes[g];
            rs[g] = 1.0 / sqrt(m > 1.0 ? m : 1.0);
            double prev = g > 0 ? cut[g - 1] : 0.0;
            int64_t fs = n_lead + (int64_t)prev;
            double first_small = rk[fs < n - 1 ? fs : n - 1].v;
            int multi = m >= 2.0;
            double w1 = rk[g].v * rs[g], w2 = first_small * householder_maxabs(m);
            s1[g] = multi && w1 > 0 ? neg_cbrt(w1) : 1.0;
            s2[g] = multi && w2 > 0 ? neg_cbrt(w2 / (m - 1 > 1 ? m - 1 : 1)) : 1.0;
            double d1 = 1.0 - rs[g];
            inv_den[g] = multi ? 1.0 / (d1 > 1e-12 ? d1 : 1e-12) : 0.0;
        }
        for (int64_t r = 0; r < n; r++) {
            int64_t g = group[r];
            double c = rs[g] - (is_leader[r] ? 1.0 : 0.0);
            row_scale[r] = (float)(is_leader[r] ? s1[g] : s2[g]);
            coef[r] = (float)c;
            weight[r] = (float)(c * inv_den[g]);
        }
        *num_groups = n_lead;
    }
    free(rk);
    free(prefix);
    free(cut);
    free(s1);
    free(s2);
    free(rs);
    free(inv_den);
    return ok ? 0 : -1;
}

/* seg[c] = seg[c] + x[c] * w, c < m (product rounded, then the sum: index_add_ of the weighted rows);
   a function of its own, or GCC vectorises the loop over rows around it with gathers */
__attribute__((noinline)) static void add_scaled(float *restrict seg, const float *restrict x, float w, int64_t m) {
    for (int64_t c = 0; c < m; c++) {
        float t = x[c] * w;
        seg[c] = seg[c] + t;
    }
}

/* For a (n, k) row-major x, one task per (group, block of `block` columns), the group's rows in row order
   (a task's rows and sums stay in the L2 cache, and its rows are contiguous runs of memory):
   stage 1 (w_in set):  y = fma(-S(w_in * x), coef, pre * x)      (pre NULL: factor 1); else y = x
     with ylo/yhi set: the row ranges of y are written, and y itself into out when out is set; nothing else;
   stage 2 (w_out set): out = fma(-S(w_out * y), coef, y) * (1 / post) (post NULL: 1); else out = y.
   S sums the rows of each group, in row order, and hands each row its group's sum. out may be x.
   (BHQ's quantization itself runs in bhq_sr below.) */
int bhq_pass(const float *x, float *out, int64_t n, int64_t k, int64_t block, const int64_t *group,
             const float *coef, const float *w_in, const float *pre, const float *w_out, const float *post,
             float *ylo, float *yhi, int nthreads) {
    const int ranges = ylo != NULL;
    const int64_t nblocks = (k + block - 1) / block;
    int64_t *start = (int64_t *)calloc((size_t)n + 1, sizeof(int64_t)), *rows = (int64_t *)malloc(sizeof(int64_t) * (size_t)n);
    int64_t *fill = (int64_t *)calloc((size_t)n, sizeof(int64_t));
    if (!start || !rows || !fill) {
        free(start);
        free(rows);
        free(fill);
        return -1;
    }
    /* the rows of group g, in row order: rows[start[g] .. start[g + 1] - 1] */
    for (int64_t r = 0; r < n; r++) start[group[r] + 1] += 1;
    for (int64_t g = 0; g < n; g++) start[g + 1] += start[g];
    for (int64_t r = 0; r < n; r++) rows[start[group[r]] + fill[group[r]]++] = r;
    free(fill);
    if (ranges)
        for (int64_t r = 0; r < n; r++) {
            ylo[r] = INFINITY;
            yhi[r] = -INFINITY;
        }
    int failed = 0;
    #pragma omp parallel num_threads(nthreads)
    {
        float *seg1 = (float *)malloc(sizeof(float) * (size_t)block), *seg2 = (float *)malloc(sizeof(float) * (size_t)block);
        float *yb = (float *)malloc(sizeof(float) * (size_t)block);
        float *tlo = NULL, *thi = NULL;
        int ok = seg1 && seg2 && yb;
        if (ranges) {
            tlo = (float *)malloc(sizeof(float) * (size_t)n);
            thi = (float *)malloc(sizeof(float) * (size_t)n);
            ok = ok && tlo && thi;
            for (int64_t r = 0; ok && r < n; r++) {
                tlo[r] = INFINITY;
                thi[r] = -INFINITY;
            }
        }
        if (!ok) {
            #pragma omp atomic write
            failed = 1;
        }
        #pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < n * nblocks; task++) {
            const int64_t g = task / nblocks, r0 = start[g], r1 = start[g + 1];
            if (!ok || r0 == r1) continue;
            const int64_t c0 = (task % nblocks) * block, m = (k - c0 < block) ? k - c0 : block;
            if (w_in) {
                memset(seg1, 0, sizeof(float) * (size_t)m);
                for (int64_t i = r0; i < r1; i++) add_scaled(seg1, x + rows[i] * k + c0, w_in[rows[i]], m);
            }
            if (w_out) memset(seg2, 0, sizeof(float) * (size_t)m);
            for (int64_t i = r0; i < r1; i++) {
                const int64_t r = rows[i];
                const float *xr = x + r * k + c0;
                const float *y = xr;
                if (w_in) { /* stage 1, into out where y is all that is kept (ranges mode), else into yb */
                    float *yr = ranges && out ? out + r * k + c0 : yb;
                    const float cr = coef[r];
                    if (pre) {
                        const float pr = pre[r];
                        for (int64_t c = 0; c < m; c++) { float v = xr[c] * pr; yr[c] = fmaf(-seg1[c], cr, v); }
                    } else {
                        for (int64_t c = 0; c < m; c++) yr[c] = fmaf(-seg1[c], cr, xr[c]);
                    }
                    y = yr;
                }
                if (ranges) {
                    float lo, hi;
                    row_range(y, m, &lo, &hi);
                    tlo[r] = min_nan(tlo[r], lo);
                    thi[r] = max_nan(thi[r], hi);
                    if (out && out + r * k + c0 != y) memmove(out + r * k + c0, y, sizeof(float) * (size_t)m);
                    continue;
                }
                float *outr = out + r * k + c0;
                if (outr != y) memmove(outr, y, sizeof(float) * (size_t)m);
                if (w_out) add_scaled(seg2, outr, w_out[r], m);
            }
            if (w_out && !ranges) /* stage 2 */
                for (int64_t i = r0; i < r1; i++) {
                    const int64_t r = rows[i];
                    float *outr = out + r * k + c0;
                    const float cr = coef[r];
                    for (int64_t c = 0; c < m; c++) outr[c] = fmaf(-seg2[c], cr, outr[c]);
                    if (post) {
                        const float q = 1.0f / post[r];
                        for (int64_t c = 0; c < m; c++) outr[c] = outr[c] * q;
                    }
                }
        }
        if (ok && ranges) {
            #pragma omp critical
            for (int64_t r = 0; r < n; r++) {
                ylo[r] = min_nan(ylo[r], tlo[r]);
                yhi[r] = max_nan(yhi[r], thi[r]);
            }
        }
        free(seg1);
        free(seg2);
        free(yb);
        free(tlo);
        free(thi);
    }
    free(start);
    free(rows);
    return failed ? -1 : 0;
}

/* BHQ's whole quantization of x after the set-up: y = T x = fma(-S(w_in * x), coef, pre * x) (bhq_pass's
   stage 1), each row's min-max grid of y (span_scale, as the PSQ pass), SR of y onto it, and for values
   T^-1: out = fma(-S(w_out * v), coef, v) * (1 / post) (bhq_pass's stages 2 and 3); y is never stored.

   A task is a group (its rows in row order): for each block of columns the group sums seg = S(w_in * x) (kept
   for the whole row, k floats) and the ranges of y; then each row's grid; then per block y again from x and
   seg (a multiply and an FMA: cheaper than storing y and reading it back), its SR, and T^-1 on the block's
   values while they are in cache. A group's rows are read from memory once when they fit the L2 cache.
   Groups run largest first (dynamic schedule); a group of more than n / (2 nthreads) rows is split by
   blocks instead, its sums and ranges in a first parallel loop, the rest after it, so one large group
   does not leave a thread idle.

   t: kind ignored (a grid per row), big, k1, k2, and the outputs scale, inv, lo (= ylo) (n) written here
   (zero (n) read: 0); t->values (n, k) (not x), or t->codes with t->rowsum and t->colsum (zeroed by the
   caller). ylo, yhi (n): the rows' min and max of y (NaN-propagating). A row whose range is not finite
   gets zeros (its grid's lo NaN): the caller raises NonFiniteError. */
typedef struct {
    const float *x;
    int64_t n, k, block;
    const int64_t *start, *rows;
    const float *coef, *w_in, *pre, *w_out, *post;
    const sr_target *t;
    float *ylo, *yhi;
} bhq_job;

/* the block [c, c + m) of row r of y = T x into yb, from the group sums seg (absolute columns) */
static inline void bhq_y(const bhq_job *j, int64_t r, int64_t c, int64_t m, const float *seg, float *yb) {
    const float *xr = j->x + r * j->k + c;
    const float cr = j->coef[r], pr = j->pre[r];
    for (int64_t i = 0; i < m; i++) {
        float v = xr[i] * pr;
        yb[i] = fmaf(-seg[c + i], cr, v);
    }
}

/* min and max of that block of y (NaN-propagating; which zero a -0 / +0 tie keeps is not defined, as in
   bhq_pass): computed as y is, without storing it where built with AVX2, else through yb and row_range */
static void bhq_y_range(const bhq_job *j, int64_t r, int64_t c, int64_t m, const float *seg, float *yb, float *plo,
                        float *phi) {
#ifdef SR_AVX2
    if (m >= 8) {
        const float *xr = j->x + r * j->k + c, *sg = seg + c;
        const __m256 cr = _mm256_set1_ps(j->coef[r]), pr = _mm256_set1_ps(j->pre[r]);
        __m256 y = _mm256_fnmadd_ps(_mm256_loadu_ps(sg), cr, _mm256_mul_ps(_mm256_loadu_ps(xr), pr));
        __m256 lo = y, hi = y, bad = _mm256_cmp_ps(y, y, _CMP_UNORD_Q);
        int64_t i = 8;
        for (; i + 8 <= m; i += 8) {
            y = _mm256_fnmadd_ps(_mm256_loadu_ps(sg + i), cr, _mm256_mul_ps(_mm256_loadu_ps(xr + i), pr));
            lo = _mm256_min_ps(y, lo);
            hi = _mm256_max_ps(y, hi);
            bad = _mm256_or_ps(bad, _mm256_cmp_ps(y, y, _CMP_UNORD_Q));
        }
        float l[8], h[8], lo1, hi1;
        _mm256_storeu_ps(l, lo);
        _mm256_storeu_ps(h, hi);
        lo1 = l[0];
        hi1 = h[0];
        for (int e = 1; e < 8; e++) {
            lo1 = l[e] < lo1 ? l[e] : lo1;
            hi1 = h[e] > hi1 ? h[e] : hi1;
        }
        int nan = _mm256_movemask_ps(bad) != 0;
        if (i < m) { /* the last few through yb */
            float tl, th;
            bhq_y(j, r, c + i, m - i, seg, yb);
            row_range(yb, m - i, &tl, &th);
            lo1 = tl < lo1 ? tl : lo1;
            hi1 = th > hi1 ? th : hi1;
            nan |= tl != tl;
        }
        *plo = nan ? NAN : lo1;
        *phi = nan ? NAN : hi1;
        return;
    }
#endif
    bhq_y(j, r, c, m, seg, yb);
    row_range(yb, m, plo, phi);
}

/* seg[c] = (((seg[c] + x0[c] w0) + x1[c] w1) + x2[c] w2) + x3[c] w3: add_scaled of four rows in one sweep
   (the same sums in the same order, seg loaded and stored once) */
__attribute__((noinline)) static void add_scaled4(float *restrict seg, const float *restrict x0,
                                                  const float *restrict x1, const float *restrict x2,
                                                  const float *restrict x3, const float *w, int64_t m) {
    const float w0 = w[0], w1 = w[1], w2 = w[2], w3 = w[3];
    for (int64_t c = 0; c < m; c++) {
        float t0 = x0[c] * w0, t1 = x1[c] * w1, t2 = x2[c] * w2, t3 = x3[c] * w3;
        float v = seg[c] + t0;
        v = v + t1;
        v = v + t2;
        seg[c] = v + t3;
    }
}

/* group g over columns [c0, c1): seg[c] (absolute columns) = the group sums, and lo/hi[r] merged with the
   ranges of y's blocks (in block order) */
static void bhq_sums(const bhq_job *j, int64_t g, int64_t c0, int64_t c1, float *seg, float *yb, float *lo, float *hi) {
    const int64_t r0 = j->start[g], r1 = j->start[g + 1], k = j->k;
    for (int64_t c = c0; c < c1; c += j->block) {
        const int64_t m = c1 - c < j->block ? c1 - c : j->block;
        memset(seg + c, 0, sizeof(float) * (size_t)m);
        int64_t i = r0;
        for (; i + 4 <= r1; i += 4) {
            const int64_t *rw = j->rows + i;
            const float w[4] = {j->w_in[rw[0]], j->w_in[rw[1]], j->w_in[rw[2]], j->w_in[rw[3]]};
            add_scaled4(seg + c, j->x + rw[0] * k + c, j->x + rw[1] * k + c, j->x + rw[2] * k + c,
                        j->x + rw[3] * k + c, w, m);
        }
        for (; i < r1; i++) add_scaled(seg + c, j->x + j->rows[i] * k + c, j->w_in[j->rows[i]], m);
        for (i = r0; i < r1; i++) {
            const int64_t r = j->rows[i];
            float l, h;
            bhq_y_range(j, r, c, m, seg, yb, &l, &h);
            lo[r] = min_nan(lo[r], l);
            hi[r] = max_nan(hi[r], h);
        }
    }
}

/* row r's grid from its range (span_scale, 1 / scale); whether it is finite */
static int bhq_grid(const bhq_job *j, int64_t r) {
    const float lo = j->ylo[r], hi = j->yhi[r], s = span_scale(lo, hi, j->t->big);
    j->t->scale[r] = s;
    j->t->inv[r] = 1.0f / s;
    j->t->lo[r] = lo;
    if (isfinite(lo) && isfinite(hi)) return 1;
    j->t->lo[r] = NAN;
    return 0;
}

/* group g over columns [c0, c1), its sums seg and grids ready: SR of y (and T^-1 for values); rowsum: add
   (atomic: the other blocks of a split group may add at the same time) or set */
static void bhq_round(const bhq_job *j, int64_t g, int64_t c0, int64_t c1, const float *seg, float *seg2,
                      int32_t *tcol, int add_rowsum) {
    const sr_target *t = j->t;
    const int64_t r0 = j->start[g], r1 = j->start[g + 1], k = j->k;
    for (int64_t c = c0; c < c1; c += j->block) {
        const int64_t m = c1 - c < j->block ? c1 - c : j->block;
        if (t->values) memset(seg2, 0, sizeof(float) * (size_t)m);
        for (int64_t i = r0; i < r1; i++) {
            const int64_t r = j->rows[i];
            float *values = t->values ? t->values + r * k + c : NULL;
            uint8_t *codes = t->codes ? t->codes + r * k + c : NULL;
            int32_t acc = 0;
            if (isnan(t->lo[r])) { /* a non-finite row: zeros (the caller raises) */
                if (values) memset(values, 0, sizeof(float) * (size_t)m);
                if (codes) memset(codes, 0, (size_t)m);
                if (values && j->w_out) add_scaled(seg2, values, j->w_out[r], m);
            } else { /* y from x and seg, its SR, and (values) seg2 += w_out v, in one sweep */
                const span_grid grid = {t->scale + r, t->inv + r, t->zero + r, t->lo + r, 0, 0};
                const span_bhq b = {seg + c, j->coef[r], j->pre[r], values && j->w_out ? seg2 : NULL,
                                    j->w_out ? j->w_out[r] : 0.0f};
                sr_span(j->x + r * k + c, m, (uint32_t)(r * k + c), t->k1, t->k2, t->big, grid, values, codes,
                        &acc, tcol ? tcol + c : NULL, &b);
            }
            if (codes && t->rowsum) {
                if (add_rowsum) {
                    #pragma omp atomic
                    t->rowsum[r] += acc;
                } else {
                    t->rowsum[r] += acc;
                }
            }
        }
        if (t->values && j->w_out) /* T^-1 on the block */
            for (int64_t i = r0; i < r1; i++) {
                const int64_t r = j->rows[i];
                float *o = t->values + r * k + c;
                const float cr = j->coef[r], q = 1.0f / j->post[r];
                for (int64_t e = 0; e < m; e++) {
                    float v = fmaf(-seg2[e], cr, o[e]);
                    o[e] = v * q;
                }
            }
    }
}

typedef struct {
    int64_t size, g;
} sized;

static int by_size_desc(const void *pa, const void *pb) { /* largest first, ties by group id */
    const sized *a = (const sized *)pa, *b = (const sized *)pb;
    if (a->size != b->size) return a->size > b->size ? -1 : 1;
    return (a->g > b->g) - (a->g < b->g);
}

int bhq_sr(const float *x, int64_t n, int64_t k, int64_t block, const int64_t *group, const float *coef,
           const float *w_in, const float *pre, const float *w_out, const float *post, const sr_target *t,
           float *ylo, float *yhi, int nthreads) {
    const int64_t nblocks = (k + block - 1) / block;
    int64_t *start = (int64_t *)calloc((size_t)n + 1, sizeof(int64_t)), *rows = (int64_t *)malloc(sizeof(int64_t) * (size_t)n);
    int64_t *fill = (int64_t *)calloc((size_t)n, sizeof(int64_t)), *order = (int64_t *)malloc(sizeof(int64_t) * (size_t)n);
    sized *by_size = (sized *)malloc(sizeof(sized) * (size_t)n);
    float *big_seg = NULL;
    int64_t ngroups = 0, nbig = 0;
    int failed = 0;
    if (!start || !rows || !fill || !order || !by_size) {
        failed = 1;
        goto done;
    }
    /* the rows of group g, in row order: rows[start[g] .. start[g + 1] - 1] */
    for (int64_t r = 0; r < n; r++) start[group[r] + 1] += 1;
    for (int64_t g = 0; g < n; g++) start[g + 1] += start[g];
    for (int64_t r = 0; r < n; r++) rows[start[group[r]] + fill[group[r]]++] = r;
    for (int64_t g = 0; g < n; g++)
        if (start[g + 1] > start[g]) by_size[ngroups++] = (sized){start[g + 1] - start[g], g};
    qsort(by_size, (size_t)ngroups, sizeof(sized), by_size_desc);
    for (int64_t i = 0; i < ngroups; i++) order[i] = by_size[i].g;
    /* the groups split by blocks: the first nbig of `order` */
    while (nthreads > 1 && nblocks > 1 && nbig < ngroups && by_size[nbig].size * 2 * nthreads > n) nbig++;
    for (int64_t r = 0; r < n; r++) {
        ylo[r] = INFINITY;
        yhi[r] = -INFINITY;
    }
    if (nbig) {
        big_seg = (float *)malloc(sizeof(float) * (size_t)(nbig * k));
        if (!big_seg) {
            failed = 1;
            goto done;
        }
    }
    const bhq_job job = {x, n, k, block, start, rows, coef, w_in, pre, w_out, post, t, ylo, yhi};
    const int64_t nsplit = nbig * nblocks;
    #pragma omp parallel num_threads(nthreads)
    {
        float *seg = (float *)malloc(sizeof(float) * (size_t)k), *yb = (float *)malloc(sizeof(float) * (size_t)block);
        float *seg2 = (float *)malloc(sizeof(float) * (size_t)block);
        float *plo = NULL, *phi = NULL;
        int32_t *tcol = NULL;
        int ok = seg && yb && seg2;
        if (nbig) { /* this thread's partial ranges of the split groups' rows, merged after the first loop */
            plo = (float *)malloc(sizeof(float) * (size_t)n);
            phi = (float *)malloc(sizeof(float) * (size_t)n);
            ok = ok && plo && phi;
            for (int64_t r = 0; ok && r < n; r++) {
                plo[r] = INFINITY;
                phi[r] = -INFINITY;
            }
        }
        if (t->codes && t->colsum) ok = ok && (tcol = (int32_t *)calloc((size_t)k, sizeof(int32_t)));
        if (!ok) {
            #pragma omp atomic write
            failed = 1;
        }
        /* split groups, first loop: their sums and partial ranges, by blocks */
        #pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < nsplit; task++) {
            const int64_t gi = task / nblocks, g = order[gi], c0 = (task % nblocks) * block;
            if (ok) bhq_sums(&job, g, c0, c0 + block < k ? c0 + block : k, big_seg + gi * k, yb, plo, phi);
        }
        if (nbig) {
            #pragma omp critical
            for (int64_t gi = 0; ok && gi < nbig; gi++)
                for (int64_t i = start[order[gi]]; i < start[order[gi] + 1]; i++) {
                    const int64_t r = rows[i];
                    ylo[r] = min_nan(ylo[r], plo[r]);
                    yhi[r] = max_nan(yhi[r], phi[r]);
                }
            #pragma omp barrier
            #pragma omp single
            for (int64_t gi = 0; gi < nbig; gi++)
                for (int64_t i = start[order[gi]]; i < start[order[gi] + 1]; i++) bhq_grid(&job, rows[i]);
        }
        /* then the split groups' blocks, and every other group whole, largest first */
        #pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < nsplit + ngroups - nbig; task++) {
            if (!ok) continue;
            if (task < nsplit) {
                const int64_t gi = task / nblocks, c0 = (task % nblocks) * block;
                bhq_round(&job, order[gi], c0, c0 + block < k ? c0 + block : k, big_seg + gi * k, seg2, tcol, 1);
            } else {
                const int64_t g = order[nbig + task - nsplit];
                bhq_sums(&job, g, 0, k, seg, yb, ylo, yhi);
                for (int64_t i = start[g]; i < start[g + 1]; i++) bhq_grid(&job, rows[i]);
                bhq_round(&job, g, 0, k, seg, seg2, tcol, 0);
            }
        }
        if (ok && tcol) {
            #pragma omp critical
            for (int64_t c = 0; c < k; c++) t->colsum[c] += tcol[c];
        }
        free(seg);
        free(yb);
        free(seg2);
        free(plo);
        free(phi);
        free(tcol);
    }
done:
    free(start);
    free(rows);
    free(fill);
    free(order);
    free(by_size);
    free(big_seg);
    return failed ? -1 : 0;
}

/* --------------------------------------------------------------------------------------------- int8 */

/* fused.nearest_int8: q = clamp(rint(x / scale) + zero, 0, B) - 128 per element, grid per tensor (kind 0)
   or per row (kind 1); rowsum (n) / colsum (d, zeroed by the caller) of q when set. */
int nearest_pass(const float *x, int64_t n, int64_t d, int kind, const float *scale, const float *zero, float big,
                 int8_t *q, int32_t *rowsum, int32_t *colsum, int nthreads) {
    int failed = 0;
    #pragma omp parallel num_threads(nthreads)
    {
        int32_t *cs = colsum ? (int32_t *)calloc((size_t)d, sizeof(int32_t)) : NULL;
        if (colsum && !cs) {
            #pragma omp atomic write
            failed = 1;
        }
        #pragma omp for schedule(static)
        for (int64_t r = 0; r < n; r++) {
            const float *xr = x + r * d;
            int8_t *o = q + r * d;
            const float s = scale[kind ? r : 0], z = zero[kind ? r : 0];
            int32_t acc = 0;
            for (int64_t c = 0; c < d; c++) {
                float u = rintf(xr[c] / s) + z;
                u = u < 0.0f ? 0.0f : (u > big ? big : u);
                int32_t v = (int32_t)(u - (float)OFFSET);
                o[c] = (int8_t)v;
                acc += v;
            }
            if (rowsum) rowsum[r] = acc;
            if (cs)
                for (int64_t c = 0; c < d; c++) cs[c] += o[c];
        }
        if (cs) {
            #pragma omp critical
            for (int64_t c = 0; c < d; c++) colsum[c] += cs[c];
            free(cs);
        }
    }
    return failed ? -1 : 0;
}

/* fused.int_gemm_epilogue on the int32 (m, n) acc, written in place as float32:
   out = float(acc + alpha_a col_term + row_a alpha_b) * scale_a * scale_b  [+ offset_a * (col_term * scale_b)]
   [+ bias]; every vector is per row (m), per column (n) or one value, as `*_rows` says (1: per row/column). */
typedef struct {
    const int32_t *alpha_a, *row_a, *col_term, *alpha_b;
    const float *scale_a, *scale_b, *offset_a, *bias;
    int32_t alpha_a_rows, row_a_rows, col_term_cols, alpha_b_cols, scale_a_rows, scale_b_cols, offset_a_rows;
} epilogue_args;

int epilogue(int32_t *acc, int64_t m, int64_t n, const epilogue_args *e, int nthreads) {
    float *out = (float *)acc;
    #pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t i = 0; i < m; i++) {
        int32_t *ai = acc + i * n;
        float *oi = out + i * n;
        const int32_t aa = e->alpha_a[e->alpha_a_rows ? i : 0], ra = e->row_a[e->row_a_rows ? i : 0];
        const float sa = e->scale_a[e->scale_a_rows ? i : 0];
        const float oa = e->offset_a ? e->offset_a[e->offset_a_rows ? i : 0] : 0.0f;
        for (int64_t j = 0; j < n; j++) {
            const int32_t ct = e->col_term[e->col_term_cols ? j : 0], ab = e->alpha_b[e->alpha_b_cols ? j : 0];
            const float sb = e->scale_b[e->scale_b_cols ? j : 0];
            int32_t exact = ai[j] + aa * ct;
            exact = exact + ra * ab;
            float v = (float)exact * sa * sb;
            if (e->offset_a) {
                float cv = (float)ct * sb;
                v = v + oa * cv;
            }
            if (e->bias) v = v + e->bias[j];
            oi[j] = v;
        }
    }
    return 0;
}

/* grid.covering_grid_from_range on n ranges (lo[i], hi[i]), the same float32 operations in the same order
   (the torch form's clamps, maximum and minimum, which keep NaN, and its where-selects): the integer zero point
   and step of the finest grid holding [min(lo, 0), max(hi, 0)]. Returns 1 when a range is NaN or inf, 2
   when the outermost levels the data can round to are not finite (nothing is then used). */
int covering_grid(const float *lo, const float *hi, int64_t n, float big, float *scale, float *zero) {
    const float tiny = FLT_MIN;
    for (int64_t i = 0; i < n; i++)
        if (!isfinite(lo[i]) || !isfinite(hi[i])) return 1;
    for (int64_t i = 0; i < n; i++) {
        float l = lo[i] < 0.0f ? lo[i] : 0.0f, h = hi[i] > 0.0f ? hi[i] : 0.0f;
        int both = (l < 0.0f) & (h > 0.0f);
        float span = both ? h * 0.5f - l * 0.5f : 1.0f;
        float z1 = floorf((-l * 0.5f) / span * big);  /* NaN where a subnormal span rounds to 0, as in torch */
        z1 = (z1 > 1.0f || z1 != z1) ? z1 : 1.0f;
        z1 = (z1 < big - 1.0f || z1 != z1) ? z1 : big - 1.0f;
        float z2 = z1 + 1.0f;
        z2 = (z2 < big - 1.0f || z2 != z2) ? z2 : big - 1.0f;
        float a1 = -l / z1, b1 = h / (big - z1), a2 = -l / z2, b2 = h / (big - z2);
        float s1 = (a1 > b1 || a1 != a1) ? a1 : b1, s2 = (a2 > b2 || a2 != a2) ? a2 : b2;  /* torch.maximum */
        float s = both ? ((s1 < s2 || s1 != s1) ? s1 : s2) : ((-l > h ? -l : h) / big);
        zero[i] = both ? (s2 < s1 ? z2 : z1) : (l < 0.0f ? big : 0.0f);
        s = s > 0.0f ? (s > tiny ? s : tiny) : 1.0f;
        scale[i] = s;
        if (!isfinite(floorf(l / s) * s) || !isfinite(ceilf(h / s) * s)) return 2;
    }
    return 0;
}

/* The forward min-max quantizer (quant/native/minmax.py) */
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
