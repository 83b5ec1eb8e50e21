"""Scale rules: from a block's largest magnitude to the factor its elements are divided by (spec/formats.md).

    fp32   s = amax / max_elem                      (FP8 tensorwise / rowwise, DeepSeek tiles)
    e8m0   s = 2^e, e in [-127, 127]                (MX) with
             floor: e = floor(log2 amax) - emax_elem   (OCP v1.0; the largest elements may saturate)
             rceil: e = ceil(log2(amax / max_elem))    (Mishra et al.; nothing saturates; exact, from the bits)
    e4m3   s = s_tensor * E4M3(amax / 6 / s_tensor), s_tensor = amax(x) / (448 * 6)   (NVFP4)

An all-zero block gets s = 1 (fp32), 2^-127 (e8m0) or the smallest normal E4M3 block scale: its
codes are 0, never NaN. Each rule returns (to_elements, scale): the elements are
x * to_elements (e8m0, e4m3) or x / scale (fp32), and x is approximately element * scale.
The expressions follow torchao's CPU casting step for step (tests/quant/test_formats_torchao.py).
"""

from __future__ import annotations

import torch

from fqtrun.quant.formats.elements import E4M3, FloatElement

Tensor = torch.Tensor

NVFP4_TENSOR_DIVISOR = 448.0 * 6.0  # E4M3's largest normal x E2M1's
_TINY_TENSOR = 2.0**-64  # NVFP4 tensors with a smaller amax are scaled up by 2^64 first (exactly)


def pow2(e: Tensor) -> Tensor:
    """Exact float32 2^e for integer e (int32) in [-149, 127], subnormals included."""
    normal = torch.bitwise_left_shift((e + 127).clamp(min=1), 23).view(torch.float32)
    sub = torch.bitwise_left_shift(torch.ones_like(e), (e + 149).clamp(0, 22)).view(torch.float32)
    return torch.where(e >= -126, normal, sub)


def fp32_scale(amax: Tensor, elem: FloatElement) -> Tensor:
    """amax / max_elem, 1 for an all-zero block; never 0 (a subnormal amax gets the smallest float32)."""
    s = (amax / elem.max).clamp(min=2.0**-149)
    return torch.where(amax > 0, s, torch.ones_like(s))


def e8m0_exponent(amax: Tensor, elem: FloatElement, rule: str) -> Tensor:
    """The MX scale exponent e (int32) of each block."""
    if rule == "rceil":  # ceil(log2 d) exactly, from d's bits: one more than its exponent unless a power of 2
        d = amax / elem.max
        bits = d.view(torch.int32)
        e = (torch.bitwise_right_shift(bits, 23) & 0xFF) - 127 + ((bits & 0x7FFFFF) != 0).to(torch.int32)
        e = torch.where(d < 2.0**-126, torch.full_like(e, -126), e)  # (subnormal d: e is -126 or -127 here)
        return torch.where(d > 2.0**-127, e, torch.full_like(e, -127)).clamp(max=127)
    biased = torch.bitwise_right_shift(amax.view(torch.int32), 23) & 0xFF  # floor(log2 amax) + 127
    return (biased - 127 - elem.emax).clamp(-127, 127)


def nvfp4_scales(amax: Tensor, tensor_amax: Tensor, elem: FloatElement,
                 up: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(to_elements, scale, E4M3 block scales, tensor scale) of NVFP4's two-level rule.

    up=True rounds the E4M3 block scale up instead of to nearest, so no element exceeds the largest
    E2M1 value and stochastic rounding stays unbiased (NVIDIA's rounding can clip a block's maximum by
    up to 1/16). A tensor with amax < 2^-64 is scaled by 2^64 first so 1 / s_tensor stays finite.
    """
    boost = torch.where(tensor_amax < _TINY_TENSOR, torch.full_like(tensor_amax, 2.0**64),
                        torch.ones_like(tensor_amax))
    s_t = (tensor_amax * boost) / NVFP4_TENSOR_DIVISOR
    s_t = torch.where(s_t > 0, s_t, torch.ones_like(s_t))
    block = ((amax * boost) / elem.max) / s_t
    block = E4M3.round(block.clamp(min=2.0**E4M3.emin, max=E4M3.max), "up" if up else "nearest")
    to_elements = ((1.0 / s_t) / block) * boost
    return to_elements, (s_t * block) / boost, block, s_t / boost
