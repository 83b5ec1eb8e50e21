"""BHQ's blockwise Householder reflection as one C kernel, built with the machine's C compiler.

out = pre * y - coef * S(w * y), then / post, where S sums the rows of each group and hands each
row its group's sum (spec/fqt.md, BHQ: H y = y - c (weight^T y) per group). In torch this is four
passes and two gradient-sized temporaries (multiply, index_add_, index_select, addcmul_); here it
is one kernel over column blocks whose group sums stay in cache, parallel over the blocks.

It makes the same float operations in the same order as the torch form (products, then sums in
row order, and the final multiply-subtract fused with one rounding, as torch's addcmul_ does on
CPUs with FMA), so on such CPUs both give the same values bit for bit. The library is compiled on
first use (about a second), cached under ~/.cache/fqtrun/native keyed by the source, compiler
and machine, and loaded with ctypes. Without a compiler, or for tensors the kernel does not take
(not CPU float32), `reflect` returns None and the caller runs the torch form.
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

Tensor = torch.Tensor

_SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define BLOCK 128  /* columns per block: the block's group sums (n x BLOCK floats) stay in cache */

/* out[r, c] = fma(-seg[group[r], c], coef[r], pre[r] * y[r, c]) / post[r] for a (n, k) row-major y
   (one rounding for the multiply-subtract, as torch's addcmul_),
   seg[g, c] = sum over rows r of group g, in row order, of w[r] * y[r, c]; pre / post may be NULL
   (factor 1). out may be y. Returns 0, or -1 when out of memory. */
int bhq_reflect(const float *y, float *out, const int64_t *group, const float *w, const float *coef,
                const float *pre, const float *post, int64_t n, int64_t k, int nthreads) {
    int64_t nblocks = (k + BLOCK - 1) / BLOCK;
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
                for (int64_t c = 0; c < m; c++) { float t = yr[c] * wr; sr[c] = sr[c] + t; }
            }
            for (int64_t r = 0; r < n; r++) {
                const float *yr = y + r * k + c0;
                float *outr = out + r * k + c0;
                const float *sr = seg + group[r] * BLOCK;
                const float cr = coef[r];
                if (pre) {
                    const float pr = pre[r];
                    for (int64_t c = 0; c < m; c++) { float v = yr[c] * pr; outr[c] = fmaf(-sr[c], cr, v); }
                } else {
                    for (int64_t c = 0; c < m; c++) outr[c] = fmaf(-sr[c], cr, yr[c]);
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

def _flags() -> list[str]:
    """No contraction but the explicit fmaf; hardware FMA where the CPU says it has it (else libm's)."""
    flags = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-fast-math", "-shared", "-fPIC"]
    try:
        cpu = Path("/proc/cpuinfo").read_text()
    except OSError:
        cpu = ""
    cpu_flags = next((line.split() for line in cpu.splitlines() if line.startswith("flags")), [])
    if platform.machine() == "x86_64" and "fma" in cpu_flags:
        flags.append("-mfma")
    return flags


def _cache_dir() -> Path:
    return Path(os.environ.get("FQTRUN_NATIVE_CACHE", "~/.cache/fqtrun/native")).expanduser()


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The compiled kernel (built once per source, compiler and machine), or None with a warning."""
    cc = _compiler()
    if cc is None or os.environ.get("FQTRUN_NATIVE", "1") == "0":
        return None
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
        flags = _flags()
        key = hashlib.sha256("\0".join([_SOURCE, *flags, version, platform.machine()]).encode()).hexdigest()[:16]
        path = _cache_dir() / f"bhq_reflect-{key}.so"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
                src, lib = Path(tmp) / "bhq_reflect.c", Path(tmp) / "bhq_reflect.so"
                src.write_text(_SOURCE)
                subprocess.run([cc, *flags, str(src), "-o", str(lib), "-lm"], check=True, capture_output=True,
                               text=True, timeout=120)
                os.replace(lib, path)  # atomic: parallel sweep jobs may build it at the same time
        so = ctypes.CDLL(str(path))
        fn = so.bhq_reflect
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_void_p] * 7 + [ctypes.c_int64, ctypes.c_int64, ctypes.c_int]
        return so
    except (OSError, subprocess.SubprocessError) as err:
        detail = getattr(err, "stderr", "") or err
        warnings.warn(f"BHQ native kernel unavailable ({str(detail)[:200]}); using the torch form")
        return None


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def reflect(out: Tensor, y: Tensor, group: Tensor, w: Tensor, coef: Tensor,
            pre: Tensor | None = None, post: Tensor | None = None) -> Tensor | None:
    """out <- (pre * y - coef * S(w * y)) / post with the C kernel; None when it cannot run here.

    y, out: (N, K) float32; group: (N,) int64 group ids in 0..N-1; w, coef, pre, post: (N, 1)
    float32 (pre, post optional). out may be y itself.
    """
    vectors = [w, coef, *(v for v in (pre, post) if v is not None)]
    # plain CPU tensors only: fake/meta tensors (tracing, shape checks) and subclasses have no real data
    if not all(type(t) is torch.Tensor and t.device.type == "cpu" for t in (out, y, group, *vectors)):
        return None
    if y.dtype != torch.float32 or out.dtype != torch.float32 or group.dtype != torch.int64 or y.dim() != 2:
        return None
    if not (y.is_contiguous() and out.is_contiguous() and out.shape == y.shape and group.is_contiguous()):
        return None
    if any(v.dtype != torch.float32 or v.numel() != y.shape[0] or not v.is_contiguous() for v in vectors):
        return None
    if torch.is_grad_enabled() and (y.requires_grad or out.requires_grad):
        return None  # the kernel is invisible to autograd
    lib = _library()
    if lib is None:
        return None
    rc = lib.bhq_reflect(_ptr(y), _ptr(out), _ptr(group), _ptr(w), _ptr(coef), _ptr(pre), _ptr(post),
                         y.shape[0], y.shape[1], torch.get_num_threads())
    if rc != 0:
        raise MemoryError("bhq_reflect: out of memory for its group sums")
    return out
