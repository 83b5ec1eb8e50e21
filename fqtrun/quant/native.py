"""BHQ's blockwise Householder reflection, and its SR pass with the inverse, as C kernels built with
the machine's C compiler.

reflect: out = (pre * y - coef * S(w * y)) / post, where S sums the rows of each group and hands
each row its group's sum (spec/fqt.md, BHQ: H y = y - c (weight^T y) per group). In torch this is
four passes and two gradient-sized temporaries (multiply, index_add_, index_select, addcmul_);
here it is one kernel over column blocks whose group sums stay in cache, parallel over the blocks.
sr_inverse: grid.sr_quantize's stochastic rounding (same counter-based noise) and dequantization,
then T^-1 with the same reflection, in one pass over the gradient.

Both make the same float operations in the same order as the torch path (products, then sums in
row order, the multiply-adds fused with one rounding as torch's addcmul_ does on CPUs with FMA),
so on such CPUs they give the same values bit for bit. The library is compiled on first use
(about a second), cached under ~/.cache/fqtrun/native keyed by the source, compiler and CPU (it
is built for the CPU's own vector units), and loaded with ctypes. Without a compiler, or for
tensors the kernels do not take (not plain contiguous CPU float32), the functions return None
and the caller runs the torch path.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

from fqtrun.quant.grid import levels, seed_keys

Tensor = torch.Tensor

# C of grid.uniform_noise, shared by every kernel that rounds stochastically
NOISE_C = r"""
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* grid.uniform_noise of flat element i < 2^32: lowbias32(i ^ k1) ^ k2, top 24 bits times 2^-24
   (32-bit arithmetic: the int64 form keeps only the low 32 bits of every product). */
static inline float noise_at(uint32_t i, uint32_t k1, uint32_t k2) {
    uint32_t h = i ^ k1;
    h ^= h >> 16;
    h *= 0x7FEB352DU;
    h ^= h >> 15;
    h *= 0x846CA68BU;
    h ^= h >> 16;
    h ^= k2;
    return (float)(int32_t)(h >> 8) * 0x1p-24f;
}
"""

_SOURCE = NOISE_C + r"""
#define BLOCK 128  /* columns per block: the block's group sums (n x BLOCK floats) stay in cache */

/* For a (n, k) row-major y, over blocks of BLOCK columns:
   - without a grid (inv == NULL): x = y;
     with one: x = (SR(fma(y, inv, zero)) - zero) * scale, per-row grid and noise_at (grid.sr_quantize,
     eager), stored in out;
   - seg[g, c] = sum over the rows r of group g, in row order, of w[r] * x[r, c];
   - out[r, c] = fma(-seg[group[r], c], coef[r], pre[r] * x[r, c]) / post[r] (one rounding for the
     multiply-subtract, as torch's addcmul_); pre / post may be NULL (factor 1).
   out may be y. Returns 0, or -1 when out of memory. */
int bhq_kernel(const float *y, float *out, const int64_t *group, const float *w, const float *coef,
               const float *pre, const float *post, const float *inv, const float *zero, const float *scale,
               float big, uint32_t k1, uint32_t k2, int64_t n, int64_t k, int nthreads) {
    int64_t nblocks = (k + BLOCK - 1) / BLOCK;
    const float *x = inv ? out : y;
    int failed = 0;
    #pragma omp parallel num_threads(nthreads)
    {
        float *seg = (float *)malloc(sizeof(float) * (size_t)n * BLOCK);
        if (!seg) {
            #pragma omp atomic write
            failed = 1;
        }
        #pragma omp for schedule(static)
        for (int64_t b = 0; b < nblocks; b++) {
            if (!seg) continue;
            int64_t c0 = b * BLOCK, m = (k - c0 < BLOCK) ? k - c0 : BLOCK;
            for (int64_t r = 0; r < n; r++) memset(seg + group[r] * BLOCK, 0, sizeof(float) * m);
            for (int64_t r = 0; r < n; r++) {
                const float *yr = y + r * k + c0;
                float *sr = seg + group[r] * BLOCK;
                const float wr = w[r];
                if (inv) {
                    float *outr = out + r * k + c0;
                    const float ir = inv[r], zr = zero[r], qr = scale[r];
                    const uint32_t base = (uint32_t)(r * k + c0);
                    for (int32_t c = 0; c < (int32_t)m; c++) {
                        float u = fmaf(yr[c], ir, zr);
                        u = u < 0.0f ? 0.0f : (u > big ? big : u);
                        float f = floorf(u);
                        float code = f + (noise_at(base + (uint32_t)c, k1, k2) < u - f ? 1.0f : 0.0f);
                        float v = (code - zr) * qr;
                        outr[c] = v;
                        float t = v * wr;
                        sr[c] = sr[c] + t;
                    }
                } else {
                    for (int64_t c = 0; c < m; c++) { float t = yr[c] * wr; sr[c] = sr[c] + t; }
                }
            }
            for (int64_t r = 0; r < n; r++) {
                const float *xr = x + r * k + c0;
                float *outr = out + r * k + c0;
                const float *sr = seg + group[r] * BLOCK;
                const float cr = coef[r];
                if (pre) {
                    const float pr = pre[r];
                    for (int64_t c = 0; c < m; c++) { float v = xr[c] * pr; outr[c] = fmaf(-sr[c], cr, v); }
                } else {
                    for (int64_t c = 0; c < m; c++) outr[c] = fmaf(-sr[c], cr, xr[c]);
                }
                if (post) {
                    const float q = post[r];
                    for (int64_t c = 0; c < m; c++) outr[c] = outr[c] / q;
                }
            }
        }
        free(seg);
    }
    return failed ? -1 : 0;
}
"""

@functools.cache
def _cpu_flags() -> list[str]:
    """This CPU's feature flags (/proc/cpuinfo), part of the cache key since the build targets it."""
    try:
        cpu = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    return next((line.split(":", 1)[-1].split() for line in cpu.splitlines() if line.startswith("flags")), [])


def _flags() -> list[str]:
    """Built for this CPU (its vector units, hardware FMA where it has it, else libm's fmaf); no
    contraction of a * b + c beyond the explicit fmaf, so the roundings are the torch form's."""
    flags = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-fast-math", "-fno-trapping-math", "-shared", "-fPIC"]
    if platform.machine() == "x86_64":
        flags.append("-march=native")
        if "fma" in _cpu_flags():
            flags.append("-mfma")
    return flags


def _cache_dir() -> Path:
    return Path(os.environ.get("FQTRUN_NATIVE_CACHE", "~/.cache/fqtrun/native")).expanduser()


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def build_library(name: str, source: str) -> ctypes.CDLL | None:
    """C `source` compiled for this machine and loaded, cached by source, compiler and CPU; None with a
    warning when there is no compiler or the build fails (FQTRUN_NATIVE=0 turns every kernel off)."""
    cc = _compiler()
    if cc is None or os.environ.get("FQTRUN_NATIVE", "1") == "0":
        return None
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
        flags = _flags()
        parts = [source, *flags, version, platform.machine(), *_cpu_flags()]
        key = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]
        path = _cache_dir() / f"{name}-{key}.so"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
                src, lib = Path(tmp) / f"{name}.c", Path(tmp) / f"{name}.so"
                src.write_text(source)
                subprocess.run([cc, *flags, str(src), "-o", str(lib), "-lm"], check=True, capture_output=True,
                               text=True, timeout=120)
                os.replace(lib, path)  # atomic: parallel sweep jobs may build it at the same time
        return ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError) as err:
        detail = getattr(err, "stderr", "") or err
        warnings.warn(f"{name} native kernel unavailable ({str(detail)[:200]}); using the torch form")
        return None


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The compiled BHQ kernel (built once per source, compiler and machine), or None with a warning."""
    so = build_library("bhq", _SOURCE)
    if so is not None:
        so.bhq_kernel.restype = ctypes.c_int
        so.bhq_kernel.argtypes = ([ctypes.c_void_p] * 10 + [ctypes.c_float, ctypes.c_uint32, ctypes.c_uint32,
                                  ctypes.c_int64, ctypes.c_int64, ctypes.c_int])
    return so


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _takes(out: Tensor, y: Tensor, group: Tensor, vectors: list[Tensor]) -> bool:
    """Whether the kernels can run on these: plain contiguous CPU float32 (N, K) with (N, 1) vectors.

    Fake/meta tensors (tracing, shape checks) and subclasses have no real data; the kernels are
    invisible to autograd.
    """
    if not all(type(t) is torch.Tensor and t.device.type == "cpu" for t in (out, y, group, *vectors)):
        return False
    if y.dtype != torch.float32 or out.dtype != torch.float32 or group.dtype != torch.int64 or y.dim() != 2:
        return False
    if not (y.is_contiguous() and out.is_contiguous() and out.shape == y.shape and group.is_contiguous()):
        return False
    if any(v.dtype != torch.float32 or v.numel() != y.shape[0] or not v.is_contiguous() for v in vectors):
        return False
    return not (torch.is_grad_enabled() and (y.requires_grad or out.requires_grad))


def _check(rc: int) -> None:
    if rc != 0:
        raise MemoryError("bhq_kernel: out of memory for its group sums")


def reflect(out: Tensor, y: Tensor, group: Tensor, w: Tensor, coef: Tensor,
            pre: Tensor | None = None, post: Tensor | None = None) -> Tensor | None:
    """out <- (pre * y - coef * S(w * y)) / post with the C kernel; None when it cannot run here.

    y, out: (N, K) float32; group: (N,) int64 group ids in 0..N-1; w, coef, pre, post: (N, 1)
    float32 (pre, post optional). out may be y itself.
    """
    if not _takes(out, y, group, [w, coef, *(v for v in (pre, post) if v is not None)]):
        return None
    lib = _library()
    if lib is None:
        return None
    _check(lib.bhq_kernel(_ptr(y), _ptr(out), _ptr(group), _ptr(w), _ptr(coef), _ptr(pre), _ptr(post),
                          None, None, None, 0.0, 0, 0, y.shape[0], y.shape[1], torch.get_num_threads()))
    return out


def sr_inverse(y: Tensor, scale: Tensor, zero: Tensor, bits: int, seed: int, group: Tensor,
               w: Tensor, coef: Tensor, post: Tensor) -> Tensor | None:
    """grid.sr_quantize(y, scale, zero, bits, seed, dequant=True) followed by BHQ's inverse transform
    (w, coef, post as in reflect), in one pass; None when the kernel cannot run here.

    scale, zero: (N, 1) per-row grid. Same values as the eager torch path (its noise, its roundings).
    """
    if not _takes(y, y, group, [w, coef, post, zero, scale]) or y.numel() >= 2**32:
        return None
    lib = _library()
    if lib is None:
        return None
    k1, k2 = seed_keys(seed)
    out, inv = torch.empty_like(y), torch.reciprocal(scale)  # only once the kernel will run
    _check(lib.bhq_kernel(_ptr(y), _ptr(out), _ptr(group), _ptr(w), _ptr(coef), None, _ptr(post), _ptr(inv),
                          _ptr(zero), _ptr(scale), float(levels(bits)), k1, k2, y.shape[0], y.shape[1],
                          torch.get_num_threads()))
    return out
