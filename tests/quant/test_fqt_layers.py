"""Fully quantized layers (spec/fqt.md, "The three regimes"): FQT is unbiased for QAT, the
backward GEMMs use the quantized operands, edge batches work, and the QAT forward quantizer.

Oracles: the QAT gradient of an identical model (the FQT mean must converge to it like 1/K),
GEMMs written out here from the recorded quantized dY, a brute-force nearest grid point.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from fqtrun.quant.convert import convert, quant_layers
from fqtrun.quant.layers import NoiseContext
from fqtrun.quant.quantizers import MinMaxQuantizer
from fqtrun.quant.recipe import QuantConfig, slot_factory

QUANTIZERS = ("per_tensor", "per_sample", "householder")


# ----------------------------------------------------------------------------- helpers
def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 5))


def conv1d() -> nn.Module:
    torch.manual_seed(0)  # input (B, 2, 10) -> conv (B, 4, 5)
    return nn.Sequential(nn.Conv1d(2, 4, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(20, 5))


def conv2d() -> nn.Module:
    torch.manual_seed(0)  # input (B, 1, 4, 4) -> conv (B, 3, 4, 4)
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(48, 5))


MODELS = {"mlp": (mlp, (12,)), "conv1d": (conv1d, (2, 10)), "conv2d": (conv2d, (1, 4, 4))}


def quantized(model: nn.Module, grad: str | None, bits: int, dw_bits: int | None = None, fwd: int = 8):
    """Convert in place with the project's recipe; returns the shared NoiseContext."""
    cfg = QuantConfig(grad=grad, bits_w=fwd, bits_a=fwd, bits_dx=bits, bits_dw=dw_bits or bits)
    noise = NoiseContext(seed=0)
    convert(model, slot_factory(cfg), noise)
    return noise


def data(shape, n=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g), torch.randint(0, 5, (n,), generator=g)


def flat_grad(model, x, y) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


class Spy:
    """Wraps a gradient quantizer and records what it was given and what it returned."""

    def __init__(self, q):
        self.q, self.bits = q, q.bits
        self.inputs, self.outputs = [], []

    def __call__(self, g, seed):
        out = self.q(g, seed)
        self.inputs.append(g.detach().clone())
        self.outputs.append(out.detach().clone())
        return out


# ----------------------------------------------------------------------------- unbiasedness
@pytest.mark.parametrize(("name", "quantizer"), [("mlp", q) for q in QUANTIZERS] + [("conv1d", "householder")])
def test_mean_of_k_fqt_gradients_converges_to_qat_like_one_over_k(name, quantizer):
    """E||mean_K - g_QAT||^2 = V / K (spec: FQT unbiased, squared error proportional to 1/K).

    Means over K in {4, 16, 64, 256} taken from disjoint noise draws (backward passes on one retained
    forward graph: the forward is deterministic); the log-log slope of the squared error must be -1
    within 0.25 (an estimator biased by b levels off at ||b||^2, slope -> 0), and each error must lie
    within a factor 3 of V/K, V the per-pass variance estimated from the same draws. Over 6 noise
    seeds x 6 model/quantizer pairs the slopes ranged -1.16..-0.83 and the ratios 0.55..1.8.
    """
    build, shape = MODELS[name]
    model = build()
    qat = copy.deepcopy(model)
    quantized(qat, None, 8)
    noise = quantized(model, quantizer, 3)  # low bits: large noise, the convergence is visible
    x, y = data(shape)
    g_qat = flat_grad(qat, x, y).double()
    params = list(model.parameters())
    loss = nn.functional.cross_entropy(model(x), y)
    draws = []
    for j in range(4 + 16 + 64 + 256):
        noise.draw = j
        grads = torch.autograd.grad(loss, params, retain_graph=True)
        draws.append(torch.cat([g.reshape(-1) for g in grads]))
    draws = torch.stack(draws).double()
    v = (draws - g_qat).pow(2).sum(1).mean()
    ks, errs, start = [4, 16, 64, 256], [], 0
    for k in ks:
        errs.append(float((draws[start:start + k].mean(0) - g_qat).pow(2).sum()))
        start += k
    slope = np.polyfit(np.log(ks), np.log(errs), 1)[0]
    assert -1.25 <= slope <= -0.75, (slope, errs)
    for k, e in zip(ks, errs):
        assert 1 / 3 <= e * k / float(v) <= 3, (k, e * k / float(v))


def test_qat_path_through_fqt_layers_equals_plain_autograd():
    """With no gradient quantizer the layers are plain QAT: the gradient equals autograd on W_hat, X_hat."""
    model = mlp()
    ref = copy.deepcopy(model)
    quantized(model, None, 4, fwd=4)
    x, y = data((12,))
    g = flat_grad(model, x, y)
    q = MinMaxQuantizer(4)
    h = nn.functional.relu(nn.functional.linear(q(x), q(ref[1].weight), ref[1].bias))
    out = nn.functional.linear(q(h), q(ref[3].weight), ref[3].bias)
    ref.zero_grad()
    nn.functional.cross_entropy(out, y).backward()
    torch.testing.assert_close(g, torch.cat([p.grad.reshape(-1) for p in ref.parameters()]))


# ----------------------------------------------------------------------------- the backward GEMMs
def test_linear_backward_uses_quantized_weight_and_activation():
    """dX = Q_dx(dY) W_hat and dW = Q_dw(dY)^T X_hat, written out by hand from the recorded Q(dY)."""
    torch.manual_seed(3)
    lin = nn.Sequential(nn.Linear(7, 6))
    quantized(lin, "per_sample", 4, fwd=2)  # 2-bit forward: W_hat is far from W
    layer = lin[0]
    layer.slots["dx"], layer.slots["dw"] = Spy(layer.slots["dx"]), Spy(layer.slots["dw"])
    x = torch.randn(5, 7, requires_grad=True)
    gy = torch.randn(5, 6)
    lin(x).backward(gy)
    w_hat = MinMaxQuantizer(2)(layer.weight).detach()
    x_hat = MinMaxQuantizer(2)(x).detach()
    qdx, qdw = layer.slots["dx"].outputs[0], layer.slots["dw"].outputs[0]
    torch.testing.assert_close(layer.slots["dx"].inputs[0], gy)
    torch.testing.assert_close(x.grad, qdx @ w_hat)
    assert not torch.allclose(x.grad, qdx @ layer.weight.detach(), atol=1e-3)  # the test can tell W from W_hat
    torch.testing.assert_close(layer.weight.grad, qdw.t() @ x_hat)
    torch.testing.assert_close(layer.bias.grad, gy.sum(0))  # the bias gradient is exact


def test_conv1d_backward_uses_quantized_weight_and_activation():
    torch.manual_seed(4)
    net = nn.Sequential(nn.Conv1d(3, 4, 3, stride=2, padding=1))
    quantized(net, "householder", 4, fwd=2)
    conv = net[0]
    conv.slots["dx"], conv.slots["dw"] = Spy(conv.slots["dx"]), Spy(conv.slots["dw"])
    x = torch.randn(5, 3, 9, requires_grad=True)
    out = net(x)
    gy = torch.randn_like(out)
    out.backward(gy)
    w_hat = MinMaxQuantizer(2)(conv.weight).detach()
    x_hat = MinMaxQuantizer(2)(x).detach()
    qdx = conv.slots["dx"].outputs[0].reshape(gy.shape)  # rows = samples over C*L
    qdw = conv.slots["dw"].outputs[0].reshape(5, out.shape[2], 4).movedim(-1, 1)  # rows = (sample, position)
    grad = nn.grad
    torch.testing.assert_close(x.grad, grad.conv1d_input(x.shape, w_hat, qdx, stride=2, padding=1))
    torch.testing.assert_close(conv.weight.grad, grad.conv1d_weight(x_hat, conv.weight.shape, qdw, stride=2, padding=1))
    torch.testing.assert_close(conv.bias.grad, gy.sum((0, 2)))


# ----------------------------------------------------------------------------- edge cases
@pytest.mark.parametrize("quantizer", ["per_tensor", "per_sample"])
@pytest.mark.parametrize("name", ["mlp", "conv1d"])
def test_exact_zeros_in_dy_stay_zero(name, quantizer):
    """ReLU zeroes parts of dY; PTQ/PSQ put 0 on a grid point, so those entries stay exactly 0."""
    build, shape = MODELS[name]
    model = build()
    quantized(model, quantizer, 3)
    spies = []
    for _, layer in quant_layers(model):
        for s in ("dx", "dw"):
            layer.slots[s] = Spy(layer.slots[s])
            spies.append(layer.slots[s])
    x, y = data(shape)
    flat_grad(model, x, y)
    zeros = 0
    for spy in spies:
        for g, q in zip(spy.inputs, spy.outputs):
            zeros += int((g == 0).sum())
            assert torch.equal(q[g == 0], torch.zeros_like(q[g == 0]))
    assert zeros > 50  # the ReLUs did produce exact zeros to check


@pytest.mark.parametrize("quantizer", QUANTIZERS)
@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("batch", [1, 2])
def test_batch_of_one_and_two(name, quantizer, batch):
    build, shape = MODELS[name]
    model = build()
    quantized(model, quantizer, 4)
    x, y = data(shape, n=batch)
    g = flat_grad(model, x, y)
    assert torch.isfinite(g).all() and g.abs().sum() > 0


@pytest.mark.parametrize("quantizer", QUANTIZERS)
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_a_model_trains_a_few_steps(quantizer, bits):
    """Full-batch SGD on a learnable teacher: finite losses at every bit-width; the loss falls at 4/8 bits."""
    model = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 5))
    torch.manual_seed(0)
    for m in model:
        if isinstance(m, nn.Linear):
            m.reset_parameters()
    noise = quantized(model, quantizer, bits)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(64, 12, generator=g)
    y = (x @ torch.randn(12, 5, generator=g)).argmax(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    losses = []
    for step in range(8):
        noise.step = step
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    if bits >= 4:
        assert losses[-1] < losses[0]


# ----------------------------------------------------------------------------- QAT forward quantizer
def brute_nearest_distance(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Distance from every element to the nearest of the 2^bits grid values, by enumeration."""
    codes = torch.arange(2**bits, dtype=torch.float64)
    grid = (codes - zero.double().reshape(-1, 1)) * scale.double().reshape(-1, 1)  # (rows, levels)
    rows = x.double().reshape(grid.shape[0], -1)
    return (rows[:, :, None] - grid[:, None, :]).abs().min(-1).values.reshape(x.shape)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_minmax_codes_on_grid_nearest_and_zero_exact(bits):
    torch.manual_seed(bits)
    x = torch.randn(6, 50) * 3
    x[:, ::7] = 0.0
    q = MinMaxQuantizer(bits)
    c = q.codes(x)
    assert torch.equal(c.codes, c.codes.round()) and c.codes.min() >= 0 and c.codes.max() <= 2**bits - 1
    x_hat = q(x)
    torch.testing.assert_close(x_hat, c.dequantize())
    assert torch.equal(x_hat[x == 0], torch.zeros_like(x_hat[x == 0]))
    dist = brute_nearest_distance(x, c.scale.expand(6, 1), c.zero.expand(6, 1), bits)
    torch.testing.assert_close((x_hat - x).abs().double(), dist, atol=1e-5, rtol=0)  # the nearest grid value


def test_minmax_per_channel_ranges():
    """Per output channel: each channel's own range sets its step; a tiny channel survives."""
    torch.manual_seed(0)
    w = torch.randn(4, 3, 5) * torch.tensor([1e-3, 1.0, 10.0, 1e3]).reshape(4, 1, 1)
    bits = 4
    w_hat = MinMaxQuantizer(bits, "channel")(w)
    for c in range(4):
        wc = w[c]
        step = (wc.max().clamp(min=0) - wc.min().clamp(max=0)) / (2**bits - 1)
        assert (w_hat[c] - wc).abs().max() <= step / 2 * (1 + 1e-5)
    assert (w_hat[0] != 0).any()
    assert (MinMaxQuantizer(bits, "tensor")(w)[0] == 0).all()  # one range for the tensor loses channel 0


@pytest.mark.parametrize("value", [0.0, 3.0, -2.0])
def test_minmax_constant_tensors_stay_finite_and_exact(value):
    for gran in ("tensor", "channel"):
        x = torch.full((3, 4), value)
        x_hat = MinMaxQuantizer(4, gran)(x)
        assert torch.isfinite(x_hat).all()
        torch.testing.assert_close(x_hat, x)


@pytest.mark.parametrize("bits", [1, 4, 8])
def test_ste_gradient_is_the_identity(bits):
    x = (torch.randn(5, 7) * 4).requires_grad_()
    g = torch.randn(5, 7)
    MinMaxQuantizer(bits, "channel")(x).backward(g)
    assert torch.equal(x.grad, g)
