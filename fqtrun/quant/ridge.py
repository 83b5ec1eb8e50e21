"""Denoising (ridge) dequantization: fake quantization whose dequantizer is a ridge fit of x on the codes.

spec/denoise_bn.md part A (Ye et al., arXiv 2409.09245). Per quantization block:
    f = (x - b_f) / s_f                   scaled input on the grid below (s_f, b_f carry gradient)
    q = code(f) + (f - stop_grad(f))      = f + stop_grad(code - f), with an exact integer forward value
    affine: s = Cov(x, q) / (Var(q) + lam),          y = s (q - mean q) + mean x
    linear: s = mean(q x) / (mean(q^2) + lam),       y = s q
The fit minimises mean((x - y)^2) + lam s^2 with an unpenalised intercept (affine) or none (linear).
Only the rounding residual is detached: gradients flow through f, s_f, b_f, the statistics and y.

Grids (the codes; the fit re-learns scale and offset, so the grid only has to spread the codes):
    bits 2..8, affine : codes 0..2^bits-1 over [min(x, 0), max(x, 0)], s_f = span / (2^bits - 1),
                        integer zero point z = round(-lo / s_f), f = x / s_f + z (x = 0 has code z)
    bits 2..8, linear : codes -Q..Q, Q = 2^(bits-1) - 1, s_f = max|x| / Q (x = 0 has code 0)
    "ternary"         : codes -1, 0, 1, f = x / s_f, s_f = 1.4 mean|x| (|x| < 0.7 mean|x| -> 0), both forms
    bits = 1          : codes +-1 = sign(f), sign(0) = +1; linear f = x / mean|x|,
                        affine f = (x - mean x) / mean|x - mean x|; no zero level, so no mask
An all-zero block gets s_f = 1 (no division by zero); a NaN or inf in a block makes its range statistic
non-finite, and that raises NonFiniteError (quant/numerics.py) instead of fitting a meaningless grid.
Sparsity: x_s = x + stop_grad(mask * x - x) is quantized and y is fit against the dense x (spec A).
Masked entries get the zero level (z affine, 0 otherwise); only the linear form maps it back to exactly 0.
A constant q with lam = 0 makes the denominator 0: then s = 0, i.e. y = mean x (affine, the
least-squares answer) or y = 0 = q (linear, q is all zero then) -- never NaN.

Blocks: "tensor" one block; "channel" one block per index of channel_dim; "block" views x per channel
(channel_dim moved first, the other dims flattened row-major, so the original last dim is contiguous) and
cuts every channel row into consecutive blocks of `block` elements; a shorter last block has its own stats.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from fqtrun.quant.bits import check_bits
from fqtrun.quant.numerics import check_range

Tensor = torch.Tensor
Bits = int | str  # 1..8 or "ternary"

_FORMS = ("affine", "linear")
_GRANULARITIES = ("tensor", "channel", "block")
TERNARY_SCALE = 1.4  # s_f = 1.4 mean|x|: zero code for |x| < 0.7 mean|x|


def _check(bits: Bits, form: str, lam: float, granularity: str, block: int) -> None:
    if bits != "ternary":
        check_bits(bits, "bits", "ridge")  # or 'ternary' (levels -1, 0, 1)
    if form not in _FORMS:
        raise ValueError(f"form={form!r} must be 'affine' (y = s (q - mean q) + mean x) or 'linear' (y = s q)")
    if not lam >= 0:
        raise ValueError(f"lam={lam} must be >= 0 (ridge penalty; the paper uses 0.01)")
    if granularity not in _GRANULARITIES:
        raise ValueError(f"granularity={granularity!r} must be one of {_GRANULARITIES}")
    if granularity == "block" and not (isinstance(block, int) and block >= 1):
        raise ValueError(f"block={block!r} must be a positive int (elements per sub-channel block)")


def _mean(v: Tensor, weight: Tensor | None) -> Tensor:
    """Mean over the last dim, counting only entries with weight 1 (padding has weight 0)."""
    if weight is None:
        return v.mean(-1, keepdim=True)
    return (v * weight).sum(-1, keepdim=True) / weight.sum(-1, keepdim=True)


def _to_rows(
    x: Tensor, granularity: str, block: int, channel_dim: int
) -> tuple[Tensor, Tensor | None, Callable[[Tensor], Tensor]]:
    """View x as (G, n): one quantization block per row; weight marks real entries (None: all real)."""
    if granularity == "tensor":
        return x.reshape(1, -1), None, lambda r: r.reshape(x.shape)
    if x.dim() == 0 or not -x.dim() <= channel_dim < x.dim():
        raise ValueError(f"channel_dim={channel_dim} is not a dim of a tensor with shape {tuple(x.shape)}")
    d = channel_dim % x.dim()
    moved = x.movedim(d, 0)
    moved_shape = moved.shape
    xc = moved.reshape(moved_shape[0], -1)  # (C, R)
    if granularity == "channel":
        return xc, None, lambda r: r.reshape(moved_shape).movedim(0, d)
    C, R = xc.shape
    nb = -(-R // block)
    pad = nb * block - R
    rows = F.pad(xc, (0, pad)).reshape(C * nb, block)
    weight = F.pad(torch.ones_like(xc), (0, pad)).reshape(C * nb, block) if pad else None

    def restore(r: Tensor) -> Tensor:
        return r.reshape(C, nb * block)[:, :R].reshape(moved_shape).movedim(0, d)

    return rows, weight, restore


def scaled_input(rows: Tensor, bits: Bits, form: str, weight: Tensor | None = None) -> Tensor:
    """f = (x - b_f) / s_f per row (the grid table in the module docstring); differentiable in x."""
    one = torch.ones((), dtype=rows.dtype, device=rows.device)
    if bits == 1:
        centre = _mean(rows, weight) if form == "affine" else torch.zeros_like(rows[..., :1])
        dev = rows - centre
        s_f = _mean(dev.abs(), weight)
        check_range(s_f.detach())
        return dev / torch.where(s_f > 0, s_f, one)
    if bits == "ternary":
        s_f = TERNARY_SCALE * _mean(rows.abs(), weight)
        check_range(s_f.detach())
        return rows / torch.where(s_f > 0, s_f, one)
    if form == "linear":
        s_f = rows.abs().amax(-1, keepdim=True) / ((1 << (bits - 1)) - 1)
        check_range(s_f.detach())
        return rows / torch.where(s_f > 0, s_f, one)
    lo = rows.amin(-1, keepdim=True).clamp(max=0)  # padding zeros are inside [lo, hi] anyway
    hi = rows.amax(-1, keepdim=True).clamp(min=0)
    check_range(lo.detach(), hi.detach())
    span = hi - lo
    s_f = torch.where(span > 0, span / ((1 << bits) - 1), one)
    zero = torch.round(-lo / s_f).detach()  # integer zero point: x = 0 lands exactly on a code
    return rows / s_f + zero


def round_codes(f: Tensor, bits: Bits, form: str) -> Tensor:
    """Integer codes (float tensor, no gradient) of the scaled input f: clip(round(f)) or sign."""
    f = f.detach()
    if bits == 1:
        return torch.where(f >= 0, 1.0, -1.0).to(f.dtype)
    if bits == "ternary":
        return torch.round(f).clamp(-1, 1)
    if form == "linear":
        top = (1 << (bits - 1)) - 1
        return torch.round(f).clamp(-top, top)
    return torch.round(f).clamp(0, (1 << bits) - 1)


def ridge_fit(x: Tensor, q: Tensor, lam: float = 0.01, form: str = "affine", weight: Tensor | None = None) -> Tensor:
    """Ridge fit of x on q over the last dim (one block per row), evaluated at q (spec A step 3).

    A zero denominator (constant q with lam = 0) gives s = 0 instead of NaN (module docstring).
    """
    s, mq, mx = _coefficients(x, q, lam, form, weight)
    return s * (q - mq) + mx if form == "affine" else s * q


def _coefficients(x: Tensor, q: Tensor, lam: float, form: str, weight: Tensor | None):
    """Per-row (s, mean q, mean x) of the ridge fit; the means are None for the linear form."""
    if form not in _FORMS:
        raise ValueError(f"form={form!r} must be 'affine' or 'linear'")
    if form == "affine":
        mx, mq = _mean(x, weight), _mean(q, weight)
        dq = q - mq
        num = _mean((x - mx) * dq, weight)
        den = _mean(dq * dq, weight) + lam
    else:
        mx = mq = None
        num = _mean(q * x, weight)
        den = _mean(q * q, weight) + lam
    ok = den > 0
    s = torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(num))
    return s, mq, mx


def _prepare(x: Tensor, bits: Bits, form: str, lam: float, granularity: str, block: int,
             channel_dim: int, mask: Tensor | None):
    """Shared front half: checks, sparse input, block rows; returns (rows, f, weight, restore)."""
    _check(bits, form, lam, granularity, block)
    x_s = x
    if mask is not None:
        if mask.dtype != torch.bool or mask.shape != x.shape:
            raise ValueError(f"mask must be a bool tensor of shape {tuple(x.shape)}, "
                             f"got {mask.dtype} {tuple(mask.shape)}")
        if bits == 1:
            raise ValueError("bits=1 has no zero level for masked entries: use bits='ternary' "
                             "(levels -1, 0, 1) or bits >= 2 with a sparsity mask")
        x_s = x + (torch.where(mask, x, torch.zeros_like(x)) - x).detach()  # forward: mask * x
    rows, weight, restore = _to_rows(x, granularity, block, channel_dim)
    rows_s = _to_rows(x_s, granularity, block, channel_dim)[0]
    return rows, scaled_input(rows_s, bits, form, weight), weight, restore


def ridge_quantize(
    x: Tensor,
    bits: Bits,
    form: str = "affine",
    lam: float = 0.01,
    granularity: str = "tensor",
    block: int = 128,
    channel_dim: int = 0,
    mask: Tensor | None = None,
) -> Tensor:
    """Fake-quantize x (optionally sparsified by a bool mask) and dequantize with the ridge fit; same shape."""
    rows, f, weight, restore = _prepare(x, bits, form, lam, granularity, block, channel_dim, mask)
    q = round_codes(f, bits, form) + (f - f.detach())  # forward: the code; backward: df
    return restore(ridge_fit(rows, q, lam, form, weight))


def ridge_codes(
    x: Tensor,
    bits: Bits,
    form: str = "affine",
    granularity: str = "tensor",
    block: int = 128,
    channel_dim: int = 0,
    mask: Tensor | None = None,
) -> Tensor:
    """The integer codes ridge_quantize fits (float tensor holding integers, x's shape, no gradient)."""
    _, f, _, restore = _prepare(x.detach(), bits, form, 0.0, granularity, block, channel_dim, mask)
    return restore(round_codes(f, bits, form))


def ridge_parts(
    x: Tensor,
    bits: Bits,
    form: str = "affine",
    lam: float = 0.01,
    granularity: str = "tensor",
    block: int = 128,
    channel_dim: int = 0,
    mask: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(codes, scale, offset), each of x's shape, no gradient: ridge_quantize's forward = codes * scale + offset.

    scale and offset are constant over each quantization block (offset = mean x - s mean q; 0 for linear).
    """
    x = x.detach()
    rows, f, weight, restore = _prepare(x, bits, form, lam, granularity, block, channel_dim, mask)
    q = round_codes(f, bits, form)
    s, mq, mx = _coefficients(rows, q, lam, form, weight)
    offset = torch.zeros_like(s) if form == "linear" else mx - s * mq
    return restore(q), restore(s.expand_as(q)), restore(offset.expand_as(q))
