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
and the outlier measures of the operand (quant/outliers.py; each left out where it is undefined or not
taken): crest (max|x| / RMS), kurtosis (Pearson's, Gaussian 3), crest_block (the mean max / RMS of the
format's scale blocks; format slots with blocks or rows). Where a transform runs before the quantizer
(RHT on a gradient slot), x is the transformed operand (so sat, flush and SQNR are of what the quantizer
met), the outlier measures are of the operand before it, and crest_rht, kurtosis_rht, crest_block_rht
of x: whether the transform had anything to fix.
`measure` returns raw sums and figures as one small tensor; `stats` turns them into the numbers above.
`named_slot` is how a backend quantizes a slot: a quantizer's NonFiniteError comes out naming the
layer and the slot.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from fqtrun.quant.numerics import NonFiniteError
from fqtrun.quant.outliers import NAMES, measures, scale_blocks

Tensor = torch.Tensor
SLOT_WHAT = {"w": "weights", "a": "input", "dx": "output gradient", "dw": "output gradient"}

STATS = ("bits", "sat", "flush", "sqnr_db", "nonfinite")  # every measured slot has these
OUTLIERS = (*NAMES, *(f"{n}_rht" for n in NAMES))  # where taken and defined
_SUMS = ("elements", "nonzero", "flushed", "saturated", "nonfinite", "signal", "noise")


def measure(x: Tensor, x_hat: Tensor | None, q=None, source: Tensor | None = None) -> Tensor:
    """(13,) float64: sums over x (elements, nonzero finite, flushed, saturated, non-finite, signal,
    noise), then the OUTLIERS figures (nan where not taken).

    x_hat None: only the counts of x (its quantizer refused it); q: the slot's quantizer, asked for
    `saturated(x)` when it has one; source: the operand before the transform when x = source R.
    """
    out = _sums(x, x_hat, q)
    with torch.no_grad():
        figures = torch.full((len(OUTLIERS),), math.nan, dtype=torch.float64, device=x.device)
        if x_hat is not None:
            before = x if source is None else source
            figures[:len(NAMES)] = measures(before, scale_blocks(q, tuple(before.shape)))
            if source is not None:
                figures[len(NAMES):] = measures(x, scale_blocks(q, tuple(x.shape)))
        return torch.cat([out, figures])


def _sums(x: Tensor, x_hat: Tensor | None, q) -> Tensor:
    """The (7,) sums of `measure`."""
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
    """The health numbers of one slot from `measure`'s sums: STATS, then the OUTLIERS it took."""
    values = sums.tolist()
    n, nonzero, flushed, saturated, nonfinite, signal, noise = values[:len(_SUMS)]
    figures = {k: v for k, v in zip(OUTLIERS, values[len(_SUMS):]) if not math.isnan(v)}
    if math.isnan(noise) or (noise == 0 and signal == 0):
        sqnr = math.nan  # refused (non-finite input), or nothing to measure (all zero)
    else:
        sqnr = math.inf if noise == 0 else 10 * math.log10(signal / noise) if signal > 0 else -math.inf
    flush = flushed / nonzero if nonzero else 0.0 * flushed  # nan stays nan
    return {"bits": bits, "sat": saturated / n if n else math.nan, "flush": flush, "sqnr_db": sqnr,
            "nonfinite": int(nonfinite), **figures}


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
