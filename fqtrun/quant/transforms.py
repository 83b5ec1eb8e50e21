"""Orthogonal transforms applied along a GEMM's reduction dimension before quantizing (spec/formats.md, RHT).

The random Hadamard transform with block g acts on the vectors of x along `dim`, block by block:

    forward(x, dim, key) = x R,   inverse(y, dim, key) = y R^T,   R = H_g diag(sigma) / sqrt(g)

(H_g the Sylvester-Hadamard matrix, sigma random signs, one per position along dim.) R R^T = I,
so a GEMM reducing over k gives the same product when both operands are transformed along k with
the same key: (A R)(R^T B) = A B, R^T B being forward(B, 0, key) for B's rows along k. A length
that is not a multiple of g is zero-padded (the padded product is unchanged), so forward returns
dim rounded up to a multiple of g and inverse takes that length back. A fast Walsh-Hadamard
transform, O(log g) per element, never a dense matrix (in C, fused with the quantization that
follows, quant/formats/kernel.py). The signs are grid.uniform_noise of the key:
a pure function of (seed, step, draw, layer, GEMM) for fresh signs, or without step and draw for
fixed ones, so a resumed run replays them. BHQ (quant/gradient.py) is the data-dependent relative
that transforms rows instead (it is applied inside its own gradient quantizer).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fqtrun.quant import ops
from fqtrun.quant.grid import uniform_noise

Tensor = torch.Tensor

RHT_BLOCKS = (16, 32, 64, 128)
SIGNS = ("step", "fixed")  # fresh signs every step (and draw), or one set per layer and GEMM


def fwht(xb: Tensor) -> Tensor:
    """Unnormalised fast Walsh-Hadamard transform of xb (A, n, g, B) along axis 2: x H_g, butterflies
    (u + v, u - v) for h = 1, 2, ..., g/2 (quant/formats/kernel.py runs the same operations)."""
    a, n, g, b = xb.shape
    h = 1
    while h < g:
        v = xb.reshape(a, n, g // (2 * h), 2, h, b)
        u, w = v[:, :, :, 0], v[:, :, :, 1]
        xb = torch.stack((u + w, u - w), dim=3).reshape(a, n, g, b)
        h *= 2
    return xb


@dataclass(frozen=True)
class RandomHadamard:
    """R = H_g diag(sigma) / sqrt(g) blockwise along a dimension; `signs` step | fixed (see the module)."""

    block: int = 16
    signs: str = "step"
    name = "rht"

    def __post_init__(self):
        if self.block not in RHT_BLOCKS:
            raise ValueError(f"quant.rht_block={self.block} is not supported: use one of "
                             f"{', '.join(map(str, RHT_BLOCKS))} (a power of two)")
        if self.signs not in SIGNS:
            raise ValueError(f"quant.rht_signs={self.signs!r} is unknown: use step (fresh every step) or fixed")

    @property
    def fresh(self) -> bool:
        return self.signs == "step"

    def padded(self, n: int) -> int:
        """The length dim takes after the transform (n rounded up to a multiple of the block)."""
        return -(-n // self.block) * self.block

    def sign_vector(self, n: int, key: int, device) -> Tensor:
        """The +-1 signs sigma of positions 0..n-1 along the transformed dim."""
        return torch.where(uniform_noise(n, key, device) < 0.5, -1.0, 1.0)

    def _blocks(self, x: Tensor, dim: int) -> tuple[Tensor, tuple[int, int, int]]:
        """x as (A, L'/g, g, B), zero-padded along dim to L' (a multiple of g)."""
        d = dim % x.dim()
        a, length, b = math.prod(x.shape[:d]), x.shape[d], math.prod(x.shape[d + 1:])
        x3 = x.reshape(a, length, b)
        n = self.padded(length)
        if n != length:
            x3 = F.pad(x3, (0, 0, 0, n - length))
        return x3.view(a, n // self.block, self.block, b), (a, n, b)

    @property
    def rsqrt(self) -> float:
        """1 / sqrt(g) as the float32 factor both the torch and the C forms multiply by."""
        return float(torch.tensor(1.0 / math.sqrt(self.block), dtype=torch.float32))

    def _apply(self, x: Tensor, dim: int, key: int, inverse: bool) -> Tensor:
        xb, (a, n, b) = self._blocks(x.float(), dim)
        sigma = self.sign_vector(n, key, x.device).view(1, n // self.block, self.block, 1)
        if inverse:  # y R^T = ((y * sigma) H) / sqrt(g)
            out = fwht(xb * sigma) * self.rsqrt
        else:  # x R = ((x H) / sqrt(g)) * sigma
            out = (fwht(xb) * self.rsqrt) * sigma
        d = dim % x.dim()
        return out.reshape(*x.shape[:d], n, *x.shape[d + 1:]).to(x.dtype)

    def forward(self, x: Tensor, dim: int, key: int | Tensor) -> Tensor:
        """x R along dim (dim padded to a multiple of the block); the op fqtrun::rht while torch traces."""
        if ops.tracing():
            return ops.rht(x, dim, self.block, self.signs, ops.as_seed(key), False)
        return self._apply(x, dim, ops.seed_value(key), inverse=False)

    def inverse(self, y: Tensor, dim: int, key: int | Tensor) -> Tensor:
        """y R^T along dim; y's dim is the padded length forward returned (slice it back yourself)."""
        if ops.tracing():
            return ops.rht(y, dim, self.block, self.signs, ops.as_seed(key), True)
        return self._apply(y, dim, ops.seed_value(key), inverse=True)


def _rht_op(x: Tensor, dim: int, block: int, signs: str, key: Tensor, inverse: bool) -> Tensor:
    """fqtrun::rht's implementation (quant/ops.py): RandomHadamard.forward / inverse run eager."""
    t = RandomHadamard(block, signs)
    return t._apply(x, dim, ops.seed_value(key), inverse)


ops.implement(ops.rht, _rht_op)

TRANSFORMS = {"rht": RandomHadamard}


def make_transform(name: str | None, block: int = 16, signs: str = "step",
                   setting: str = "quant.grad_transform") -> RandomHadamard | None:
    """A transform by name (None / "none": no transform); one-line ValueError otherwise."""
    if name is None or name == "none":
        return None
    if name not in TRANSFORMS:
        raise ValueError(f"{setting}={name!r} is unknown: use rht (random Hadamard) or none")
    return TRANSFORMS[name](block, signs)
