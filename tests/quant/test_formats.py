"""Scaled formats (spec/formats.md): codes + scales give back the fused pass, blocks along any dim (padded),
the FP8 scalings and 2-D tiles against slow per-block references, the C kernel equal to the torch path,
defined output on all-zero / constant / outlier / subnormal blocks, NaN refused, SR unbiased (z-test)
with the closed-form variance, and saturation reported."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys

import pytest
import torch

from fqtrun.quant.formats import FORMATS, Format, kernel
from fqtrun.quant.formats.elements import E2M1
from fqtrun.quant.numerics import NonFiniteError
from fqtrun.quant.transforms import RandomHadamard


def variants() -> list[Format]:
    """Every registered format, the MX ones also with rceil, the block-scaled ones also in 2-D tiles."""
    out = []
    for f in FORMATS.values():
        out.append(f)
        if f.scale == "e8m0":
            out.append(f.with_options(scale_rule="rceil"))
        if f.scaling == "block":
            out.append(f.with_options(block_2d=True))
    return out


VARIANTS = variants()
IDS = [f.label() for f in VARIANTS]


def sample(shape, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    return x * torch.exp(torch.randn(shape[0], *([1] * (len(shape) - 1)), generator=g))


def same_bits(a, b) -> bool:
    return a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))


@pytest.fixture
def torch_path(monkeypatch):
    """Run Format.fake on the torch operations (the C kernel declines every tensor)."""
    monkeypatch.setattr(kernel, "usable", lambda x: False)


@pytest.mark.parametrize("fmt", VARIANTS, ids=IDS)
def test_codes_and_scales_dequantize_to_the_fused_pass(fmt):
    for (shape, dim), rounding in itertools.product([((33, 70), -1), ((33, 70), 0), ((3, 40, 5), 1)],
                                                   ["nearest", "stochastic"]):
        x = sample(shape)
        q = fmt.quantize(x, dim, rounding, seed=3)
        assert q.codes.dtype == torch.uint8 and q.codes.shape == x.shape
        assert q.scales.shape == q.layout.scale_shape
        assert same_bits(q.dequantize(), fmt.fake(x, dim, rounding, seed=3))


@pytest.mark.parametrize("fmt", VARIANTS, ids=IDS)
def test_c_kernel_equals_the_torch_path(fmt, monkeypatch):
    if not kernel.usable(torch.zeros(1)):
        pytest.skip("no C compiler: the torch path runs alone")
    cases = itertools.product([((37, 70), -1), ((37, 70), 0), ((3, 50, 9), 1), ((5,), 0), ((130, 2), 0)],
                              ["nearest", "stochastic"], [None, RandomHadamard(16), RandomHadamard(32)])
    for (shape, dim), rounding, t in cases:
        x = sample(shape, seed=len(shape))
        fast = fmt.fake(x, dim, rounding, 5, t, 7)
        with monkeypatch.context() as m:
            m.setattr(kernel, "usable", lambda x: False)
            slow = fmt.fake(x, dim, rounding, 5, t, 7)
        assert same_bits(fast, slow), (shape, dim, rounding, t)


def long_lines(seed=0, top=3e38) -> torch.Tensor:
    """Lines long enough for the kernel's whole-vector loops, rows spanning float32's range: up to `top`
    (3e38: the clamp to float32's range; lower under a transform, whose sums would overflow), ordinary,
    and subnormal."""
    x = sample((12, 512), seed)
    x[0] = x[0] / x[0].abs().max() * top
    x[1] *= 1e-40
    x[2, :100] = 0.0
    return x


@pytest.mark.parametrize("fmt", VARIANTS, ids=IDS)
def test_c_kernel_equals_the_torch_path_on_long_lines(fmt, monkeypatch):
    """The vector loops (whole blocks, the 16- and 32-point transforms in registers, the tensor amax found
    in the same call) against the torch path, along rows, down columns and in the middle dim."""
    if not kernel.usable(torch.zeros(1)):
        pytest.skip("no C compiler: the torch path runs alone")
    for rounding, rht in itertools.product(["nearest", "stochastic"], [None, RandomHadamard(16), RandomHadamard(32),
                                                                      RandomHadamard(128)]):
        x = long_lines(top=3e38 if rht is None else 1e36)
        for t, dim in [(x, -1), (x.t().contiguous(), 0), (x.reshape(3, 4, 512).transpose(1, 2).contiguous(), 1)]:
            fast = fmt.fake(t, dim, rounding, 9, rht, 4)
            with monkeypatch.context() as m:
                m.setattr(kernel, "usable", lambda x: False)
                slow = fmt.fake(t, dim, rounding, 9, rht, 4)
            assert same_bits(fast, slow), (tuple(t.shape), dim, rounding, rht)


_DIGESTS = """
import hashlib, itertools, sys, torch
sys.path.insert(0, {tests!r})
from test_formats import VARIANTS, long_lines
from fqtrun.quant.transforms import RandomHadamard
h = hashlib.sha256()
for fmt, rounding, rht in itertools.product(VARIANTS, ["nearest", "stochastic"], [None, RandomHadamard(16)]):
    x = long_lines(1, 3e38 if rht is None else 1e36)
    for t, dim in [(x, -1), (x.t().contiguous(), 0)]:
        h.update(fmt.fake(t, dim, rounding, 3, rht, 5).numpy().tobytes())
print(h.hexdigest())
"""


def test_portable_build_gives_the_native_bits():
    """The kernel built for x86-64-v3 (8 lanes, FQTRUN_PORTABLE=1) and for this CPU (16 lanes with AVX-512)
    give the same values: each in its own process, a digest of every variant's output."""
    if not kernel.usable(torch.zeros(1)):
        pytest.skip("no C compiler: the torch path runs alone")
    code = _DIGESTS.format(tests=os.path.dirname(__file__))
    digests = []
    for portable in ("0", "1"):
        env = {k: v for k, v in os.environ.items() if k != "FQTRUN_PORTABLE"}
        if portable == "1":
            env["FQTRUN_PORTABLE"] = "1"
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        digests.append(out.stdout.split()[-1])
    assert digests[0] == digests[1]


@pytest.mark.parametrize("name", ["fp8_e4m3", "fp8_e5m2", "fp8_e4m3_row", "fp8_e5m2_row", "fp8_e4m3_b128"])
@pytest.mark.parametrize("two_d", [False, True])
def test_fp8_scalings_against_a_per_block_loop(name, two_d, torch_path):
    """Slow reference: per block (tensor, row along dim, 1x128 tile or 128x128 block) s = amax / max and
    torch's own float8 cast of x / s, times s."""
    fmt = FORMATS[name]
    if two_d and fmt.scaling != "block":
        return
    fmt = fmt.with_options(block_2d=two_d)
    dtype = torch.float8_e4m3fn if "e4m3" in name else torch.float8_e5m2
    x = sample((200, 300))
    x[5, :128] = 0.0
    ref = torch.empty_like(x)
    rows = {"tensor": [slice(None)], "row": [slice(i, i + 1) for i in range(200)]}
    blocks = []
    if fmt.scaling in rows:
        blocks = [(r, slice(None)) for r in rows[fmt.scaling]]
    elif two_d:
        blocks = [(slice(i, i + 128), slice(j, j + 128)) for i in range(0, 200, 128) for j in range(0, 300, 128)]
    else:
        blocks = [(slice(i, i + 1), slice(j, j + 128)) for i in range(200) for j in range(0, 300, 128)]
    for r, c in blocks:
        b = x[r, c]
        amax = b.abs().max()
        s = amax / fmt.element.max if amax > 0 else torch.tensor(1.0)
        ref[r, c] = (b / s).clamp(-fmt.element.max, fmt.element.max).to(dtype).float() * s
    assert same_bits(fmt.fake(x, dim=1), ref)


def test_nvfp4_2d_tiles_against_a_per_tile_loop_and_the_transpose(torch_path):
    """NVFP4's 16x16 weight tiles: the spec's rule per tile (torch's E4M3 cast for the block scale), and
    W^T quantized with tiles gives the transpose of W's (the dX GEMM can reuse the forward's W)."""
    fmt = FORMATS["nvfp4"].with_options(block_2d=True)
    w = sample((40, 72))
    s_t = w.abs().max() / (448.0 * 6.0)
    ref = torch.empty_like(w)
    for i, j in itertools.product(range(0, 40, 16), range(0, 72, 16)):
        tile = w[i:i + 16, j:j + 16]
        sb = ((tile.abs().max() / 6.0) / s_t).clamp(2.0**-6, 448.0).to(torch.float8_e4m3fn).float()
        v = tile * ((1.0 / s_t) / sb)
        ref[i:i + 16, j:j + 16] = E2M1.round(v.clamp(-6, 6)) * (s_t * sb)
    assert same_bits(fmt.fake(w, dim=1), ref)
    assert same_bits(fmt.fake(w.t().contiguous(), dim=0), fmt.fake(w, dim=1).t().contiguous())
    assert fmt.orientation_free and not FORMATS["nvfp4"].orientation_free


@pytest.mark.parametrize("fmt", VARIANTS, ids=IDS)
def test_partial_blocks_equal_explicit_zero_padding(fmt):
    if fmt.scaling != "block" or fmt.two_d:
        return
    x = sample((6, 37))
    padded = torch.nn.functional.pad(x, (0, 128 - 37))
    assert same_bits(fmt.fake(x, -1), fmt.fake(padded, -1)[:, :37])
    # SR noise follows the flat index of the padded view: the first line's is the same in both
    assert same_bits(fmt.fake(x[:1], -1, "stochastic", 2), fmt.fake(padded[:1], -1, "stochastic", 2)[:, :37])


EDGES = {
    "all zero": torch.zeros(4, 128),
    "constant": torch.full((4, 128), -0.3),
    "one huge outlier": torch.cat([torch.full((4, 1), 3e38), torch.randn(4, 127) * 1e-3], 1),
    "subnormal only": torch.full((4, 128), 3e-41) * torch.randn(4, 128).sign(),
    "tiny": torch.randn(4, 128) * 1e-36,
}


@pytest.mark.parametrize("fmt", VARIANTS, ids=IDS)
@pytest.mark.parametrize("edge", list(EDGES))
def test_edge_blocks_give_defined_output(fmt, edge, monkeypatch):
    x = EDGES[edge]
    for rounding, c_kernel in itertools.product(["nearest", "stochastic"], [True, False]):
        with monkeypatch.context() as m:
            if not c_kernel:
                m.setattr(kernel, "usable", lambda x: False)
            y = fmt.fake(x, -1, rounding, 1)
        assert torch.isfinite(y).all(), (edge, rounding, c_kernel)
        assert (y.sign() * x.sign() >= 0).all()  # no sign flips
        if edge == "all zero":
            assert (y == 0).all()
        if edge == "one huge outlier":  # the outlier survives (within the element's precision)
            assert ((y[:, 0] - x[:, 0]).abs() <= x[:, 0] * 2.0 ** -fmt.element.mbits).all()
        if edge == "constant" and fmt.scale != "e4m3":  # the block maximum lands on the grid's top end
            assert (y - x).abs().max() <= 0.3 * 2.0 ** -fmt.element.mbits


@pytest.mark.parametrize("fmt", [FORMATS[n] for n in ("fp8_e4m3", "mxfp4", "nvfp4", "fp8_e5m2_row")],
                         ids=["fp8_e4m3", "mxfp4", "nvfp4", "fp8_e5m2_row"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_inputs_raise(fmt, bad, monkeypatch):
    x = torch.randn(8, 64)
    x[3, 7] = bad
    for c_kernel in (True, False):
        with monkeypatch.context() as m:
            if not c_kernel:
                m.setattr(kernel, "usable", lambda x: False)
            with pytest.raises(NonFiniteError):
                fmt.fake(x, -1, "stochastic", 0)
            with pytest.raises(NonFiniteError):
                fmt.fake(x, 0, "nearest", 0, RandomHadamard(16), 1)
    with pytest.raises(NonFiniteError):
        fmt.quantize(x)


SR_FORMATS = [FORMATS[n] for n in FORMATS] + [FORMATS["mxfp4"].with_options(scale_rule="rceil"),
                                               FORMATS["nvfp4"].with_options(block_2d=True)]


@pytest.mark.parametrize("fmt", SR_FORMATS, ids=[f.label() for f in SR_FORMATS])
def test_stochastic_rounding_is_unbiased_with_the_closed_form_variance(fmt):
    """z-test of the mean over seeded draws and the variance (x - lo)(hi - x) between the two neighbours of
    each element on its block's grid, including blocks whose maximum is exactly a power of two and blocks
    whose maximum would clip under the floor rule without the 3/4 pre-scale."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(32, 64, generator=g) * torch.exp(torch.randn(32, 1, generator=g))
    x[0, :32] = x[0, :32] / x[0, :32].abs().max() * 2.0**3  # block maximum exactly 8 (a power of two)
    x[1, :32] = x[1, :32] / x[1, :32].abs().max() * 7.0  # E2M1 floor scale 1: 7 > 6 would clip
    x[2, 16:32] = x[2, 16:32] / x[2, 16:32].abs().max() * 2.0**-3
    draws = 600
    ys = torch.stack([fmt.fake(x, -1, "stochastic", seed) for seed in range(draws)]).double()
    q = fmt.quantize(x, -1, "stochastic", 0)
    # the neighbours of every element on its block's (dequantized, pre-scaled) grid
    scale = q.scales.reshape(q.layout.block_scale_shape)
    grid = fmt.element.values().double()
    xb = q.layout.to_blocks(x).double()
    mag = xb.abs() / (scale.double() / q.prescale)
    pos = torch.searchsorted(grid, mag.reshape(-1).clamp(max=fmt.element.max)).clamp(1, len(grid) - 1)
    lo = grid[pos - 1].view(mag.shape)
    hi = grid[pos].view(mag.shape)
    on_grid = grid[pos.clamp(max=len(grid) - 1)].view(mag.shape) == mag
    unit = scale.double() / q.prescale
    var = torch.where(on_grid, 0.0, (mag - lo) * (hi - mag)) * unit**2
    var = q.layout.from_blocks(var).double()
    assert (mag <= fmt.element.max * (1 + 1e-6)).all()  # nothing saturates under SR
    mean = ys.mean(0)
    z = (mean - x.double()) / (var / draws).clamp(min=1e-60).sqrt()
    assert z[var > 0].abs().max() < 5.0
    assert torch.equal(mean[var == 0], x.double()[var == 0])
    emp = ((ys - x.double()) ** 2).mean(0)
    assert abs(emp.sum() / var.sum() - 1) < 0.06


def test_saturation_is_reported():
    x = torch.zeros(2, 32)
    x[0, 0], x[1, 0] = 7.0, 5.0  # E2M1 floor scale 2^(2 - 2): 7 clips to 6; 5 fits
    mx = FORMATS["mxfp4"]
    assert mx.saturated(x).sum() == 1 and mx.saturated(x)[0, 0]
    assert not mx.with_options(scale_rule="rceil").saturated(x).any()
    assert not mx.saturated(x, rounding="stochastic").any()  # the 3/4 pre-scale
    assert not FORMATS["fp8_e4m3"].saturated(x).any()
    # NVFP4: a block scale rounded down to E4M3 clips the block's maximum (up to 1/16 of it)
    y = torch.zeros(2, 16)
    y[0, 0], y[1, 0] = 448.0 * 6.0, 6.0 * 1.0625 * 0.96
    assert FORMATS["nvfp4"].saturated(y)[1, 0] and not FORMATS["nvfp4"].saturated(y, rounding="stochastic").any()
