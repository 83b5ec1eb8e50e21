"""The two BN + requantization ops on int64 accumulators (spec/denoise_bn.md B): the integer form
clip((A x + B) >> T, 0, L) and the exact float reference clip(floor(a x + b), 0, L), per channel."""

from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction

import torch

from fqtrun.intbn.derive import threshold_rows


def _check_accumulator(x: torch.Tensor, C: int) -> None:
    if x.dtype != torch.int64 or x.dim() < 2 or x.shape[1] != C:
        raise ValueError(f"expected an int64 accumulator of shape (N, {C}, ...), got {x.dtype} {tuple(x.shape)}")


class IntegerBNRequant(torch.nn.Module):
    """clip((A x + B) >> T, 0, L) per channel on int64 accumulators of shape (N, C, ...)."""

    def __init__(self, A: Sequence[int], B: Sequence[int], T: Sequence[int], L: int):
        super().__init__()
        self.register_buffer("A", torch.as_tensor(A, dtype=torch.int64).reshape(-1))
        self.register_buffer("B", torch.as_tensor(B, dtype=torch.int64).reshape(-1))
        self.register_buffer("T", torch.as_tensor(T, dtype=torch.int64).reshape(-1))
        if not (self.A.numel() == self.B.numel() == self.T.numel()) or (self.T < 0).any():
            raise ValueError("A, B, T must have one entry per channel and T >= 0")
        self.L = int(L)

    def extra_repr(self) -> str:
        return f"channels={self.A.numel()}, L={self.L}, max_shift={int(self.T.max()) if self.T.numel() else 0}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        C = self.A.numel()
        _check_accumulator(x, C)
        bound = int(x.abs().max()) if x.numel() else 0
        if int(self.A.abs().max()) * bound + int(self.B.abs().max()) >= 2**63:
            raise ValueError(f"A x + B overflows int64 for |x| up to {bound}; lower max_shift or the accumulator range")
        shape = (1, C) + (1,) * (x.dim() - 2)
        y = (self.A.view(shape) * x + self.B.view(shape)) >> self.T.view(shape)
        return y.clamp_(0, self.L)


class ExactBNRequant(torch.nn.Module):
    """The float reference clip(floor(a x + b), 0, L) per channel, exact: y = #{j : t_j <= x} (thresholds).

    Vectorised over (N, C, ...) int64 accumulators with one row of L thresholds per channel
    (derive.threshold_rows: a < 0 counts at -x, a == 0 is a constant).
    """

    def __init__(self, a_list: Sequence[Fraction], b_list: Sequence[Fraction], L: int):
        super().__init__()
        rows, signs = threshold_rows(a_list, b_list, L)
        self.register_buffer("t", torch.tensor(rows, dtype=torch.int64).reshape(len(rows), L))
        self.register_buffer("sign", torch.tensor(signs, dtype=torch.int64))
        self.L = int(L)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        C = self.t.shape[0]
        _check_accumulator(x, C)
        shape = (1, C) + (1,) * (x.dim() - 2)
        xc = (x * self.sign.view(shape)).movedim(1, 0).reshape(C, -1).contiguous()  # (C, M)
        y = torch.searchsorted(self.t, xc, right=True)  # per channel: thresholds <= x
        return y.reshape(x.movedim(1, 0).shape).movedim(0, 1)
