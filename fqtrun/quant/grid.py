"""Integer grids: min-max scales, nearest and stochastic rounding.

Every quantizer in fqtrun maps x to codes on {0..B}, B = 2^bits - 1, and back to values. Two kinds:
- zero-aligned (forward quantizers, PTQ, per-column, PSQ's zero_aligned option): the range holds 0 and
  `zero` is an integer, code = clamp(round(x / scale) + zero, 0, B), value (code - zero) * scale, so
  exact zeros stay exact (spec/fqt.md, PTQ);
- span (PSQ, BHQ; spec/fqt.md's exact-variance formula): the plain [min, max] of each row,
  scale = (max - min) / B, value = code * scale + min; the finest grid the row allows, no exact zero.
SR takes both in one form: u = (x - lo) / scale + zero, value (code - zero) * scale + lo, with lo = 0
on zero-aligned grids and zero = 0 on span grids. No grid divides by zero (all-zero or constant input),
and a range that comes out NaN or inf raises NonFiniteError (numerics.py): the check runs on the
small range tensors the grid is built from, never as another pass over the input.
"""

from __future__ import annotations

import functools

import torch

from fqtrun.quant import grid_small
from fqtrun.quant.native import library as native_library
from fqtrun.quant.numerics import NonFiniteError, check_range

Tensor = torch.Tensor


def levels(bits: int) -> int:
    """B = 2^bits - 1, the largest code."""
    return (1 << bits) - 1


def _reduce_dims(x: Tensor, keep_dim: int | None) -> tuple[int, ...]:
    if keep_dim is None:
        return tuple(range(x.dim()))
    keep_dim %= x.dim()
    return tuple(d for d in range(x.dim()) if d != keep_dim)


def minmax_grid(x: Tensor, bits: int, keep_dim: int | None = None, what: str = "input") -> tuple[Tensor, Tensor]:
    """Scale and integer zero point of the min-max grid over x.

    keep_dim=None: one range for the tensor; keep_dim=d: one range per index of dim d.
    Returns (scale, zero), both broadcastable against x; scale > 0 always. NonFiniteError (naming
    `what`) when x holds NaN or inf.
    """
    dims = _reduce_dims(x, keep_dim)
    lo, hi = x.detach().amin(dim=dims, keepdim=True), x.detach().amax(dim=dims, keepdim=True)
    return minmax_grid_from_range(lo, hi, bits, what)


def minmax_grid_from_range(lo: Tensor, hi: Tensor, bits: int, what: str = "input") -> tuple[Tensor, Tensor]:
    """minmax_grid's (scale, zero) from the ranges (lo, hi) it takes (any shape, kept); small CPU ranges
    on numpy (grid_small.py: the same numbers, fewer launches)."""
    if grid_small.applies(lo, hi):
        return grid_small.minmax(lo, hi, float(levels(bits)), what)
    check_range(lo, hi, what=what)
    lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    span = hi - lo
    scale = torch.where(span > 0, span / levels(bits), torch.ones_like(span))
    zero = torch.round(-lo / scale).clamp(0, levels(bits))
    return scale, zero


def quantize_nearest(x: Tensor, scale: Tensor, zero: Tensor, bits: int) -> Tensor:
    """Codes (float tensor holding integers in 0..B) by round-to-nearest."""
    return torch.clamp(torch.round(x / scale) + zero, 0, levels(bits))


def dequantize(codes: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    return (codes - zero) * scale


# ---------------------------------------------------------------------------
# Counter-based noise and stochastic rounding (spec/fqt.md, "Stochastic rounding (SR)").
# torch.rand is the slow part of SR on CPU; a keyed integer hash of the flat element
# index gives reproducible noise from one seed, in plain elementwise int64 ops.

_M32 = 0xFFFFFFFF
_M64 = 0xFFFFFFFFFFFFFFFF
_M63 = 0x7FFFFFFFFFFFFFFF


def _splitmix64(z: int) -> int:
    """SplitMix64 step on a Python int: a bijective 64-bit avalanche mix."""
    z = (z + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def mix_seed(*ints: int) -> int:
    """One 63-bit seed from (run seed, step, layer, slot, draw, ...), order-sensitive.

    Pure Python: chains SplitMix64 over the ints (negative ints taken modulo 2^64).
    """
    h = 0x6A09E667F3BCC908
    for v in ints:
        if not isinstance(v, int):
            raise ValueError(  # noqa: TRY004 (project rule: bad settings raise ValueError)
                f"mix_seed takes ints, got {type(v).__name__}: pass int(...) values"
            )
        h = _splitmix64(h ^ (v & _M64))
    return h & _M63


def seed_keys(seed: int) -> tuple[int, int]:
    """Two 32-bit keys (input key, output key) for the element hash."""
    if not isinstance(seed, int):
        raise ValueError(  # noqa: TRY004 (project rule: bad settings raise ValueError)
            f"seed must be an int, got {type(seed).__name__}: build it with mix_seed(...)"
        )
    z = _splitmix64(seed & _M64)
    return z & _M32, z >> 32


def _hash32_(h: Tensor, k1: int, k2: int) -> Tensor:
    """In place on an int64 tensor of counters: h <- lowbias32(h ^ k1) ^ k2 (32-bit values).

    lowbias32 (two xorshift-multiply rounds) is a bijection on 32 bits with strong avalanche.
    Products may wrap modulo 2^64 (int64 arithmetic on every torch backend); only the low
    32 bits are kept, which wrapping leaves exact.
    """
    t = torch.empty_like(h)
    h.bitwise_xor_(k1)
    h.bitwise_xor_(torch.bitwise_right_shift(h, 16, out=t))
    h.mul_(0x7FEB352D).bitwise_and_(_M32)
    h.bitwise_xor_(torch.bitwise_right_shift(h, 15, out=t))
    h.mul_(0x846CA68B).bitwise_and_(_M32)
    h.bitwise_xor_(torch.bitwise_right_shift(h, 16, out=t))
    return h.bitwise_xor_(k2)


def index_noise(index: Tensor, k1: int | Tensor, k2: int | Tensor) -> Tensor:
    """The noise of the flat element indices `index` (int64, overwritten), as uniform_noise draws it.

    k1, k2 (seed_keys) may be 0-d int64 tensors: under torch.compile a new seed is then an input,
    not a constant to recompile for.
    """
    _hash32_(index, k1, k2)
    # top 24 bits -> exact float32 multiples of 2^-24 in [0, 1)
    return index.bitwise_right_shift_(8).to(torch.float32).mul_(2.0**-24)


def _noise_range(start: int, end: int, k1: int, k2: int, device) -> Tensor:
    """Noise of flat elements start..end-1."""
    return index_noise(torch.arange(start, end, dtype=torch.int64, device=device), k1, k2)


def uniform_noise(shape, seed: int, device=None) -> Tensor:
    """Float32 noise in [0, 1) on a 2^-24 grid: a hash of (seed, flat element index).

    Reproducible from the seed alone (no generator state); element i depends only on
    (seed, i), so any sub-tensor of the same flat layout sees the same values.
    """
    shape = torch.Size([shape]) if isinstance(shape, int) else torch.Size(shape)
    k1, k2 = seed_keys(seed)
    return _noise_range(0, shape.numel(), k1, k2, device).view(shape)


def stochastic_round(u: Tensor, noise: Tensor) -> Tensor:
    """SR(u) = floor(u) + [noise < frac(u)]: E = u when noise ~ U[0, 1) (spec/fqt.md, SR)."""
    f = torch.floor(u)
    return f + (noise < (u - f)).to(u.dtype)


def value_range(x: Tensor, keep_dim: int | None) -> tuple[Tensor, Tensor]:
    """float32 (min, max) of x, over the whole tensor or per index of keep_dim, broadcastable against x."""
    xf = x.detach().float()
    if keep_dim is None:
        lo, hi = torch.aminmax(xf)
        return lo.view([1] * xf.dim()), hi.view([1] * xf.dim())
    # amin + amax: aminmax(dim=...) was far slower on small CPU tensors (torch 2.14)
    dims = _reduce_dims(x, keep_dim)
    return xf.amin(dim=dims, keepdim=True), xf.amax(dim=dims, keepdim=True)


def covering_grid(x: Tensor, bits: int, keep_dim: int | None = None,
                  what: str = "gradient") -> tuple[Tensor, Tensor]:
    """Float32 (scale, zero) for SR: integer zero, and [min, max] inside [0, B] after mapping.

    minmax_grid rounds the zero point and can leave an end of the range off the grid, and
    clamping that end would bias SR. Here both ends always fit (see covering_grid_from_range).
    keep_dim as in minmax_grid; the result broadcasts against x.
    """
    if bits < 2:
        raise ValueError(
            f"covering_grid bits={bits} must be >= 2: a 1-bit grid with 0 on it cannot be unbiased"
        )
    return covering_grid_from_range(*value_range(x, keep_dim), bits, what=what)


def covering_grid_from_range(lo: Tensor, hi: Tensor, bits: int, what: str = "gradient") -> tuple[Tensor, Tensor]:
    """The smallest-step grid with an integer zero that holds [min(lo, 0), max(hi, 0)].

    step(z) = max(-lo / z, hi / (B - z)) covers the range for an integer zero z; data of both
    signs takes the better of the two integers around the real optimum B * -lo / (hi - lo),
    kept in 1..B-1; no negative data gives z = 0, no positive data z = B.
    Because step(z) only grows with the range for every z, a sub-range (a row) never gets a
    coarser grid than the whole (so PSQ's bound <= PTQ's holds with real steps).
    All-zero ranges get scale 1; scales never fall below the smallest normal float32.
    NonFiniteError (naming `what`) when lo or hi holds NaN or inf. On CPU float32 ranges the C kernel
    covering_grid computes it (the same operations; one call instead of about 25 small launches).
    """
    big = float(levels(bits))
    fast = _covering_native(lo, hi, big, what)
    if fast is not None:
        return fast
    check_range(lo, hi, what=what)
    lo = lo.float().clamp(max=0)
    hi = hi.float().clamp(min=0)
    both = (lo < 0) & (hi > 0)
    # halves avoid overflow of hi - lo near the float32 limit
    span = torch.where(both, hi * 0.5 - lo * 0.5, torch.ones_like(hi))
    z1 = torch.floor((-lo * 0.5) / span * big).clamp(1.0, big - 1.0)
    z2 = (z1 + 1.0).clamp(max=big - 1.0)

    def step(z: Tensor) -> Tensor:
        return torch.maximum(-lo / z, hi / (big - z))

    s1, s2 = step(z1), step(z2)
    zero = torch.where(s2 < s1, z2, z1)
    scale = torch.minimum(s1, s2)
    zero = torch.where(both, zero, torch.where(lo < 0, torch.full_like(lo, big), torch.zeros_like(lo)))
    one_sided = torch.maximum(-lo, hi) / big
    scale = _positive(torch.where(both, scale, one_sided))
    # the outermost levels data can round to
    check_range(torch.floor(lo / scale) * scale, torch.ceil(hi / scale) * scale, what=f"grid of the {what}",
                intermediate=True)
    return scale, zero


def _covering_native(lo: Tensor, hi: Tensor, big: float, what: str) -> tuple[Tensor, Tensor] | None:
    """covering_grid_from_range through kernels.c covering_grid, or None where it cannot run."""
    so = native_library.load()
    if so is None or lo.shape != hi.shape or lo.dtype != torch.float32 or hi.dtype != torch.float32:
        return None
    lo, hi = lo.detach().contiguous(), hi.detach().contiguous()
    if not native_library.plain(lo, hi):
        return None
    scale, zero = torch.empty_like(lo), torch.empty_like(lo)
    rc = so.covering_grid(lo.data_ptr(), hi.data_ptr(), lo.numel(), big, scale.data_ptr(), zero.data_ptr())
    if rc:
        raise NonFiniteError(what) if rc == 1 else NonFiniteError(f"grid of the {what}", intermediate=True)
    return scale, zero


def _positive(scale: Tensor) -> Tensor:
    """scale with zeros (an all-zero or constant range) set to 1 and the rest kept >= the smallest normal."""
    tiny = torch.finfo(torch.float32).tiny
    return torch.where(scale > 0, scale.clamp(min=tiny), torch.ones_like(scale))


def span_grid(x: Tensor, bits: int, keep_dim: int | None = None,
              what: str = "gradient") -> tuple[Tensor, Tensor, Tensor]:
    """Float32 (scale, zero, lo) of the span grid of x (module docstring), per keep_dim as in minmax_grid."""
    return span_grid_from_range(*value_range(x, keep_dim), bits, what=what)


def span_grid_from_range(lo: Tensor, hi: Tensor, bits: int,
                         what: str = "gradient") -> tuple[Tensor, Tensor, Tensor]:
    """(scale, zero, lo): scale = (hi - lo) / B, zero = 0, code 0 at lo (spec/fqt.md, exact variance).

    The finest uniform grid of B + 1 levels that holds the row, so SR's error sum_j p_j (1 - p_j) scale^2
    stays within D (hi - lo)^2 / (4 B^2) (spec/fqt.md, PSQ's bound). A constant row (hi = lo, all-zero included)
    gets scale 1, so its codes are 0 and its values lo exactly; scales never fall below the
    smallest normal float32; the span itself must fit float32 (|values| below about 1.7e38), or the
    values near hi overflow. NonFiniteError (naming `what`) when lo or hi holds NaN or inf. Small CPU ranges
    on numpy (grid_small.py).
    """
    if grid_small.applies(lo, hi):
        return grid_small.span(lo, hi, float(levels(bits)), what)
    check_range(lo, hi, what=what)
    lo, hi = lo.float(), hi.float()
    # halves avoid overflow of hi - lo near the float32 limit (same value as (hi - lo) / B otherwise)
    scale = _positive((hi * 0.5 - lo * 0.5) / float(levels(bits)) * 2.0)
    check_range(scale * float(levels(bits)) + lo, what=f"grid of the {what}", intermediate=True)  # its top level
    return scale, torch.zeros_like(scale), lo


# elements per eager SR block on CPU: every temporary of a block (about 40 bytes per element)
# stays in the L2 cache, which made eager SR about 3x faster than one pass per op over 4M
_CPU_BLOCK = 1 << 15


def sr_quantize(
    x: Tensor, scale: Tensor, zero: Tensor, bits: int, seed: int, dequant: bool = False,
    lo: Tensor | None = None,
) -> Tensor:
    """Stochastic rounding of x onto the grid (scale, zero, lo): float32 codes in 0..B.

    u = (x - lo) * (1 / scale) + zero (one fused multiply-add; lo None = 0, a zero-aligned grid),
    code = SR(clamp(u, 0, B)). dequant=True returns (codes - zero) * scale + lo instead, fused (same
    values as dequantizing the codes). Noise is uniform_noise(x.shape, seed). Eager torch, in blocks
    of rows on CPU (one block elsewhere); scale, zero and lo broadcast against x.
    """
    big = float(levels(bits))
    k1, k2 = seed_keys(seed)
    xf = x.float()
    if xf.dim() == 0:
        xf = xf.view(1)
    inv = torch.reciprocal(scale)
    out = torch.empty(torch.broadcast_shapes(xf.shape, scale.shape, zero.shape), device=x.device)
    if out.numel() == 0:
        return out
    n_rows = out.shape[0]
    per_row = max(1, out[0].numel()) if n_rows else 1
    step = max(1, _CPU_BLOCK // per_row) if x.device.type == "cpu" else max(1, n_rows)

    def rows(t: Tensor, r0: int, r1: int) -> Tensor:
        return t[r0:r1] if t.dim() == out.dim() and t.shape[0] == n_rows and n_rows > 1 else t

    for r0 in range(0, n_rows, step):
        r1 = min(n_rows, r0 + step)
        o, zr, xr = out[r0:r1], rows(zero, r0, r1), rows(xf, r0, r1)
        if lo is not None:
            xr = xr - rows(lo, r0, r1)
        u = torch.addcmul(zr, xr, rows(inv, r0, r1)).expand_as(o)
        u = u.clamp(0.0, big)  # only float rounding can step past the ends of the grid
        torch.floor(u, out=o)
        frac = u.sub_(o)
        noise = _noise_range(r0 * per_row, r1 * per_row, k1, k2, x.device).view(o.shape)
        o.add_(noise < frac)
        if dequant:
            o.sub_(zr).mul_(rows(scale, r0, r1))
            if lo is not None:
                o.add_(rows(lo, r0, r1))
    return out.view(x.shape) if x.dim() == 0 else out


def _sr_codes_fused(x: Tensor, inv_scale: Tensor, zero: Tensor, lo: Tensor, keys: Tensor, big: Tensor) -> Tensor:
    """sr_quantize's codes written out of place, for torch.compile to fuse into one pass over x."""
    h = torch.arange(x.numel(), dtype=torch.int64, device=x.device).view(x.shape) ^ keys[0]
    h = h ^ (h >> 16)
    h = (h * 0x7FEB352D) & _M32
    h = h ^ (h >> 15)
    h = (h * 0x846CA68B) & _M32
    h = h ^ (h >> 16)
    noise = ((h ^ keys[1]) >> 8).to(torch.float32) * (2.0**-24)
    u = torch.minimum(((x - lo) * inv_scale + zero).clamp(min=0.0), big)
    f = torch.floor(u)
    return f + (noise < (u - f)).to(torch.float32)


def _sr_dequant_fused(
    x: Tensor, inv_scale: Tensor, zero: Tensor, lo: Tensor, scale: Tensor, keys: Tensor, big: Tensor
) -> Tensor:
    """(codes - zero) * scale + lo of _sr_codes_fused, in the same fused pass."""
    return (_sr_codes_fused(x, inv_scale, zero, lo, keys, big) - zero) * scale + lo


@functools.cache
def _compiled_sr(dequant: bool):
    # One compiled function per variant: dynamo keeps at most 8 graphs per function (then runs
    # eager) and guards on a bool argument, so the flag must not multiply the grid shapes.
    return torch.compile(_sr_dequant_fused if dequant else _sr_codes_fused, dynamic=True)


def sr_quantize_compiled(
    x: Tensor, scale: Tensor, zero: Tensor, bits: int, seed: int, dequant: bool = False,
    lo: Tensor | None = None,
) -> Tensor:
    """sr_quantize through torch.compile (one fused pass; first call per shape kind compiles,
    ~10-30 s on a 2-core CPU). Same noise; float rounding of x / scale may differ in rare
    elements, so codes can differ from sr_quantize's by one step there.

    Runs under no_grad (the codes carry no gradient), with x cast to float32 beforehand and
    B passed as a tensor (dynamo specialises on Python floats), so grad mode, input dtype and
    bits add no graphs: each variant holds one graph per grid shape (tensor, row, column).
    """
    k1, k2 = seed_keys(seed)
    keys = torch.tensor([k1, k2], dtype=torch.int64, device=x.device)
    big = torch.tensor(float(levels(bits)), device=x.device)
    with torch.no_grad():
        xf, inv = x.float(), torch.reciprocal(scale)
        lo = torch.zeros_like(zero) if lo is None else lo  # x - 0 is x: a zero-aligned grid's values stand
        if dequant:
            return _compiled_sr(True)(xf, inv, zero, lo, scale, keys, big)
        return _compiled_sr(False)(xf, inv, zero, lo, keys, big)
