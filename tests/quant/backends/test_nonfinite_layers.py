"""Non-finite values in a quantized layer's input, weights or dY: both backends stop with NonFiniteError
naming the layer (its qualified name) and the slot, never a finite result computed from a NaN grid.

Oracle: the slot is known from where the NaN / inf was put (x -> a, W -> w, dY with an input gradient -> dx,
dY of a layer whose input needs no gradient -> dw); the same data without it runs through (and runs int8).
"""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn

from fqtrun.quant.backends import apply_backend, backend_report
from fqtrun.quant.convert import convert
from fqtrun.quant.layers import NoiseContext
from fqtrun.quant.numerics import NonFiniteError
from fqtrun.quant.recipe import QuantConfig, slot_factory

BAD = (float("nan"), float("inf"), float("-inf"))


def one_layer(kind: str, backend: str, grad: str) -> tuple[nn.Module, tuple[int, ...]]:
    """A model with one quantized layer at `block.proj` (8-bit slots, big enough to run int8), input shape."""
    torch.manual_seed(0)
    layer = nn.Linear(48, 40) if kind == "linear" else nn.Conv1d(32, 40, 3, padding=1)
    model = nn.Sequential(OrderedDict(block=nn.Sequential(OrderedDict(proj=layer))))
    convert(model, slot_factory(QuantConfig(grad=grad, bits_w=8, bits_a=8, bits_dx=8, bits_dw=8)),
            NoiseContext(seed=1))
    apply_backend(model, backend)
    return model, (6, 48) if kind == "linear" else (6, 32, 10)


def poisoned(t: torch.Tensor, value: float) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[t.numel() // 2] = value
    return t


def step(model: nn.Module, x: torch.Tensor, gy_value: float | None = None, input_grad: bool = True) -> None:
    y = model(x.requires_grad_(input_grad))
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(3))
    y.backward(gy if gy_value is None else poisoned(gy, gy_value))


@pytest.mark.parametrize("backend", ["simulate", "int8"])
@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("grad", ["per_sample", "householder"])
def test_clean_data_runs_through(backend, kind, grad):
    model, shape = one_layer(kind, backend, grad)
    step(model, torch.randn(shape))
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert backend_report(model) == {"block.proj": "int8" if backend == "int8" else "simulate"}


@pytest.mark.parametrize("backend", ["simulate", "int8"])
@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("value", BAD)
@pytest.mark.parametrize("where,slot", [("input", "a"), ("weight", "w"), ("dY", "dx"),
                                        ("dY, no input grad", "dw")])
def test_non_finite_values_name_the_layer_and_the_slot(backend, kind, value, where, slot):
    model, shape = one_layer(kind, backend, "per_sample")
    x = torch.randn(shape)
    if where == "input":
        x = poisoned(x, value)
    if where == "weight":
        with torch.no_grad():
            model.block.proj.weight.copy_(poisoned(model.block.proj.weight, value))
    with pytest.raises(NonFiniteError, match=f"in the .* of layer block.proj, slot {slot}$") as err:
        step(model, x, value if where.startswith("dY") else None, input_grad=where != "dY, no input grad")
    assert (err.value.layer, err.value.slot) == ("block.proj", slot)


@pytest.mark.parametrize("backend", ["simulate", "int8"])
def test_householder_dx_refuses_a_non_finite_dy(backend):
    model, shape = one_layer("linear", backend, "householder")
    with pytest.raises(NonFiniteError, match="slot dx$"):
        step(model, torch.randn(shape), float("nan"))
