"""The one bit-width check, with one range per kind of quantizer (every setting uses it)."""

from __future__ import annotations

# kind -> (lowest, highest) bits, and why the range ends where it does
RANGES: dict[str, tuple[int, int]] = {
    "forward": (1, 16),   # min-max integer grids, round to nearest: codes exact in float32 GEMMs
    "ridge": (1, 8),      # ridge dequantization (spec/denoise_bn.md A): the paper's range
    "gradient": (2, 16),  # stochastic rounding of signed gradients: a 1-bit grid holding 0 is biased
}


def check_bits(bits: object, setting: str, kind: str = "forward") -> int:
    """`bits` as an int in the kind's range; ValueError with one line naming the setting otherwise."""
    low, high = RANGES[kind]
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise ValueError(f"{setting}={bits!r} must be an integer number of bits ({low}..{high})")
    if not low <= bits <= high:
        why = " (stochastic rounding needs 2 or more)" if kind == "gradient" and bits < low else ""
        raise ValueError(f"{setting}={bits} is out of range: use {low}..{high} bits for {kind} quantizers{why}")
    return bits
