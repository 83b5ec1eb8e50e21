"""The simulate backend with number formats (spec/formats.md): every GEMM operand quantized along that GEMM's
reduction (dY along out-features for dX, along tokens for dW; W along in- then out-features), checked
against the same operations written out; the transform on both operands of its GEMM; 2-D weight tiles
reused; RHT + SR gradients unbiased and less noisy than SR alone on an outlier-heavy dY; the int8
backends refuse format layers with a reason."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fqtrun.quant.backends import Auto, apply_backend, backend_report
from fqtrun.quant.backends.simulate import GEMM_IDS
from fqtrun.quant.convert import convert
from fqtrun.quant.formats import FORMATS
from fqtrun.quant.formats.quantizer import FormatQuantizer
from fqtrun.quant.gradient import make_gradient_quantizer
from fqtrun.quant.grid import mix_seed
from fqtrun.quant.layers import NoiseContext
from fqtrun.quant.numerics import NonFiniteError
from fqtrun.quant.quantizers import MinMaxQuantizer
from fqtrun.quant.transforms import RandomHadamard


def fq(name, rounding="nearest", transform=None, dim=1, **opts):
    return FormatQuantizer(FORMATS[name].with_options(**opts), rounding, transform, dim=dim)


def converted(module: nn.Module, slots: dict, noise: NoiseContext | None = None) -> nn.Module:
    """module converted with the given slot quantizers (one layer), noise at step 3."""
    model = nn.Sequential(module)
    convert(model, lambda slot, m: slots.get(slot), noise or NoiseContext(seed=2, step=3))
    return model[0]


def fwd_seed(layer, slot, gemm):
    return mix_seed(layer.grad_seed(slot), GEMM_IDS[gemm])


def run(layer, x, gy):
    x = x.clone().requires_grad_(True)
    y = layer(x)
    y.backward(gy)
    return y.detach(), x.grad, layer.weight.grad, layer.bias.grad


def test_linear_operands_along_each_gemms_reduction():
    torch.manual_seed(0)
    rht = RandomHadamard(16)
    slots = {"w": fq("mxfp4"), "a": fq("mxfp8_e4m3"), "dx": fq("nvfp4", "stochastic"),
             "dw": fq("mxfp4", "stochastic", rht, dim=0)}
    layer = converted(nn.Linear(48, 40), slots)
    x, gy = torch.randn(3, 7, 48), torch.randn(3, 7, 40)
    y, gx, gw, gb = run(layer, x, gy)
    w, x2, g2 = layer.weight.detach(), x.reshape(21, 48), gy.reshape(21, 40)
    a_hat = FORMATS["mxfp8_e4m3"].fake(x2, 1, "nearest", fwd_seed(layer, "a", "fwd"))
    w_in = FORMATS["mxfp4"].fake(w, 1)  # W along in-features for the forward GEMM
    assert torch.equal(y, (a_hat @ w_in.t() + layer.bias.detach()).view(3, 7, 40))
    w_out = FORMATS["mxfp4"].fake(w, 0)  # along out-features for the dX GEMM: requantized
    assert not torch.equal(w_in, w_out)
    dy_dx = FORMATS["nvfp4"].fake(g2, 1, "stochastic", layer.grad_seed("dx"))
    assert torch.equal(gx, (dy_dx @ w_out).view(3, 7, 48))
    key = layer.transform_key(GEMM_IDS["dw"], fresh=True)
    dy_dw = FORMATS["mxfp4"].fake(g2, 0, "stochastic", layer.grad_seed("dw"), rht, key)  # along tokens
    x_dw = FORMATS["mxfp8_e4m3"].fake(x2, 0, "nearest", fwd_seed(layer, "a", "dw"), rht, key)
    assert dy_dw.shape == (32, 40) and x_dw.shape == (32, 48) and rht.padded(21) == 32
    assert torch.equal(gw, dy_dw.t() @ x_dw)
    assert torch.equal(gb, g2.sum(0))
    assert layer.used_bits() == {"w": 4, "a": 8, "dx": 4, "dw": 4}


def test_two_d_weight_tiles_are_reused_by_the_dx_gemm():
    slots = {"w": fq("nvfp4", block_2d=True), "dx": fq("mxfp8_e4m3", "stochastic")}
    layer = converted(nn.Linear(32, 48), slots)
    x, gy = torch.randn(10, 32), torch.randn(10, 48)
    _, gx, gw, _ = run(layer, x, gy)
    w_hat = FORMATS["nvfp4"].with_options(block_2d=True).fake(layer.weight.detach(), 1)
    dy = FORMATS["mxfp8_e4m3"].fake(gy, 1, "stochastic", layer.grad_seed("dx"))
    assert torch.equal(gx, dy @ w_hat)
    assert torch.equal(gw, gy.t() @ x)  # a and dw full precision


def test_conv_blocks_run_along_channels_and_the_batch():
    torch.manual_seed(1)
    rht = RandomHadamard(16)
    slots = {"w": fq("mxfp4"), "a": fq("mxfp6_e2m3"), "dx": fq("mxfp4", "stochastic", rht),
             "dw": fq("nvfp4", "stochastic", rht, dim=0)}
    conv = converted(nn.Conv1d(40, 36, 5, padding=2), slots)
    x, gy = torch.randn(10, 40, 12), torch.randn(10, 36, 12)
    y, gx, gw, _ = run(conv, x, gy)
    w = conv.weight.detach()
    a_hat = FORMATS["mxfp6_e2m3"].fake(x, 1, "nearest", fwd_seed(conv, "a", "fwd"))
    assert torch.equal(y, conv._conv_forward(a_hat, FORMATS["mxfp4"].fake(w, 1), conv.bias.detach()))
    key = conv.transform_key(GEMM_IDS["dx"], True)
    dy = FORMATS["mxfp4"].fake(gy, 1, "stochastic", conv.grad_seed("dx"), rht, key)  # channels, padded to 48
    w_op = FORMATS["mxfp4"].fake(w, 0, "nearest", fwd_seed(conv, "w", "dx"), rht, key)
    ref_gx = torch.nn.grad.conv1d_input(x.shape, w_op, dy, padding=2)
    assert torch.allclose(gx, ref_gx, atol=1e-5)
    key = conv.transform_key(GEMM_IDS["dw"], True)
    dy = FORMATS["nvfp4"].fake(gy, 0, "stochastic", conv.grad_seed("dw"), rht, key)  # the batch, padded to 16
    x_op = FORMATS["mxfp6_e2m3"].fake(x, 0, "nearest", fwd_seed(conv, "a", "dw"), rht, key)
    assert torch.allclose(gw, torch.nn.grad.conv1d_weight(x_op, w.shape, dy, padding=2), atol=1e-5)


def test_integer_slots_keep_their_grids_beside_a_format_slot():
    """per_sample dX (integer SR rows) with an mxfp4 dW: the integer slots' forward values in both GEMMs,
    transformed in the dW GEMM."""
    rht = RandomHadamard(16)
    slots = {"w": MinMaxQuantizer(8), "a": MinMaxQuantizer(8), "dx": make_gradient_quantizer("per_sample", 4),
             "dw": fq("mxfp4", "stochastic", rht, dim=0)}
    layer = converted(nn.Linear(24, 32), slots)
    x, gy = torch.randn(20, 24), torch.randn(20, 32)
    _, gx, gw, _ = run(layer, x, gy)
    w_hat = MinMaxQuantizer(8).codes(layer.weight.detach()).dequantize()
    x_hat = MinMaxQuantizer(8).codes(x).dequantize()
    assert torch.equal(gx, make_gradient_quantizer("per_sample", 4)(gy, layer.grad_seed("dx")) @ w_hat)
    key = layer.transform_key(GEMM_IDS["dw"], True)
    dy = FORMATS["mxfp4"].fake(gy, 0, "stochastic", layer.grad_seed("dw"), rht, key)
    assert torch.equal(gw, dy.t() @ rht.forward(x_hat, 0, key))


def dw_draws(layer, x, gy, draws):
    out = []
    for d in range(draws):
        layer.noise.draw = d
        layer.weight.grad = None
        layer(x).backward(gy)
        out.append(layer.weight.grad.double().clone())
    return torch.stack(out)


def test_rht_sr_gradients_are_unbiased_and_less_noisy_than_sr_on_outliers():
    """dW = Q(R dY)^T (R X) at 4 bits (MXFP4, SR) over seeded draws: its mean is dY^T X (z-test), and on a
    dY with a few huge entries per column the RHT spreads them over their blocks: lower variance."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 16, generator=g)
    gy = torch.randn(64, 8, generator=g) * 0.1
    gy[torch.randint(0, 64, (8,), generator=g), torch.arange(8)] = 20.0  # one outlier token per column
    exact = (gy.t() @ x).double()
    var = {}
    for name, t in (("sr", None), ("rht+sr", RandomHadamard(16))):
        layer = converted(nn.Linear(16, 8, bias=False), {"dw": fq("mxfp4", "stochastic", t, dim=0)},
                          NoiseContext(seed=4))
        est = dw_draws(layer, x, gy, 400)
        mean, sd = est.mean(0), est.std(0)
        z = (mean - exact) / (sd / 20).clamp(min=1e-12)
        assert z.abs().max() < 5.0, name
        var[name] = ((est - exact) ** 2).sum((1, 2)).mean()
    assert var["rht+sr"] < 0.7 * var["sr"]


def test_transform_signs_fresh_per_step_or_fixed():
    layer = converted(nn.Linear(4, 4), {"dw": fq("mxfp4", "stochastic", RandomHadamard(16), dim=0)})
    fresh, fixed = layer.transform_key(2, True), layer.transform_key(2, False)
    layer.noise.step += 1
    assert layer.transform_key(2, True) != fresh and layer.transform_key(2, False) == fixed
    assert layer.transform_key(1, True) != layer.transform_key(2, True)


def test_non_finite_gradient_raises():
    layer = converted(nn.Linear(8, 8), {"dx": fq("mxfp4", "stochastic")})
    gy = torch.randn(4, 8)
    gy[1, 2] = float("nan")
    x = torch.randn(4, 8, requires_grad=True)
    with pytest.raises(NonFiniteError):
        layer(x).backward(gy)


def test_eval_forward_without_grad():
    layer = converted(nn.Linear(16, 8), {"w": fq("nvfp4", block_2d=True), "a": fq("nvfp4")})
    with torch.no_grad():
        y = layer(torch.randn(5, 16))
    assert y.shape == (5, 8) and torch.isfinite(y).all()


def test_int8_backends_refuse_format_layers_with_a_reason():
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    slots = {"w": MinMaxQuantizer(8), "a": MinMaxQuantizer(8), "dx": make_gradient_quantizer("per_sample", 8),
             "dw": make_gradient_quantizer("per_column", 8)}
    convert(model, lambda slot, m: fq("mxfp4", "stochastic", dim=0) if m is model[1] and slot == "dw"
            else slots[slot], NoiseContext())
    apply_backend(model, Auto.name)
    model(torch.randn(8, 64)).sum().backward()
    report = backend_report(model)
    assert report["0"] == "int8" and report["1"] == "simulate (slot dw: mxfp4 is a number format, not an integer grid)"
