"""Stochastic-rounding gradient quantizers of fully quantized training (spec/fqt.md).

X is the output gradient dY viewed as (N, D), one row per sample. Every quantizer is
Q(X) = T^-1 dequant(SR(T X)) with an invertible N x N transform T (identity except BHQ),
so E[Q(X)] = X. Plain objects, no trainer needed:

    q = make_gradient_quantizer("bhq", bits=4)
    x_hat = q(x, seed)                 # dequantized, same shape and dtype
    gc = q.quantize(x, seed)           # integer codes + scale/zero (+ BHQ transform)
    gc.dequantize()                    # == q(x, seed)

An integer backend feeds gc.codes (minus gc.zero) to an integer GEMM, applies gc.scale to
the result, and for BHQ applies gc.transform.inverse to the (N, K) product (T^-1 acts on
rows only, so it commutes with any right-multiplication).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from fqtrun.quant import native
from fqtrun.quant.bits import check_bits
from fqtrun.quant.grid import covering_grid, covering_grid_from_range, sr_quantize, sr_quantize_compiled
from fqtrun.quant.numerics import check_range

Tensor = torch.Tensor

def _as_matrix(name: str, x: Tensor) -> Tensor:
    if not isinstance(x, Tensor) or x.dim() != 2 or not x.is_floating_point():
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(
            f"{name} expects a floating 2-D (N, D) gradient, got {shape}: "
            "pass x.reshape(x.shape[0], -1) (one row per sample)"
        )
    return x.detach().float()


def code_dtype(bits: int) -> torch.dtype:
    """uint8 codes up to 8 bits, int32 above."""
    return torch.uint8 if bits <= 8 else torch.int32


@dataclass(frozen=True)
class BlockHouseholderTransform:
    """T = H_g diag(s) on each group g of rows, kept in the input's row order (spec/fqt.md, BHQ).

    group:      (N,) int64, group id of each row; ids 0..G-1 are used, id g is led by row leader[g]
    is_leader:  (N,) bool
    leader:     (N,) int64, leader row of each group id (entries >= G are unused)
    sizes:      (N,) int64, rows per group id (0 for unused ids)
    num_groups: 0-d int64 tensor, G
    row_scale:  (N, 1) float32, s1 on leaders, s2 on the other rows of the group
    coef:       (N, 1) float32, (u - e_1) at the row, u = 1/sqrt(n) 1: 1/sqrt(n) - [leader]
    weight:     (N, 1) float32, coef / (1 - 1/sqrt(n)); 0 in groups of one row
    With c = u - e_1, H_n = I - c c^T / (1 - 1/sqrt(n)), so H y = y - c (weight^T y) per group:
    a segment sum and a gather, O(N D), no N x N matrix.
    """

    group: Tensor
    is_leader: Tensor
    leader: Tensor
    sizes: Tensor
    num_groups: Tensor
    row_scale: Tensor
    coef: Tensor
    weight: Tensor

    def _reflect(self, out: Tensor | None, y: Tensor, w: Tensor, pre: Tensor | None = None,
                 post: Tensor | None = None) -> Tensor:
        """(pre * y - coef * (per group, sum over its rows of w * y)) / post, into out (None: new).

        H y is w = weight (pre, post absent). On CPU one C kernel (quant/native.py); elsewhere, or
        without a compiler, the same operations in torch: two (N, K) temporaries (the weighted rows,
        reused for the gathered sums, and the segment sums).
        """
        if out is None:
            out = torch.empty_like(y)
        if native.reflect(out, y, self.group, w, self.coef, pre, post) is not None:
            return out
        t = y * w
        seg = torch.zeros_like(t).index_add_(0, self.group, t)
        torch.index_select(seg, 0, self.group, out=t)
        if pre is not None:
            torch.mul(y, pre, out=out)
        elif out is not y:
            out.copy_(y)
        out.addcmul_(t, self.coef, value=-1.0)
        return out if post is None else out.div_(post)

    def householder(self, y: Tensor) -> Tensor:
        """H y (blockwise; H = H^T = H^-1)."""
        return self._reflect(None, y, self.weight)

    def apply(self, x: Tensor) -> Tensor:
        """T x = H (s * x) for any (N, K) x."""
        return self._reflect(None, x, self.weight * self.row_scale, pre=self.row_scale)

    def inverse(self, y: Tensor) -> Tensor:
        """T^-1 y = (1 / s) * (H y) for any (N, K) y."""
        return self._reflect(None, y, self.weight, post=self.row_scale)

    def inverse_(self, y: Tensor) -> Tensor:
        """inverse(y), computed in y's own storage (for a y nothing else reads)."""
        return self._reflect(y, y, self.weight, post=self.row_scale)


def _householder_maxabs(n: Tensor) -> Tensor:
    """max |(H_n)_kl|: entries are 1/sqrt(n) (first row/column), 1 - a on the rest of the
    diagonal and -a off it, with a = 1 / (n - sqrt(n)) (n >= 2; 1 for n <= 1)."""
    rs = torch.rsqrt(n.clamp(min=1))
    a = torch.where(n >= 2, 1.0 / (n - torch.sqrt(n)).clamp(min=1e-12), torch.zeros_like(n))
    m = torch.maximum(rs, (1.0 - a).abs())
    m = torch.maximum(m, torch.where(n >= 3, a, torch.zeros_like(a)))
    return torch.where(n >= 2, m, torch.ones_like(n))


def block_householder_transform(ranges: Tensor) -> BlockHouseholderTransform:
    """Groups and scales of BHQ from the row ranges, vectorised (spec/fqt.md, BHQ pseudo-code).

    The spec's stopping loop is evaluated for every candidate Z at once (cumsum) and the first
    Z that stops is taken (argmax); small rows find their leader by searchsorted over the
    rounded cumulative shares. Everything stays on the device with fixed shapes.
    """
    n_rows = ranges.shape[0]
    dev = ranges.device
    lam, perm = torch.sort(ranges.double(), descending=True, stable=True)
    pos = torch.arange(n_rows, device=dev)
    prefix = torch.cumsum(lam, 0)  # prefix[m] = lam[0] + ... + lam[m]
    # after Z steps of the loop S = prefix[N-Z-1]; stop when Z lam[N-Z-1] > S or Z = N-1
    z = pos + 1
    last = (n_rows - z - 1).clamp(min=0)
    stop = (z * lam[last] > prefix[last]) | (z >= n_rows - 1)
    # first stopping Z (argmax returns the first maximum); 0-d tensors, never read on the host
    n_small = torch.clamp(torch.argmax(stop.to(torch.int32)) + 1, max=n_rows - 1)
    n_lead = n_rows - n_small
    total = prefix.index_select(0, (n_lead - 1).view(1)).squeeze(0)
    lead_mask = pos < n_lead
    share = torch.where(lead_mask, n_small * lam / torch.where(total > 0, total, torch.ones_like(total)), 0.0)
    cut = torch.round(torch.cumsum(share, 0))
    cut = torch.where(pos >= n_lead - 1, n_small.double(), cut)  # c[G-1] = Z; sentinels after
    small_group = torch.searchsorted(cut, (pos - n_lead).double(), right=True)
    group_sorted = torch.where(lead_mask, pos, small_group)

    group = torch.empty_like(perm).scatter_(0, perm, group_sorted)
    is_leader = torch.empty_like(lead_mask).scatter_(0, perm, lead_mask)
    sizes = torch.zeros(n_rows, dtype=torch.int64, device=dev).index_add_(0, group, torch.ones_like(group))

    n = sizes.double()
    rs = torch.rsqrt(n.clamp(min=1))
    prev_cut = torch.cat([torch.zeros(1, dtype=cut.dtype, device=dev), cut[:-1]])
    first_small = lam[(n_lead + prev_cut.long()).clamp(max=n_rows - 1)]  # largest small row of group g
    multi = n >= 2
    w1 = lam * rs  # lam[g] is the range of the leader of group g
    w2 = first_small * _householder_maxabs(n)
    s1 = torch.where(multi & (w1 > 0), w1.clamp(min=1e-300).pow(-1.0 / 3.0), torch.ones_like(w1))
    s2 = torch.where(
        multi & (w2 > 0), (w2 / (n - 1).clamp(min=1)).clamp(min=1e-300).pow(-1.0 / 3.0), torch.ones_like(w2)
    )
    inv_den = torch.where(multi, 1.0 / (1.0 - rs).clamp(min=1e-12), torch.zeros_like(rs))

    row_scale = torch.where(is_leader, s1[group], s2[group])
    coef = rs[group] - is_leader.double()
    weight = coef * inv_den[group]
    col = (n_rows, 1)
    return BlockHouseholderTransform(
        group=group,
        is_leader=is_leader,
        leader=perm,
        sizes=sizes,
        num_groups=n_lead,
        row_scale=row_scale.float().view(col),
        coef=coef.float().view(col),
        weight=weight.float().view(col),
    )


@dataclass(frozen=True)
class GradCodes:
    """Integer SR codes of T X with their grid; dequantize() = T^-1 ((codes - zero) * scale)."""

    codes: Tensor  # (N, D) in 0..B, uint8 (bits <= 8) or int32
    scale: Tensor  # float32, broadcastable against codes
    zero: Tensor  # float32 integer values, broadcastable against codes
    bits: int
    dtype: torch.dtype  # dtype of the quantized input (and of dequantize())
    transform: BlockHouseholderTransform | None = None

    def grid_values(self) -> Tensor:
        """(codes - zero) * scale in float32: the quantized T X, before T^-1."""
        return (self.codes.float() - self.zero) * self.scale

    def dequantize(self) -> Tensor:
        v = self.grid_values()
        if self.transform is not None:
            v = self.transform.inverse_(v)
        return v.to(self.dtype)


class _SRGradientQuantizer:
    """Common part: a grid per row/column/tensor, SR codes, and what the last call used."""

    name = "base"

    def __init__(self, bits: int, *, compile: bool = False):
        self.bits = bits
        self.compile = bool(compile)  # fuse the SR pass with torch.compile; eager if that fails
        self._last: dict = {}

    @property
    def bits(self) -> int:
        return self._bits

    @bits.setter
    def bits(self, value: int) -> None:
        self._bits = check_bits(value, f"{type(self).__name__}: bits", "gradient")

    def _grid(self, x: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def _prepare(self, x: Tensor):
        """(matrix to quantize, its grid, transform or None)."""
        xf = _as_matrix(type(self).__name__, x)
        if xf.numel() == 0:
            return xf, torch.ones(1, 1, device=xf.device), torch.zeros(1, 1, device=xf.device), None
        scale, zero = self._grid(xf)
        return xf, scale, zero, None

    def _record(self, x: Tensor, transform) -> None:
        self._last = {
            "bits": self.bits,
            "shape": tuple(x.shape),
            "transform": transform,
            "compiled": self.compile,
        }

    def _sr(self, y: Tensor, scale: Tensor, zero: Tensor, seed: int, dequant: bool) -> Tensor:
        if self.compile:
            try:
                return sr_quantize_compiled(y, scale, zero, self.bits, seed, dequant)
            except Exception as err:  # noqa: BLE001 (no compiler, unsupported device: stay correct, eager)
                warnings.warn(f"{type(self).__name__}: torch.compile failed ({err!r:.200}); running eager")
                self.compile = False
        return sr_quantize(y, scale, zero, self.bits, seed, dequant)

    def quantize(self, x: Tensor, seed: int) -> GradCodes:
        """SR codes of T x on a covering grid, noise from uniform_noise(x.shape, seed)."""
        y, scale, zero, transform = self._prepare(x)
        codes = self._sr(y, scale, zero, seed, dequant=False).to(code_dtype(self.bits))
        self._record(x, transform)
        return GradCodes(codes, scale, zero, self.bits, x.dtype, transform)

    def _dequantized(self, y: Tensor, scale: Tensor, zero: Tensor, transform, seed: int) -> Tensor:
        """T^-1 ((SR codes of y - zero) * scale)."""
        v = self._sr(y, scale, zero, seed, dequant=True)
        return v if transform is None else transform.inverse_(v)  # v is this call's own buffer

    def __call__(self, x: Tensor, seed: int) -> Tensor:
        """quantize(x, seed).dequantize(), fused (same values)."""
        y, scale, zero, transform = self._prepare(x)
        v = self._dequantized(y, scale, zero, transform, seed)
        self._record(x, transform)
        return v.to(x.dtype)

    def info(self) -> dict:
        """What the last call used: name, bits, shape (+ groups for BHQ). Syncs with the device."""
        out = {
            "name": self.name,
            "bits": self._last.get("bits", self.bits),
            "shape": self._last.get("shape"),
            "compiled": self._last.get("compiled", self.compile),
        }
        t = self._last.get("transform")
        if t is not None:
            out["groups"] = int(t.num_groups)
            out["max_group_size"] = int(t.sizes.max())
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}(bits={self.bits}, compile={self.compile})"


class PerTensor(_SRGradientQuantizer):
    """PTQ: one range for the whole tensor. Var <= N D step^2 / 4."""

    name = "per_tensor"

    def _grid(self, x):
        return covering_grid(x, self.bits)


class PerSample(_SRGradientQuantizer):
    """PSQ: one range per row (sample). Var <= D sum_i step_i^2 / 4 <= PTQ's bound."""

    name = "per_sample"

    def _grid(self, x):
        return covering_grid(x, self.bits, keep_dim=0)


class PerColumn(_SRGradientQuantizer):
    """Q_bw for the dW GEMM: one range per column (over the batch); the per-column scales
    commute with the reduction over the batch in dW = Q(dY)^T X."""

    name = "per_column"

    def _grid(self, x):
        return covering_grid(x, self.bits, keep_dim=1)


class BlockHouseholder(_SRGradientQuantizer):
    """BHQ: rows grouped by range, T = H_n diag(s1, s2, ..., s2) per group, then PSQ on T X.

    Ranges are zero-inclusive (max(max_j x, 0) - min(min_j x, 0)), the span the grid covers,
    so a zero range means an all-zero row. N = 1 gives exactly PSQ.
    """

    name = "householder"

    def _prepare(self, x: Tensor):
        xf = _as_matrix(type(self).__name__, x)
        if xf.numel() == 0:
            return xf, torch.ones(1, 1, device=xf.device), torch.zeros(1, 1, device=xf.device), None
        lo, hi = xf.amin(dim=1), xf.amax(dim=1)
        check_range(lo, hi)  # before the transform: NaN ranges would give it meaningless groups
        transform = block_householder_transform(hi.clamp(min=0) - lo.clamp(max=0))
        y = transform.apply(xf)
        lo, hi = y.amin(dim=1, keepdim=True), y.amax(dim=1, keepdim=True)
        scale, zero = covering_grid_from_range(lo, hi, self.bits)
        return y, scale, zero, transform

    def _dequantized(self, y: Tensor, scale: Tensor, zero: Tensor, transform, seed: int) -> Tensor:
        """On CPU the SR pass and T^-1 as one C kernel (the eager path's values); else as the base."""
        if transform is not None:
            v = native.sr_inverse(y, scale, zero, self.bits, seed, transform.group, transform.weight,
                                  transform.coef, transform.row_scale)
            if v is not None:
                return v
        return super()._dequantized(y, scale, zero, transform, seed)


GRADIENT_QUANTIZERS: dict[str, type[_SRGradientQuantizer]] = {
    "per_tensor": PerTensor,
    "per_sample": PerSample,
    "householder": BlockHouseholder,
    "per_column": PerColumn,
    "ptq": PerTensor,
    "psq": PerSample,
    "bhq": BlockHouseholder,
}


def make_gradient_quantizer(name: str, bits: int, *, compile: bool = False) -> _SRGradientQuantizer:
    """Build a gradient quantizer by registry name (or alias); compile=True fuses the SR pass."""
    try:
        cls = GRADIENT_QUANTIZERS[name]
    except (KeyError, TypeError):
        valid = ", ".join(GRADIENT_QUANTIZERS)
        raise ValueError(f"unknown gradient quantizer {name!r}: use one of {valid}") from None
    return cls(bits, compile=compile)
