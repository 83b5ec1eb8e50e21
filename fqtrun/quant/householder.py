"""BHQ's transform T (spec/fqt.md, BHQ): groups of rows by range, T = H_n diag(s1, s2, ..., s2) per group.

block_householder_transform builds it from the row ranges (the C set-up, quant/native/bhq.py, where it
runs; the vectorised torch form otherwise, the same formulas); BlockHouseholderTransform applies T,
T^-1 and H as rank-1 updates per group (a segment sum and a gather, O(N D), no N x N matrix).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from fqtrun.quant.native import bhq as native_bhq

Tensor = torch.Tensor


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
        """(pre * y - coef * (per group, sum over its rows of w * y)) * (1 / post), into out (None: new).

        H y is w = weight (pre, post absent). On CPU one C kernel (quant/native/bhq.py); elsewhere, or
        without a compiler, the same operations in torch: two (N, K) temporaries (the weighted rows,
        reused for the gathered sums, and the segment sums).
        """
        if out is None:
            out = torch.empty_like(y)
        if native_bhq.reflect(out, y, self, w, pre, post) is not None:
            return out
        t = y * w
        seg = torch.zeros_like(t).index_add_(0, self.group, t)
        torch.index_select(seg, 0, self.group, out=t)
        if pre is not None:
            torch.mul(y, pre, out=out)
        elif out is not y:
            out.copy_(y)
        out.addcmul_(t, self.coef, value=-1.0)
        return out if post is None else out.mul_(torch.reciprocal(post))  # a multiply: cheaper than a divide

    def without_constant_groups(self, ranges: Tensor) -> BlockHouseholderTransform:
        """This T with the identity on groups whose rows all have zero range (the leader's range is the
        group's largest): constant rows are exact on their min-max grids, so mixing them gains nothing and
        only adds rounding (and, near float32's limit, overflow)."""
        constant = (ranges.view(-1)[self.leader[self.group]] == 0).view_as(self.coef)
        if not bool(constant.any()):
            return self
        zero = torch.zeros_like(self.coef)
        scale = torch.where(constant, torch.ones_like(self.row_scale), self.row_scale)
        return dataclasses.replace(self, row_scale=scale, coef=torch.where(constant, zero, self.coef),
                                   weight=torch.where(constant, zero, self.weight))

    def with_headroom(self, row_max: Tensor, spare_bits: int = 8) -> BlockHouseholderTransform:
        """This T with each group's scales times a power of two 2^-k_g that keeps the group's scaled rows
        and its group sums (at most (sqrt(n) + 2) times its largest scaled entry) below float32's limit by
        `spare_bits`; k_g = 0 where they already are. row_max: (N,) largest |x| of each row. T^-1 scales
        back by the same power, so quantizing on min-max row grids gives the codes of exact arithmetic."""
        scaled = self.row_scale.view(-1).double() * row_max.double()
        if float(scaled.max()) * (float(self.sizes.max()) ** 0.5 + 3.0) < 2.0 ** (127 - spare_bits):
            return self  # the whole-tensor bound already holds: every k_g is 0 (the usual case, no group pass)
        need = scaled * (self.sizes.double().sqrt() + 3.0)[self.group]
        top = torch.zeros_like(need).scatter_reduce_(0, self.group, need, reduce="amax")
        k = (torch.frexp(top).exponent - (127 - spare_bits)).clamp(min=0)
        scale = torch.ldexp(self.row_scale.view(-1).double(), -k[self.group].double()).float()
        return dataclasses.replace(self, row_scale=scale.view_as(self.row_scale))

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
    """Groups and scales of BHQ from the (N,) row ranges (spec/fqt.md, BHQ pseudo-code): the C set-up for
    float32 CPU ranges where it runs, else householder_transform_torch (the same values)."""
    fields = native_bhq.setup(ranges)
    return householder_transform_torch(ranges) if fields is None else BlockHouseholderTransform(**fields)


def householder_transform_torch(ranges: Tensor) -> BlockHouseholderTransform:
    """block_householder_transform vectorised in torch.

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
