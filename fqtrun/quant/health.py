"""Numerics health of one quantized tensor: what its slot's quantizer did to it.

For an input x and its quantized (dequantized) value x_hat:
    sat        fraction of the elements clipped by the quantizer (its `saturated(x)`, a bool tensor of
               the elements a grid's end clipped; a quantizer without it counts as clipping nothing, as
               covering SR grids never clip)
    flush      fraction of the nonzero (finite) inputs whose quantized value is exactly 0
    sqnr_db    10 log10(sum x^2 / sum (x - x_hat)^2); inf when x_hat == x, nan when x is all zero
    nonfinite  number of NaN / inf elements of x (the quantizer then raises NonFiniteError and
               x_hat does not exist: the other statistics are nan)
    bits       the bits the slot ran at
`measure` returns raw sums as one small tensor; `stats` turns them into the numbers above.
`named_slot` is how a backend quantizes a slot: a quantizer's NonFiniteError comes out naming the
layer and the slot.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from fqtrun.quant.numerics import NonFiniteError

Tensor = torch.Tensor
SLOT_WHAT = {"w": "weights", "a": "input", "dx": "output gradient", "dw": "output gradient"}

STATS = ("bits", "sat", "flush", "sqnr_db", "nonfinite")
_SUMS = ("elements", "nonzero", "flushed", "saturated", "nonfinite", "signal", "noise")


def measure(x: Tensor, x_hat: Tensor | None, q=None) -> Tensor:
    """(7,) float64 sums over x: elements, nonzero finite, flushed, saturated, non-finite, signal, noise.

    x_hat None: only the counts of x (its quantizer refused it); q: the slot's quantizer, asked for
    `saturated(x)` when it has one.
    """
    with torch.no_grad():
        x = x.detach().float()
        n = x.numel()
        out = torch.full((len(_SUMS),), math.nan, dtype=torch.float64, device=x.device)
        out[0] = n
        if x_hat is None:
            finite = torch.isfinite(x)
            out[1] = (finite & (x != 0)).sum()
            out[4] = n - finite.sum()
            return out
        x_hat = x_hat.detach().float().reshape(x.shape)
        nonzero = x != 0
        out[1] = nonzero.sum()
        out[2] = (nonzero & (x_hat == 0)).sum()
        saturated = getattr(q, "saturated", None)
        out[3] = saturated(x).sum() if saturated is not None else 0
        out[5] = torch.linalg.vector_norm(x).double().square()
        out[6] = torch.linalg.vector_norm(x - x_hat).double().square()
        # a quantizer that produced x_hat found x's range finite; the count is for one that does not check
        out[4] = 0 if torch.isfinite(out[5]) else n - torch.isfinite(x).sum()
        return out


@contextmanager
def named_slot(layer, record, slot: str, x: Tensor) -> Iterator[None]:
    """Quantize x for `slot` of `layer` inside: a NonFiniteError leaves naming the layer (its qualified
    name, set by convert) and the slot; on a probe step the record keeps x's non-finite count."""
    try:
        yield
    except NonFiniteError as err:
        if record.probe:
            record.health[slot] = measure(x, None)
        raise NonFiniteError(SLOT_WHAT[slot], getattr(layer, "name", None), slot, err.intermediate) from None


def stats(sums: Tensor, bits: int | None) -> dict[str, float]:
    """The health numbers (STATS) of one slot from `measure`'s sums."""
    n, nonzero, flushed, saturated, nonfinite, signal, noise = sums.tolist()
    if math.isnan(noise) or (noise == 0 and signal == 0):
        sqnr = math.nan  # refused (non-finite input), or nothing to measure (all zero)
    else:
        sqnr = math.inf if noise == 0 else 10 * math.log10(signal / noise) if signal > 0 else -math.inf
    flush = flushed / nonzero if nonzero else 0.0 * flushed  # nan stays nan
    return {"bits": bits, "sat": saturated / n if n else math.nan, "flush": flush, "sqnr_db": sqnr,
            "nonfinite": int(nonfinite)}


def severity(row: dict) -> tuple:
    """Sort key, worst first: the most non-finite values, then the lowest SQNR, then the most flushed
    and saturated (nan counts as harmless)."""

    def num(v: float, harmless: float) -> float:
        return harmless if v is None or math.isnan(v) else v

    return (-row["nonfinite"], num(row["sqnr_db"], math.inf), -num(row["flush"], 0.0), -num(row["sat"], 0.0))


def describe(row: dict) -> str:
    """A row in words: "head/dw at 4 bits: SQNR 10.5 dB, 52.6% flushed, 0.0% saturated"."""
    bad = f", {row['nonfinite']} non-finite" if row["nonfinite"] else ""
    return (f"{row['layer']}/{row['slot']} at {row['bits']} bits: SQNR {row['sqnr_db']:.1f} dB, "
            f"{100 * row['flush']:.1f}% flushed, {100 * row['sat']:.1f}% saturated{bad}")
