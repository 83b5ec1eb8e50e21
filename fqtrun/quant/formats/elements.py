"""Element codecs: the small floating-point formats a scaled value is rounded to (spec/formats.md).

A FloatElement is sign + `ebits` exponent bits + `mbits` mantissa bits with subnormals, and a
largest finite value `max` (E4M3 and E5M2 as in torch's float8_e4m3fn / float8_e5m2, the FP6 and
FP4 formats of the OCP MX standard). Rounding works on float32 values: the spacing of the grid
at |v| is 2^(max(floor(log2 |v|), emin) - mbits), so v / spacing is an exact power-of-two
scaling and rounding it to an integer lands on the element grid:

    nearest     round half to even (the casts of torch and of the hardware)
    stochastic  floor(v / spacing + u), u ~ U[0, 1): the upper neighbour with probability
                proportional to the distance, E = v (spec/formats.md, "Rounding")
    up          ceil (used for scales that must never fall short)

Values beyond `max` saturate to +-max (before rounding, so SR never steps past it).
`encode` / `decode` map grid values to their bit patterns (sign | exponent | mantissa).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

Tensor = torch.Tensor

ROUNDINGS = ("nearest", "stochastic")


@dataclass(frozen=True)
class FloatElement:
    """sign / ebits / mbits with subnormals; `max` the largest finite magnitude (the format's own rule)."""

    name: str
    ebits: int
    mbits: int
    max: float

    @property
    def bias(self) -> int:
        return (1 << (self.ebits - 1)) - 1

    @property
    def emin(self) -> int:
        """Exponent of the smallest normal value."""
        return 1 - self.bias

    @property
    def emax(self) -> int:
        """Exponent of the largest normal value (the MX floor rule subtracts it)."""
        return math.floor(math.log2(self.max))

    @property
    def bits(self) -> int:
        return 1 + self.ebits + self.mbits

    def spacing(self, a: Tensor) -> Tensor:
        """Grid spacing at the float32 magnitudes a >= 0: 2^(max(exponent of a, emin) - mbits), exact."""
        exp = torch.bitwise_right_shift(a.view(torch.int32), 23) - 127  # unbiased float32 exponent
        exp = exp.clamp(min=self.emin) - self.mbits
        return torch.bitwise_left_shift(exp + 127, 23).view(torch.float32)

    def round(self, v: Tensor, mode: str = "nearest", noise: Tensor | None = None) -> Tensor:
        """v (float32) rounded to the element grid, saturating at +-max; noise in [0, 1) for mode=stochastic."""
        a = v.abs().clamp(max=self.max)
        step = self.spacing(a)
        u = a / step
        if mode == "nearest":
            q = torch.round(u)
        elif mode == "stochastic":  # floor + [u < frac]: both exact in float32 (u + noise would round)
            q = torch.floor(u)
            q = q + (noise < u - q).float()
        elif mode == "up":
            q = torch.ceil(u)
        else:
            raise ValueError(f"rounding={mode!r} is unknown: use nearest or stochastic")
        return torch.copysign(q * step, v)  # <= max: max is a grid value

    def values(self) -> Tensor:
        """Every finite non-negative grid value, ascending (float32)."""
        codes = torch.arange(1 << (self.ebits + self.mbits), dtype=torch.int32)
        v = self.decode(codes)
        return v[v <= self.max]

    def decode(self, codes: Tensor) -> Tensor:
        """float32 values of bit patterns sign | exponent | mantissa (any integer dtype)."""
        c = codes.to(torch.int32)
        mant = (c & ((1 << self.mbits) - 1)).float()
        exp = (c >> self.mbits) & ((1 << self.ebits) - 1)
        normal = exp > 0
        frac = torch.where(normal, 1.0 + mant / (1 << self.mbits), mant / (1 << self.mbits))
        mag = torch.ldexp(frac, torch.where(normal, exp - self.bias, torch.full_like(exp, self.emin)).float())
        sign = (c >> (self.ebits + self.mbits)) & 1
        return torch.where(sign.bool(), -mag, mag)

    def encode(self, v: Tensor) -> Tensor:
        """uint8 bit patterns of grid values v (float32, already rounded); -0 keeps its sign bit."""
        a = v.abs()
        step = self.spacing(a)
        exp = torch.bitwise_right_shift(step.view(torch.int32), 23) - 127 + self.mbits  # max(exponent, emin)
        units = (a / step).to(torch.int32)  # 2^mbits + mantissa for normals, mantissa for subnormals
        normal = units >= (1 << self.mbits)
        field = torch.where(normal, exp + self.bias, torch.zeros_like(exp))
        mant = torch.where(normal, units - (1 << self.mbits), units)
        sign = torch.signbit(v).to(torch.int32) << (self.ebits + self.mbits)
        return (sign | (field << self.mbits) | mant).to(torch.uint8)


E4M3 = FloatElement("e4m3", 4, 3, 448.0)  # torch.float8_e4m3fn: no inf, one NaN pattern per sign
E5M2 = FloatElement("e5m2", 5, 2, 57344.0)  # torch.float8_e5m2: IEEE-like, the top exponent is inf/NaN
E3M2 = FloatElement("e3m2", 3, 2, 28.0)  # OCP MX FP6: no inf/NaN
E2M3 = FloatElement("e2m3", 2, 3, 7.5)
E2M1 = FloatElement("e2m1", 2, 1, 6.0)  # FP4: magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6

ELEMENTS = {e.name: e for e in (E4M3, E5M2, E3M2, E2M3, E2M1)}
