"""Stochastic-rounding gradient quantizers of fully quantized training (spec/fqt.md).

X is the output gradient dY viewed as (N, D), one row per sample. Every quantizer is
Q(X) = T^-1 dequant(SR(T X)) with an invertible N x N transform T (identity except BHQ),
so E[Q(X)] = X. Plain objects, no trainer needed:

    q = make_gradient_quantizer("bhq", bits=4)
    x_hat = q(x, seed)                 # dequantized, same shape and dtype
    gc = q.quantize(x, seed)           # integer codes + scale/zero (+ BHQ transform)
    gc.dequantize()                    # == q(x, seed)

Grids (grid.py): PTQ and per-column use zero-aligned grids (exact zeros stay exact); PSQ and BHQ
use the plain min-max ("span") grid of each row, as the spec's exact-variance formula and the paper
do; PSQ(grid="zero_aligned") keeps the zero-aligned grid for users who need exact zeros.
An integer backend feeds gc.codes (minus gc.zero) to an integer GEMM, applies gc.scale to the
result, adds gc.lo times the other operand's column sums (a rank-1 term, span grids only), and for
BHQ applies gc.transform.inverse to the (N, K) product (T^-1 acts on rows only, so it commutes with
any right-multiplication).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass

import torch

from fqtrun.quant import ops
from fqtrun.quant.bits import check_bits
from fqtrun.quant.grid import (
    covering_grid_from_range,
    span_grid_from_range,
    sr_quantize,
    sr_quantize_compiled,
    value_range,
)
from fqtrun.quant.householder import BlockHouseholderTransform, block_householder_transform
from fqtrun.quant.native import bhq as native_bhq
from fqtrun.quant.native import sr as native_sr
from fqtrun.quant.native.sr import SRJob, SRResult
from fqtrun.quant.numerics import NonFiniteError, check_range

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


GRAD_GRIDS = ("minmax", "zero_aligned")  # PSQ's grid option (quant.grad_grid)

Grid = tuple[Tensor, Tensor, "Tensor | None"]  # (scale, zero, lo) as grid.sr_quantize takes them


@dataclass(frozen=True)
class GradCodes:
    """Integer SR codes of T X with their grid; dequantize() = T^-1 ((codes - zero) * scale + lo)."""

    codes: Tensor  # (N, D) in 0..B, uint8 (bits <= 8) or int32
    scale: Tensor  # float32, broadcastable against codes
    zero: Tensor  # float32 integer values, broadcastable against codes (0 on span grids)
    bits: int
    dtype: torch.dtype  # dtype of the quantized input (and of dequantize())
    transform: BlockHouseholderTransform | None = None
    lo: Tensor | None = None  # float32 value of code 0 on span grids (None: zero-aligned, value 0 at zero)
    rowsum: Tensor | None = None  # (N, 1) int32 sums of codes - 128 over each row, where the C kernel made them
    colsum: Tensor | None = None  # (1, D) over each column (the int8 GEMMs' zero-point corrections)

    def grid_values(self) -> Tensor:
        """(codes - zero) * scale + lo in float32: the quantized T X, before T^-1."""
        v = (self.codes.float() - self.zero) * self.scale
        return v if self.lo is None else v.add_(self.lo)

    def dequantize(self) -> Tensor:
        v = self.grid_values()
        if self.transform is not None:
            v = self.transform.inverse_(v)
        return saturate_(v).to(self.dtype)


class SRGradientQuantizer:
    """Common part: a grid from the ranges along keep_dim, SR codes, and what the last call used.

    Where the C kernels run (float32 CPU tensors, quant/native/) a call is a range pass and one SR pass
    (PSQ: a single pass); elsewhere the torch form: torch.compile'd SR with compile=True, else eager.
    Both give the same codes (tests/quant/test_native.py).
    """

    name = "base"
    keep_dim: int | None = None  # ranges the grid is built from: None the whole tensor, 0 each row, 1 each column

    def __init__(self, bits: int, *, compile: bool = False):
        self.bits = bits
        self.compile = bool(compile)  # fuse the torch form's SR pass with torch.compile; eager if that fails
        self._last: dict = {}

    @property
    def bits(self) -> int:
        return self._bits

    @bits.setter
    def bits(self, value: int) -> None:
        self._bits = check_bits(value, f"{type(self).__name__}: bits", "gradient")

    def _grid_from_range(self, lo: Tensor, hi: Tensor) -> Grid:
        """The grid of ranges (lo, hi) taken along keep_dim ((1, 1), (N, 1) or (1, D))."""
        raise NotImplementedError

    def _sr_job(self, ranges: dict, seed: int) -> SRJob:
        """The C SR pass's target for this quantizer, its grid built from `ranges` (keep_dim -> (lo, hi))."""
        return SRJob(_KINDS[self.keep_dim], self.bits, seed, self._grid_from_range(*ranges[self.keep_dim]), codes=True)

    def _native(self, xf: Tensor, seed: int, codes: bool) -> tuple[SRResult, BlockHouseholderTransform | None] | None:
        """(what the C SR pass wrote, transform) for codes or dequantized values; None where it cannot run."""
        if codes and self.bits > 8:
            return None
        ranges = _ranges(xf, {self.keep_dim})
        if ranges is None:
            return None
        job = self._sr_job(ranges, seed)
        job.codes = codes
        res = native_sr.sr_pass(xf, [job])
        return None if res is None else (res[0], None)

    def _prepare(self, x: Tensor) -> tuple[Tensor, Grid, BlockHouseholderTransform | None]:
        """The torch form's (matrix to quantize, its grid, transform or None)."""
        xf = _as_matrix(type(self).__name__, x)
        if xf.numel() == 0:
            return xf, (torch.ones(1, 1, device=xf.device), torch.zeros(1, 1, device=xf.device), None), None
        return xf, self._grid_from_range(*value_range(xf, self.keep_dim)), None

    def _record(self, x: Tensor, transform) -> None:
        self._last = {
            "bits": self.bits,
            "shape": tuple(x.shape),
            "transform": transform,
            "compiled": self.compile,
        }

    def _sr(self, y: Tensor, grid: Grid, seed: int, dequant: bool) -> Tensor:
        scale, zero, lo = grid
        if self.compile:
            try:
                return sr_quantize_compiled(y, scale, zero, self.bits, seed, dequant, lo)
            except Exception as err:  # noqa: BLE001 (no compiler, unsupported device: stay correct, eager)
                warnings.warn(f"{type(self).__name__}: torch.compile failed ({err!r:.200}); running eager")
                self.compile = False
        return sr_quantize(y, scale, zero, self.bits, seed, dequant, lo)

    def _codes(self, x: Tensor, res: SRResult, transform) -> GradCodes:
        self._record(x, transform)
        return GradCodes(res.out, res.scale, res.zero, self.bits, x.dtype, transform, res.lo, res.rowsum, res.colsum)

    def quantize(self, x: Tensor, seed: int) -> GradCodes:
        """SR codes of T x on the quantizer's grid, noise from uniform_noise(x.shape, seed).

        A finite x whose intermediates overflow float32 (ranges or BHQ's group sums near 3.4e38) is
        quantized as 2^-k x with its grid scaled back by 2^k (overflow_retry): the same codes the exact
        arithmetic gives, since a power of two leaves every min-max grid's relative position unchanged."""
        try:
            return self._quantize(x, seed)
        except NonFiniteError:
            k = overflow_shift(x, self.name)
            gc = self._quantize(torch.ldexp(x.detach().float(), torch.tensor(-float(k))), seed)
            unit = 2.0 ** k
            return dataclasses.replace(gc, scale=gc.scale * unit, lo=None if gc.lo is None else gc.lo * unit,
                                       dtype=x.dtype)

    def __call__(self, x: Tensor, seed: int | Tensor) -> Tensor:
        """quantize(x, seed).dequantize(), fused (same values; the same overflow retry). While torch traces,
        the op fqtrun::sr_fake (quant/ops.py), whose seed may be a 0-d int64 tensor."""
        if ops.tracing():
            return ops.sr_fake(x.detach(), self.name, self.bits, getattr(self, "grid", ""), self.compile,
                               ops.as_seed(seed))
        seed = ops.seed_value(seed)
        try:
            return self._fake(x, seed)
        except NonFiniteError:
            k = overflow_shift(x, self.name)
            v = self._fake(torch.ldexp(x.detach().float(), torch.tensor(-float(k))), seed)
            return saturate_(torch.ldexp(v.float(), torch.tensor(float(k)))).to(x.dtype)

    def _quantize(self, x: Tensor, seed: int) -> GradCodes:
        fast = self._native(_as_matrix(type(self).__name__, x), seed, codes=True)
        if fast is not None:
            return self._codes(x, *fast)
        y, grid, transform = self._prepare(x)
        codes = self._sr(y, grid, seed, dequant=False).to(code_dtype(self.bits))
        self._record(x, transform)
        scale, zero, lo = grid
        return GradCodes(codes, scale, zero, self.bits, x.dtype, transform, lo)

    def _fake(self, x: Tensor, seed: int) -> Tensor:
        fast = self._native(_as_matrix(type(self).__name__, x), seed, codes=False)
        if fast is not None:
            self._record(x, fast[1])
            return fast[0].out.to(x.dtype)
        y, grid, transform = self._prepare(x)
        v = self._sr(y, grid, seed, dequant=True)
        v = v if transform is None else saturate_(transform.inverse_(v))  # v is this call's own buffer
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


_KINDS = {None: "tensor", 0: "rows", 1: "cols"}  # keep_dim -> the C SR pass's grid kind


def _ranges(xf: Tensor, keep_dims: set) -> dict | None:
    """keep_dim -> (min, max) along it, for every keep_dim asked, from one C range pass (the whole tensor's
    from the rows'); None where the kernel cannot run."""
    got = native_sr.ranges(xf, rows=bool(keep_dims & {0, None}), cols=1 in keep_dims)
    if got is None:
        return None
    rows, cols = got
    out = {0: rows, 1: cols}
    if None in keep_dims:
        out[None] = (rows[0].amin().view(1, 1), rows[1].amax().view(1, 1))
    return out


def _pair_pass(qs: tuple[SRGradientQuantizer, SRGradientQuantizer], x: Tensor, seeds: tuple[int, int],
               codes: bool) -> list[SRResult] | None:
    """Both quantizers' SR results (codes or values) from one range pass and one SR pass over x; None where the
    C kernels cannot run, a quantizer transforms x, or a range or grid is not finite (then the separate calls
    say whether x or an intermediate was non-finite, or retry on 2^-k x)."""
    if any(isinstance(q, BlockHouseholder) or (codes and q.bits > 8) for q in qs):
        return None
    xf = _as_matrix("quantize_pair", x)
    in_pass = [isinstance(q, PerSample) and q.grid == "minmax" for q in qs]  # PSQ: each row's grid in the SR pass
    try:
        ranges = _ranges(xf, {q.keep_dim for q, own in zip(qs, in_pass) if not own})
        if ranges is None:
            return None
        jobs = [SRJob("row_span", q.bits, s) if own else q._sr_job(ranges, s) for q, s, own in zip(qs, seeds, in_pass)]
        for job in jobs:
            job.codes = codes
        res = native_sr.sr_pass(xf, jobs)
        for q, r, own in zip(qs, res or [], in_pass):
            if own:
                q._check_span(r)
        return res
    except NonFiniteError:
        return None


def quantize_pair(dx_q: SRGradientQuantizer, dw_q: SRGradientQuantizer, x: Tensor, seed_dx: int,
                  seed_dw: int) -> tuple[GradCodes, GradCodes]:
    """(dx_q.quantize(x, seed_dx), dw_q.quantize(x, seed_dw)) with the same codes, from one range pass and one
    SR pass over x where the C kernels run and neither quantizer transforms x (the int8 backend's dX and
    dW codes of one dY); two separate calls otherwise."""
    res = _pair_pass((dx_q, dw_q), x, (seed_dx, seed_dw), codes=True)
    if res is not None:
        return dx_q._codes(x, res[0], None), dw_q._codes(x, res[1], None)
    return dx_q.quantize(x, seed_dx), dw_q.quantize(x, seed_dw)


def fake_pair(dx_q: SRGradientQuantizer, dw_q: SRGradientQuantizer, x: Tensor, seed_dx: int,
              seed_dw: int) -> tuple[Tensor, Tensor] | None:
    """(dx_q(x, seed_dx), dw_q(x, seed_dw)), the same values, from one range pass and one SR pass over x (the
    simulate backend's dX and dW operands of one dY); None where that cannot run (see _pair_pass): then
    call the two quantizers."""
    res = _pair_pass((dx_q, dw_q), x, (seed_dx, seed_dw), codes=False)
    if res is None:
        return None
    for q in (dx_q, dw_q):
        q._record(x, None)
    return res[0].out.to(x.dtype), res[1].out.to(x.dtype)


def saturate_(v: Tensor) -> Tensor:
    """v with +-inf set to float32's largest finite value, in place: a quantized value of a finite input that
    lies past the limit (a top level rounded past it; BHQ's T^-1 of rows near it) saturates, as a cast would."""
    big = torch.finfo(torch.float32).max
    return v.clamp_(-big, big)


def overflow_shift(x: Tensor, name: str) -> int:
    """k such that 2^-k x leaves every intermediate of a quantizer finite (its ranges, BHQ's scaled rows and
    group sums of up to sqrt(N) + 3 of them, with 8 bits to spare); NonFiniteError naming the input when x
    itself holds NaN or inf."""
    amax = x.detach().abs().amax().double()
    if not bool(torch.isfinite(amax)):
        raise NonFiniteError("gradient")
    rows = x.shape[0] if x.dim() else 1
    room = 127 - 8 - math.ceil(math.log2(math.sqrt(rows) + 3))
    k = max(0, int(torch.frexp(amax).exponent) - room)
    if k == 0:  # x had room already: the overflow is not x's size but a bug; say so instead of looping
        raise NonFiniteError(f"gradient ({name})", intermediate=True)
    return k


class PerTensor(SRGradientQuantizer):
    """PTQ: one zero-aligned range for the whole tensor. Var <= N D step^2 / 4."""

    name = "per_tensor"

    def _grid_from_range(self, lo, hi):
        return (*covering_grid_from_range(lo, hi, self.bits), None)


class PerSample(SRGradientQuantizer):
    """PSQ: one range per row (sample). Var <= D sum_i step_i^2 / 4 <= PTQ's bound.

    grid="minmax" (default): each row's plain [min, max], step R_i / B, as the spec's exact formula and
    the paper; "zero_aligned": the row's range widened to hold 0 on a grid point (exact zeros stay
    exact), a coarser step for rows of one sign or off-centre (on the spec's fixtures 1.8-1.9x the
    variance at 2 bits, 4-9% more at 4 bits; README).
    """

    name = "per_sample"
    keep_dim = 0

    def __init__(self, bits: int, *, compile: bool = False, grid: str = "minmax"):
        if grid not in GRAD_GRIDS:
            raise ValueError(f"quant.grad_grid={grid!r} is unknown: use one of {', '.join(GRAD_GRIDS)}")
        super().__init__(bits, compile=compile)
        self.grid = grid

    def _grid_from_range(self, lo, hi):
        if self.grid == "zero_aligned":
            return (*covering_grid_from_range(lo, hi, self.bits), None)
        return span_grid_from_range(lo, hi, self.bits)

    def _native(self, xf, seed, codes):
        """The min-max grid: each row's range found in the SR pass itself, while the row is in cache."""
        if self.grid != "minmax" or (codes and self.bits > 8):
            return super()._native(xf, seed, codes)
        res = native_sr.sr_pass(xf, [SRJob("row_span", self.bits, seed, codes=codes)])
        if res is None:
            return None
        self._check_span(res[0])
        return res[0], None

    def _check_span(self, res: SRResult) -> None:
        """NonFiniteError for a row_span pass's grids: a NaN row leaves lo NaN, an inf one scale inf, and a finite
        row at the float32 limit may round its top level past it."""
        check_range(res.lo, res.scale, what="gradient")
        check_range(res.scale * float(2**self.bits - 1) + res.lo, what="grid of the gradient", intermediate=True)

    def __repr__(self) -> str:
        return f"PerSample(bits={self.bits}, compile={self.compile}, grid={self.grid!r})"


class PerColumn(SRGradientQuantizer):
    """Q_bw for the dW GEMM: one zero-aligned range per column (over the batch); the per-column scales
    commute with the reduction over the batch in dW = Q(dY)^T X."""

    name = "per_column"
    keep_dim = 1

    def _grid_from_range(self, lo, hi):
        return (*covering_grid_from_range(lo, hi, self.bits), None)


class BlockHouseholder(SRGradientQuantizer):
    """BHQ: rows grouped by range, T = H_n diag(s1, s2, ..., s2) per group, then PSQ on T X.

    Ranges are the rows' max - min, the span PSQ's min-max grid covers (as the reference code's
    preconditioner); a zero range means a constant row, and a group of constant rows is left as it is (exact on
    its grid). Near float32's limit a group's scales take a power of two that keeps T X finite (the same codes);
    a finite input stays finite (overflow_shift, saturate_). N = 1 gives exactly PSQ. The rows of T X get
    the min-max grid: the reflections mix rows, so no zero-aligned grid could keep exact zeros anyway.
    With the C kernels: a range pass, the set-up, and one pass group by group (T X, its row grids, SR and for
    values T^-1, the group's rows in cache; T X is never stored).
    """

    name = "householder"
    keep_dim = 0

    def _transform(self, lo: Tensor, hi: Tensor) -> BlockHouseholderTransform:
        """T from the (N,) row minima and maxima, each group's scales times the power of two that keeps its
        rows and group sums finite (1 unless they would overflow; the same codes: min-max grids scale along)."""
        check_range(lo, hi, what="gradient")
        ranges = hi - lo
        check_range(ranges, what="row ranges of the gradient", intermediate=True)  # rows spanning +-1.8e38 and more
        transform = block_householder_transform(ranges).without_constant_groups(ranges)
        return transform.with_headroom(torch.maximum(lo.abs(), hi.abs()))

    @staticmethod
    def _inverse_may_overflow(transform: BlockHouseholderTransform, ylo: Tensor, yhi: Tensor) -> bool:
        """Whether T^-1 of values within the rows' ranges [ylo, yhi] could leave float32 (a bound on (N,)
        vectors, no pass over the gradient): |(T^-1 y)_i| <= (sqrt(n) + 3) max_group |y| / s_i."""
        top = torch.maximum(ylo.abs(), yhi.abs()).view(-1).double()
        largest = (float(transform.sizes.max()) ** 0.5 + 3.0) * float(top.max())
        if largest / float(transform.row_scale.min()) < 2.0**127:
            return False  # the whole-tensor bound already holds (the usual case, no group pass)
        group_top = torch.zeros_like(top).scatter_reduce_(0, transform.group, top, reduce="amax")
        n = transform.sizes.double()[transform.group]
        bound = (n.sqrt() + 3.0) * group_top[transform.group] / transform.row_scale.view(-1).double()
        return bool((bound >= 2.0**127).any())

    def _prepare(self, x: Tensor):
        xf = _as_matrix(type(self).__name__, x)
        if xf.numel() == 0:
            return super()._prepare(x)
        transform = self._transform(xf.amin(dim=1), xf.amax(dim=1))
        y = transform.apply(xf)
        grid = span_grid_from_range(y.amin(dim=1, keepdim=True), y.amax(dim=1, keepdim=True), self.bits)
        return y, grid, transform

    def _native(self, xf, seed, codes):
        got = native_sr.ranges(xf, rows=True, cols=False) if not (codes and self.bits > 8) else None
        if got is None:
            return None
        lo, hi = got[0]
        transform = self._transform(lo.view(-1), hi.view(-1))
        got = native_bhq.quantize(xf, transform, self.bits, seed, codes)
        if got is None:
            return None
        res, yhi = got  # res.lo: the rows' min of T x
        # span_grid_from_range's checks, on the grid the kernel built from the rows' ranges of T x
        check_range(res.lo, yhi, what="gradient")
        check_range(res.scale * float(2**self.bits - 1) + res.lo, what="grid of the gradient", intermediate=True)
        if not codes and self._inverse_may_overflow(transform, res.lo, yhi):
            saturate_(res.out)
        return res, transform


GRADIENT_QUANTIZERS: dict[str, type[SRGradientQuantizer]] = {
    "per_tensor": PerTensor,
    "per_sample": PerSample,
    "householder": BlockHouseholder,
    "per_column": PerColumn,
    "ptq": PerTensor,
    "psq": PerSample,
    "bhq": BlockHouseholder,
}


def _sr_op(x: Tensor, quantizer: str, bits: int, grid: str, compile: bool, seed: Tensor) -> Tensor:
    """fqtrun::sr_fake's implementation (quant/ops.py): the quantizer's __call__ run eager."""
    return make_gradient_quantizer(quantizer, bits, compile=compile, grid=grid or None)(x, ops.seed_value(seed))


def make_gradient_quantizer(name: str, bits: int, *, compile: bool = False,
                            grid: str | None = None) -> SRGradientQuantizer:
    """Build a gradient quantizer by registry name (or alias); compile=True fuses the SR pass.

    grid: PSQ's grid (GRAD_GRIDS; None = its default, minmax); the other quantizers have one grid each.
    """
    try:
        cls = GRADIENT_QUANTIZERS[name]
    except (KeyError, TypeError):
        valid = ", ".join(GRADIENT_QUANTIZERS)
        raise ValueError(f"unknown gradient quantizer {name!r}: use one of {valid}") from None
    if grid is None:
        return cls(bits, compile=compile)
    if cls is not PerSample:
        raise ValueError(f"quant.grad_grid={grid} applies to per_sample only ({cls.name} has one grid): "
                         "drop quant.grad_grid or use quant.grad=per_sample")
    return cls(bits, compile=compile, grid=grid)


ops.implement(ops.sr_fake, _sr_op)
