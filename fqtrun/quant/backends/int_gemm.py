"""The exact int8 x int8 -> int32 GEMM of the int8 backend, on the fastest engine this CPU has.

torch._int_mm runs oneDNN's int8 kernels on CPUs with AVX-512 (VNNI, AMX) and is several times faster
than a float32 GEMM there (spec/performance.md); on an AVX2-only CPU it falls back to a plain loop,
about 30x slower than float32 (measured on this project's machine, an AVX2 EPYC, 2026-12-02). There
the same integers come from float32 GEMMs over chunks of at most EXACT_K = 1024 along the reduction:
|q_a q_b| <= 2^14, so every partial sum is an integer of magnitude at most 2^24, which float32 holds
exactly whatever the order of the additions; the chunks add up in int32. Both engines give the same
int32 result bit for bit.
"""

from __future__ import annotations

import functools

import torch

Tensor = torch.Tensor
EXACT_K = 1024  # 1024 * 128 * 128 = 2^24: the longest reduction float32 sums exactly for int8 operands


@functools.cache
def engine() -> str:
    """'int_mm' where torch's int8 GEMM has real kernels (AVX-512 and up), else 'fp32' (the exact chunked form)."""
    return "int_mm" if torch.backends.cpu.get_cpu_capability().startswith("AVX512") else "fp32"


def gemm_input(q: Tensor) -> Tensor | None:
    """What int8_gemm reads for the int8 q, made ahead for an operand two GEMMs read: a float32 copy on the
    float32 engine (one conversion instead of two), else None (q itself)."""
    return q.float() if engine() == "fp32" and q.device.type == "cpu" else None


def int8_gemm(a: Tensor, b: Tensor, use: str | None = None) -> Tensor:
    """a @ b for int8 (M, K) and (K, N) as int32 (M, N), exact; `use` forces an engine (tests). The float32
    engine also takes float32 tensors holding the int8 values (gemm_input)."""
    if (use or engine()) == "int_mm" or a.device.type != "cpu":
        return torch._int_mm(a, b)
    af, bf = a.float(), b.float()
    k = a.shape[1]
    out = None
    for k0 in range(0, k, EXACT_K):
        part = torch.mm(af[:, k0:k0 + EXACT_K], bf[k0:k0 + EXACT_K]).to(torch.int32)
        out = part if out is None else out.add_(part)
    return out if out is not None else torch.zeros(a.shape[0], b.shape[1], dtype=torch.int32)
