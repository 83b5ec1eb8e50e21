"""The int8 backend: integer GEMMs on the quantized codes equal the simulate backend's fp32 GEMMs.

Oracles: an int64 matmul of (code - zero) (exact, independent of _int_mm); the simulate backend
on data whose grids have power-of-two steps and small integer sums, where fp32 is exact, so the
two backends must agree bit for bit; elsewhere they agree to fp32 rounding.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from fqtrun.quant import fused, grid
from fqtrun.quant.backends import apply_backend, backend_report
from fqtrun.quant.backends.int8 import IntOperand, grad_operand, int_matmul
from fqtrun.quant.backends.int_gemm import int8_gemm
from fqtrun.quant.convert import convert
from fqtrun.quant.gradient import make_gradient_quantizer
from fqtrun.quant.layers import NoiseContext
from fqtrun.quant.native import library
from fqtrun.quant.quantizers import MinMaxQuantizer
from fqtrun.quant.recipe import QuantConfig, slot_factory, validate


def quantized(model: nn.Module, backend: str, **kw) -> nn.Module:
    kw = {"grad": "per_sample", "bits_w": 8, "bits_a": 8, "bits_dx": 8, "bits_dw": 8, **kw}
    cfg = OmegaConf.structured(QuantConfig(**kw))
    m = copy.deepcopy(model)
    convert(m, slot_factory(cfg), NoiseContext(seed=7))
    apply_backend(m, backend)
    return m


def run(model: nn.Module, x: torch.Tensor, gy: torch.Tensor):
    """Output, input gradient and parameter gradients for the upstream gradient gy."""
    x = x.clone().requires_grad_()
    y = model(x)
    y.backward(gy)
    return y.detach(), x.grad, [p.grad.clone() for p in model.parameters()]


def on_row_grid(shape, step_exp: int, bits: int, gen: torch.Generator) -> torch.Tensor:
    """Each row of the 2-D view (shape[0], -1) as on_grid with its own zero: the row's span grid has step
    2^step_exp and lo = -z 2^step_exp, its zero-aligned grid the same step and zero z."""
    rows = [on_grid(shape[1:], step_exp, bits, gen) for _ in range(shape[0])]
    return torch.stack(rows)


def on_grid(shape, step_exp: int, bits: int, gen: torch.Generator) -> torch.Tensor:
    """Integers in [-z, B - z] (both ends present) times 2^step_exp: min-max and covering grids of
    this tensor have step exactly 2^step_exp and zero z, so quantization is the identity."""
    big = (1 << bits) - 1
    z = int(torch.randint(1, big, (1,), generator=gen))
    v = torch.randint(-z, big - z + 1, shape, generator=gen).float()
    v.view(-1)[0], v.view(-1)[1] = -z, big - z
    return v * 2.0**step_exp


@pytest.mark.parametrize("shapes", [("row", "col"), ("tensor", "tensor"), ("row", "tensor"), ("tensor", "col"),
                                    ("span row", "col"), ("span row", "tensor")])
def test_int_matmul_is_the_exact_integer_gemm_of_the_codes(shapes):
    gen = torch.Generator().manual_seed(0)
    m, k, n = 37, 64, 29  # 255^2 * 64 < 2^24: fp32 holds every sum exactly

    def operand(rows, cols, kind):
        codes = torch.randint(0, 256, (rows, cols), generator=gen)
        zshape = {"row": (rows, 1), "col": (1, cols), "tensor": (1, 1)}[kind.split()[-1]]
        zero = torch.randint(0, 256, zshape, generator=gen).float()
        scale = 2.0 ** torch.randint(-8, 3, zshape, generator=gen).float()
        lo = None
        if kind.startswith("span"):  # a span grid: zero 0, code 0 at lo (a multiple of the step here)
            zero, lo = torch.zeros(zshape), torch.randint(-300, 300, zshape, generator=gen) * scale
        op = IntOperand((codes - 128).to(torch.int8), (128 - zero).int(), scale, lo)
        return op, codes, zero, scale, torch.zeros(zshape) if lo is None else lo

    a, ca, za, sa, la = operand(m, k, shapes[0])
    b, cb, zb, sb, _ = operand(k, n, shapes[1])
    # exact reference in float64: (C_a - Z_a) S_a B + L_a colsum(B), every term an integer times a power of two
    b_vals = (cb - zb.long()).double() * sb.double()
    ref = ((ca - za.long()).double() * sa.double()) @ b_vals + la.double() * b_vals.sum(0, keepdim=True)
    got = int_matmul(a, b)
    assert torch.equal(got, ref.float())
    simulate = a.dequantize() @ b.dequantize()  # fp32 GEMM on dequantized values
    assert torch.equal(got, simulate)
    if la.abs().sum() > 0:  # the offset is used, not dropped: without it the product differs
        assert not torch.equal(got, int_matmul(IntOperand(a.q, a.alpha, a.scale), b))
    with pytest.raises(ValueError, match="only the left operand may carry an offset"):
        int_matmul(b.t(), IntOperand(a.q.t(), a.alpha.t(), a.scale.t(), torch.ones(1, 1)))


@pytest.mark.parametrize("bits", [8, 5, 2])
@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_forward_int8_codes_equal_the_min_max_quantizer_codes(bits, granularity):
    x = torch.randn(48, 70, generator=torch.Generator().manual_seed(bits)) * torch.linspace(0.1, 5, 48).view(-1, 1)
    q = MinMaxQuantizer(bits, granularity)
    ref = q.codes(x)
    scale, zero = grid.minmax_grid(x, bits, keep_dim=0 if granularity == "channel" else None)
    got = fused.nearest_int8(x, scale, zero, bits)
    assert got.q.dtype == torch.int8
    assert torch.equal(got.q.long() + 128, ref.codes.long())
    if got.rowsum is not None:  # the C kernel's sums of the int8 values, for the GEMMs' corrections
        assert torch.equal(got.rowsum, got.q.int().sum(1, keepdim=True))
        assert torch.equal(got.colsum, got.q.int().sum(0, keepdim=True))


@pytest.mark.parametrize("name", ["per_tensor", "per_sample", "per_column", "householder"])
def test_gradient_int8_operand_holds_the_quantizer_codes(name):
    g = torch.randn(20, 33, generator=torch.Generator().manual_seed(1)) * torch.rand(20, 1) * 10
    q = make_gradient_quantizer(name, 8)
    gc = q.quantize(g, seed=11)
    op = grad_operand(gc)
    assert torch.equal(op.q.long() + 128, gc.codes.long())
    assert torch.equal(op.dequantize(), gc.grid_values())
    assert grad_operand(make_gradient_quantizer(name, 9).quantize(g, seed=11)) is None  # > 8 bits: no int8


@pytest.mark.parametrize("grad,grid", [("per_tensor", "minmax"), ("per_sample", "minmax"),
                                       ("per_sample", "zero_aligned")])
def test_linear_backends_agree_bit_for_bit_on_exact_grids(grad, grid):
    gen = torch.Generator().manual_seed(3)
    lin = nn.Linear(64, 24)
    with torch.no_grad():
        lin.weight.copy_(on_grid(lin.weight.shape, -6, 8, gen))
        lin.bias.copy_(torch.randint(-8, 8, (24,), generator=gen) * 0.25)
    x, gy = on_grid((3, 5, 64), -4, 8, gen), on_grid((3, 5, 24), -3, 8, gen)
    kw = {"grad": "per_tensor", "grad_dw": "per_tensor"}
    if grad != "per_tensor":  # every row of dY on its own grid: PSQ's span (lo, step) or zero-aligned grid exact
        gy = on_row_grid((15, 24), -3, 8, gen).view(3, 5, 24)
        kw = {"grad": "per_sample", "grad_dw": "per_tensor", "grad_grid": grid}
    int8_model = quantized(nn.Sequential(lin), "int8", **kw)
    sim, int8 = run(quantized(nn.Sequential(lin), "simulate", **kw), x, gy), run(int8_model, x, gy)
    assert backend_report(int8_model) == {"0": "int8"}
    assert torch.equal(sim[0], int8[0]) and torch.equal(sim[1], int8[1])
    if grad == "per_tensor":  # row grids leave dY's per-tensor dW grid inexact (dW: the fp32-rounding test)
        for a, b in zip(sim[2], int8[2]):
            assert torch.equal(a, b)


@pytest.mark.parametrize("conv", [nn.Conv1d(8, 40, 3, stride=2, padding=1, dilation=2),
                                  nn.Conv2d(6, 36, (3, 2), stride=(1, 2), padding=(1, 0))])
def test_conv_backends_agree_bit_for_bit_on_exact_grids(conv):
    gen = torch.Generator().manual_seed(4)
    conv = copy.deepcopy(conv)
    with torch.no_grad():
        conv.weight.copy_(on_grid(conv.weight.shape, -6, 8, gen))
        conv.bias.zero_()
    x = on_grid((4, conv.in_channels, *([9] * (conv.weight.dim() - 2))), -4, 8, gen)
    out_shape = conv(x).shape
    gy = on_grid(out_shape, -3, 8, gen)
    kw = {"grad": "per_tensor", "grad_dw": "per_tensor"}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("fqtrun.quant.backends.int8.MIN_CONV_GEMM", 1)  # run these small convs through im2col int8
        int8_model = quantized(nn.Sequential(conv), "int8", **kw)
        int8 = run(int8_model, x, gy)
        assert backend_report(int8_model) == {"0": "int8"}
    sim = run(quantized(nn.Sequential(conv), "simulate", **kw), x, gy)
    for a, b in zip([sim[0], sim[1], *sim[2]], [int8[0], int8[1], *int8[2]]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("grad", ["per_sample", "householder", None])
@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_backends_agree_to_fp32_rounding_on_random_data(grad, granularity):
    """Same codes (same seeds), arbitrary scales: only fp32 rounding (and BHQ's T^-1 after the GEMM) differs."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(32, 48), nn.GELU(), nn.Linear(48, 16))
    x, gy = torch.randn(40, 32), torch.randn(40, 16) * torch.rand(40, 1)
    sim = run(quantized(model, "simulate", grad=grad, weight_granularity=granularity), x, gy)
    int8_model = quantized(model, "int8", grad=grad, weight_granularity=granularity)
    int8 = run(int8_model, x, gy)
    for a, b in zip([sim[0], sim[1], *sim[2]], [int8[0], int8[1], *int8[2]]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5 * float(a.abs().max()))
    report = backend_report(int8_model)
    if grad is None:
        assert "dx=fp32 (dY full precision)" in report["2"]
    elif granularity == "channel":
        assert report["2"].startswith("fwd=int8, dx=fp32 (per-channel weight scales")
    else:
        assert report == {"0": "int8", "2": "int8"}


@pytest.mark.parametrize("grad", ["per_sample", "householder"])
@pytest.mark.parametrize("conv", [nn.Conv1d(5, 36, 3, stride=2, padding=2, dilation=2),
                                  nn.Conv2d(4, 33, (3, 2), stride=(2, 1), padding=(1, 1))])
def test_conv_backends_agree_to_fp32_rounding_on_random_data(grad, conv):
    """Random data, per-sample or BHQ dY rows over C_out*positions: the int8 im2col/fold path gives
    the simulate backend's output and gradients up to fp32 rounding."""
    torch.manual_seed(6)
    model = nn.Sequential(copy.deepcopy(conv), nn.ReLU())
    x = torch.randn(6, conv.in_channels, *([11] * (conv.weight.dim() - 2)))
    gy = torch.randn(model(x).shape) * torch.rand(6, *([1] * (x.dim() - 1)))  # samples of different scales
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("fqtrun.quant.backends.int8.MIN_CONV_GEMM", 1)
        int8_model = quantized(model, "int8", grad=grad)
        int8 = run(int8_model, x, gy)
        assert backend_report(int8_model) == {"0": "int8"}
    sim = run(quantized(model, "simulate", grad=grad), x, gy)
    for a, b in zip([sim[0], sim[1], *sim[2]], [int8[0], int8[1], *int8[2]]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5 * float(a.abs().max()))


def test_auto_picks_int8_only_where_every_slot_has_at_most_8_bits():
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    x = torch.randn(8, 16)
    for kw, expect in [({}, "int8"), ({"bits_dx": 12}, "simulate (auto: slot dx is 12 bits)"),
                       ({"grad": None}, "simulate (auto: slot dx is full precision)")]:
        m = quantized(model, "auto", **kw)
        m(x).sum().backward()
        assert set(backend_report(m).values()) == {expect}
    m = quantized(model, "simulate")
    m(x).sum().backward()
    assert set(backend_report(m).values()) == {"simulate"}


def test_int8_backend_refuses_settings_it_cannot_run():
    with pytest.raises(ValueError, match="quant.bits_dx=12 does not fit int8"):
        validate(OmegaConf.structured(QuantConfig(grad="per_sample", bits_w=8, bits_a=8, bits_dx=12, bits_dw=8,
                                                  backend="int8")))
    with pytest.raises(ValueError, match="quant.backend='int4' is unknown"):
        validate(OmegaConf.structured(QuantConfig(bits_w=8, bits_a=8, bits_dx=8, bits_dw=8, backend="int4")))
    with pytest.raises(ValueError, match="quant.backend='fp8' is unknown"):
        apply_backend(nn.Linear(2, 2), "fp8")


def _curve(backend: str, seed: int, steps: int = 40) -> torch.Tensor:
    """SGD losses of a small FQT MLP on fixed Gaussian blobs (the data and init depend on `seed`)."""
    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(4, 20, generator=gen) * 2
    labels = torch.randint(0, 4, (256,), generator=gen)
    data = centers[labels] + torch.randn(256, 20, generator=gen)
    torch.manual_seed(seed)
    model = quantized(nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 4)), backend, grad="householder",
                      bits_dx=4, bits_dw=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    noise = model[0].noise
    losses = []
    for step in range(steps):
        noise.step = step
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(data), labels)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return torch.tensor(losses)


def test_training_curves_agree_within_seed_noise():
    sim0, sim1, int8_0 = _curve("simulate", 0), _curve("simulate", 1), _curve("int8", 0)
    assert sim0[-1] < 0.5 * sim0[0]  # it learns
    seed_noise = (sim0 - sim1).abs()[-10:].mean()
    assert (int8_0 - sim0).abs()[-10:].mean() < 0.2 * seed_noise


def test_compiled_gemm_epilogue_equals_eager(monkeypatch):
    """fused.int_gemm_epilogue: the one-pass compiled form gives the eager form's floats bit for bit (the
    C kernel, which runs first where it can, is tested against the eager form in test_native.py)."""
    monkeypatch.setattr(library, "load", lambda: None)
    gen = torch.Generator().manual_seed(3)
    m, n = 33, 20
    acc = torch.randint(-2**20, 2**20, (m, n), generator=gen, dtype=torch.int32)
    alpha_a = torch.randint(-127, 128, (m, 1), generator=gen, dtype=torch.int32)
    col_term = torch.randint(-2**16, 2**16, (1, n), generator=gen, dtype=torch.int32)
    row_a = torch.randint(-2**16, 2**16, (m, 1), generator=gen, dtype=torch.int32)
    alpha_b = torch.randint(-127, 128, (1, n), generator=gen, dtype=torch.int32)
    scale_a, scale_b = torch.rand(m, 1, generator=gen) + 0.01, torch.rand(1, n, generator=gen) + 0.01
    args = (alpha_a, col_term, row_a, alpha_b, scale_a, scale_b)
    eager = fused.int_gemm_epilogue(acc.clone(), *args)
    ints = acc.long() + alpha_a.long() * col_term.long() + row_a.long() * alpha_b.long()  # int64 reference
    assert torch.equal(eager, ints.float() * scale_a * scale_b)
    offset, bias = torch.randn(m, 1, generator=gen), torch.randn(n, generator=gen)  # a span grid's lo, a bias
    eager_more = fused.int_gemm_epilogue(acc.clone(), *args, offset, bias)
    assert torch.equal(eager_more, eager + offset * (col_term.float() * scale_b) + bias)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a silent eager fallback would make this test vacuous
        compiled = fused.int_gemm_epilogue(acc.clone(), *args, compile=True)
        compiled_more = fused.int_gemm_epilogue(acc.clone(), *args, offset, bias, compile=True)
    assert torch.equal(compiled, eager) and torch.equal(compiled_more, eager_more)


@pytest.mark.parametrize("k", [1, 77, 1024, 2500])
def test_float32_engine_is_the_exact_int8_gemm(k):
    # oracle: an int64 matmul; extreme codes (-128 everywhere) reach the largest partial sums, 2^24 per chunk
    gen = torch.Generator().manual_seed(k)
    a = torch.randint(-128, 128, (19, k), generator=gen, dtype=torch.int8)
    b = torch.randint(-128, 128, (k, 23), generator=gen, dtype=torch.int8)
    a[0], b[:, 0] = -128, -128
    ref = (a.long() @ b.long()).int()
    assert torch.equal(int8_gemm(a, b, use="fp32"), ref) and int(ref[0, 0]) == k * 2**14
    assert torch.equal(int8_gemm(a, b.t().contiguous().t(), use="fp32"), ref)  # a transposed operand too
    if k <= 1024:  # torch._int_mm is a plain loop on AVX2-only CPUs: keep its share of the suite small
        assert torch.equal(int8_gemm(a, b, use="int_mm"), ref)
