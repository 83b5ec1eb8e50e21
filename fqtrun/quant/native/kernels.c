/* The quantizers' C kernels (fqtrun/quant/native): each makes the float operations of the torch form it
   replaces, in the same order (multiply-adds fused with one rounding where the torch form uses addcmul,
   nothing else contracted), so on CPUs with FMA the results are the same bit for bit.

   range_pass   row and column min/max of a matrix in one pass (NaN-propagating, as torch.amin/amax)
   sr_pass      stochastic rounding (grid.sr_quantize) onto up to two grids in one pass over x: per
                tensor, row or column grids, or each row's span grid found in the same pass while the
                row is in cache; dequantized values or uint8 codes with their row and column sums
   bhq_setup    BHQ's groups and scales from the row ranges (gradient.block_householder_transform)
   bhq_pass     BHQ's y = T x, the row ranges of y, SR of y and T^-1, any of them in one pass over column
                blocks whose group sums stay in cache
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
        lo0 = vsel(v < lo0, v, lo0);
        hi0 = vsel(v > hi0, v, hi0);
        lo1 = vsel(u < lo1, u, lo1);
        hi1 = vsel(u > hi1, u, hi1);
        bad |= (v != v) | (u != u);
    }
    lo0 = vsel(lo1 < lo0, lo1, lo0);
    hi0 = vsel(hi1 > hi0, hi1, hi0);
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

/* rlo/rhi (n): each row's min/max; clo/chi (d): each column's; any pair may be NULL. */
int range_pass(const float *x, int64_t n, int64_t d, float *rlo, float *rhi, float *clo, float *chi,
               int nthreads) {
    int failed = 0;
    if (clo)
        for (int64_t c = 0; c < d; c++) clo[c] = chi[c] = x[c];
    #pragma omp parallel num_threads(nthreads)
    {
        float *tlo = NULL, *thi = NULL;
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
        for (int64_t r = 0; r < n; r++) {
            const float *xr = x + r * d;
            if (rlo) row_range(xr, d, rlo + r, rhi + r);
            if (tlo && thi)
                for (int64_t c = 0; c < d; c++) {
                    tlo[c] = min_nan(tlo[c], xr[c]);
                    thi[c] = max_nan(thi[c], xr[c]);
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

/* one row r of x (row-constant grid s, iv, z, l) into target t; colsum_t: the thread's column sums or NULL */
static void sr_row_const(const sr_target *t, const float *xr, int64_t r, int64_t d, float s, float iv, float z,
                         float l, int32_t *colsum_t) {
    const uint32_t base = (uint32_t)(r * d), k1 = t->k1, k2 = t->k2;
    const float big = t->big;
    if (t->values) {
        float *o = t->values + r * d;
        for (uint32_t c = 0; c < (uint32_t)d; c++)
            o[c] = (sr_code(xr[c], l, iv, z, big, noise_at(base + c, k1, k2)) - z) * s + l;
    }
    if (t->codes) {
        uint8_t *o = t->codes + r * d;
        int32_t acc = 0;
        if (colsum_t) {
            for (uint32_t c = 0; c < (uint32_t)d; c++) {
                int32_t q = (int32_t)sr_code(xr[c], l, iv, z, big, noise_at(base + c, k1, k2));
                o[c] = (uint8_t)q;
                acc += q - OFFSET;
                colsum_t[c] += q - OFFSET;
            }
        } else {
            for (uint32_t c = 0; c < (uint32_t)d; c++) {
                int32_t q = (int32_t)sr_code(xr[c], l, iv, z, big, noise_at(base + c, k1, k2));
                o[c] = (uint8_t)q;
                acc += q - OFFSET;
            }
        }
        if (t->rowsum) t->rowsum[r] = acc;
    }
}

/* one row r of x with a grid per column */
static void sr_row_cols(const sr_target *t, const float *xr, int64_t r, int64_t d, int32_t *colsum_t) {
    const uint32_t base = (uint32_t)(r * d), k1 = t->k1, k2 = t->k2;
    const float big = t->big, *s = t->scale, *iv = t->inv, *z = t->zero, *l = t->lo;
    if (t->values) {
        float *o = t->values + r * d;
        for (uint32_t c = 0; c < (uint32_t)d; c++)
            o[c] = (sr_code(xr[c], l[c], iv[c], z[c], big, noise_at(base + c, k1, k2)) - z[c]) * s[c] + l[c];
    }
    if (t->codes) {
        uint8_t *o = t->codes + r * d;
        int32_t acc = 0;
        for (uint32_t c = 0; c < (uint32_t)d; c++) {
            int32_t q = (int32_t)sr_code(xr[c], l[c], iv[c], z[c], big, noise_at(base + c, k1, k2));
            o[c] = (uint8_t)q;
            acc += q - OFFSET;
            if (colsum_t) colsum_t[c] += q - OFFSET;
        }
        if (t->rowsum) t->rowsum[r] = acc;
    }
}

static void sr_row(sr_target *t, const float *xr, int64_t r, int64_t d, int32_t *colsum_t) {
    if (t->kind == 2) {
        sr_row_cols(t, xr, r, d, colsum_t);
        return;
    }
    int64_t g = t->kind == 0 ? 0 : r;
    if (t->kind == 3) {
        float lo, hi;
        row_range(xr, d, &lo, &hi);
        float s = span_scale(lo, hi, t->big);
        t->scale[r] = s;
        t->inv[r] = 1.0f / s;
        t->lo[r] = lo;
        if (!(isfinite(lo) && isfinite(hi))) { /* the caller raises NonFiniteError: write nothing meaningful */
            t->lo[r] = NAN;
            if (t->values) memset(t->values + r * d, 0, sizeof(float) * (size_t)d);
            if (t->codes) memset(t->codes + r * d, 0, (size_t)d);
            if (t->rowsum) t->rowsum[r] = 0;
            return;
        }
    }
    sr_row_const(t, xr, r, d, t->scale[g], t->inv[g], t->zero[g], t->lo[g], colsum_t);
}

/* x (n, d) row-major into ntargets (1 or 2) targets, each with its own grid and noise, in one pass. */
int sr_pass(const float *x, int64_t n, int64_t d, sr_target *targets, int ntargets, int nthreads) {
    int failed = 0;
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
            for (int t = 0; t < ntargets; t++) sr_row(&targets[t], x + r * d, r, d, cs[t]);
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
   stage 2 (grid set, kind 1): SR of y onto the row grid: grid->codes (+ row and column sums, zeroed by the
     caller) and stop, or the dequantized value v; else v = y;
   stage 3 (w_out set): out = fma(-S(w_out * v), coef, v) * (1 / post) (post NULL: 1); else out = v.
   S sums the rows of each group, in row order, and hands each row its group's sum. out may be x. */
int bhq_pass(const float *x, float *out, int64_t n, int64_t k, int64_t block, const int64_t *group,
             const float *coef, const float *w_in, const float *pre, const sr_target *grid, const float *w_out,
             const float *post, float *ylo, float *yhi, int nthreads) {
    const int ranges = ylo != NULL, codes = grid && grid->codes;
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
        int32_t *trow = NULL, *tcol = NULL;
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
        if (codes && grid->rowsum) ok = ok && (trow = (int32_t *)calloc((size_t)n, sizeof(int32_t)));
        if (codes && grid->colsum) ok = ok && (tcol = (int32_t *)calloc((size_t)k, sizeof(int32_t)));
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
                const uint32_t base = (uint32_t)(r * k + c0);
                if (codes) { /* stage 2 into codes */
                    const float iv = grid->inv[r], z = grid->zero[r], l = grid->lo[r], big = grid->big;
                    uint8_t *o = grid->codes + r * k + c0;
                    int32_t acc = 0;
                    for (uint32_t c = 0; c < (uint32_t)m; c++) {
                        int32_t q = (int32_t)sr_code(y[c], l, iv, z, big, noise_at(base + c, grid->k1, grid->k2));
                        o[c] = (uint8_t)q;
                        acc += q - OFFSET;
                    }
                    if (tcol)
                        for (int64_t c = 0; c < m; c++) tcol[c0 + c] += o[c] - OFFSET;
                    if (trow) trow[r] += acc;
                    continue;
                }
                float *outr = out + r * k + c0;
                if (grid) { /* stage 2, dequantized */
                    const float s = grid->scale[r], iv = grid->inv[r], z = grid->zero[r], l = grid->lo[r];
                    const float big = grid->big;
                    for (uint32_t c = 0; c < (uint32_t)m; c++)
                        outr[c] = (sr_code(y[c], l, iv, z, big, noise_at(base + c, grid->k1, grid->k2)) - z)
                                  * s + l;
                } else if (outr != y) {
                    memmove(outr, y, sizeof(float) * (size_t)m);
                }
                if (w_out) add_scaled(seg2, outr, w_out[r], m);
            }
            if (w_out && !ranges && !codes) /* stage 3 */
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
        if (ok && (ranges || trow || tcol)) {
            #pragma omp critical
            {
                for (int64_t r = 0; ranges && r < n; r++) {
                    ylo[r] = min_nan(ylo[r], tlo[r]);
                    yhi[r] = max_nan(yhi[r], thi[r]);
                }
                for (int64_t r = 0; trow && r < n; r++) grid->rowsum[r] += trow[r];
                for (int64_t c = 0; tcol && c < k; c++) grid->colsum[c] += tcol[c];
            }
        }
        free(seg1);
        free(seg2);
        free(yb);
        free(tlo);
        free(thi);
        free(trow);
        free(tcol);
    }
    free(start);
    free(rows);
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
