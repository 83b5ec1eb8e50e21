"""NaN and inf are noticed in the range pass of every quantizer and of the int8 backend's operands
(quant/numerics.py): NonFiniteError instead of a finite grid that silently turns the NaN into a code."""

from __future__ import annotations

import copy

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from fqtrun.quant.backends import apply_backend
from fqtrun.quant.backends.int8 import forward_operand
from fqtrun.quant.convert import convert
from fqtrun.quant.gradient import BlockHouseholder, PerColumn, PerSample, PerTensor
from fqtrun.quant.layers import NoiseContext
from fqtrun.quant.numerics import NonFiniteError
from fqtrun.quant.quantizers import MinMaxQuantizer, RidgeQuantizer
from fqtrun.quant.recipe import QuantConfig, slot_factory

BAD = [float("nan"), float("inf"), float("-inf")]


def poisoned(shape, value: float, where=(1, 2)) -> torch.Tensor:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    x[where] = value
    return x


GRADIENT = [PerTensor(4), PerSample(4), PerSample(4, grid="zero_aligned"), BlockHouseholder(4), PerColumn(4)]


@pytest.mark.parametrize("q", GRADIENT, ids=repr)
@pytest.mark.parametrize("value", BAD)
def test_gradient_quantizers_raise(q, value):
    x = poisoned((6, 9), value)
    for call in (lambda: q(x, 3), lambda: q.quantize(x, 3)):
        with pytest.raises(NonFiniteError, match="non-finite values .* in the gradient"):
            call()


@pytest.mark.parametrize("q", [MinMaxQuantizer(8), MinMaxQuantizer(4, "channel"),
                               RidgeQuantizer(4), RidgeQuantizer(4, form="linear"),
                               RidgeQuantizer(2, ternary=True), RidgeQuantizer(1), RidgeQuantizer(4, block=4)],
                         ids=repr)
@pytest.mark.parametrize("value", BAD)
def test_forward_quantizers_raise(q, value):
    with pytest.raises(NonFiniteError):
        q(poisoned((6, 9), value))


@pytest.mark.parametrize("value", BAD)
def test_int8_weight_operand_raises(value):
    for per_row in (False, True):
        with pytest.raises(NonFiniteError, match="in the weight"):
            forward_operand(MinMaxQuantizer(8), poisoned((5, 7), value), per_row, compile=False)


def int8_model(layer: nn.Module) -> nn.Module:
    cfg = OmegaConf.structured(QuantConfig(grad="per_sample", bits_w=8, bits_a=8, bits_dx=8, bits_dw=8))
    m = copy.deepcopy(layer)
    m = nn.Sequential(m)
    convert(m, slot_factory(cfg), NoiseContext(seed=1))
    apply_backend(m, "int8")
    return m


LAYERS = {"linear": (nn.Linear(32, 40), (4, 32)), "conv": (nn.Conv1d(8, 36, 3), (4, 8, 12))}


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("value", BAD)
def test_int8_backend_notices_activation_weight_and_gradient(kind, value, monkeypatch):
    monkeypatch.setattr("fqtrun.quant.backends.int8.MIN_CONV_GEMM", 1)  # the small conv through im2col int8
    layer, shape = LAYERS[kind]
    torch.manual_seed(0)
    x = torch.randn(shape)
    # the backend names the layer and the slot (quant/health.py named_slot)
    with pytest.raises(NonFiniteError, match="in the input of layer 0, slot a"):
        int8_model(layer)(poisoned(shape, value, (1, 2)))
    m = int8_model(layer)
    with torch.no_grad():
        m[0].weight[0, 1] = value
    with pytest.raises(NonFiniteError, match="in the weights of layer 0, slot w"):
        m(x)
    m = int8_model(layer)
    y = m(x.requires_grad_())
    gy = torch.randn(y.shape)
    gy.view(-1)[5] = value
    with pytest.raises(NonFiniteError, match="in the output gradient of layer 0, slot dx"):
        y.backward(gy)
