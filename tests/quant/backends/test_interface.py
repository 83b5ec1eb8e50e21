"""The layer/backend seam: a layer hands its input and its RunRecord to its backend and reads the record back.

Oracles: the simulate backend's outputs and gradients (a third backend delegating to it must give them
bit for bit), and the layer's own attributes before a step (a backend must leave every one in place).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fqtrun.quant.backends import (
    BACKENDS,
    Backend,
    RunRecord,
    Simulate,
    apply_backend,
    backend_report,
    make_backend,
    register_backend,
)
from fqtrun.quant.convert import convert, quant_layers, used_bits
from fqtrun.quant.layers import NoiseContext, QuantConv1d, QuantLinear
from fqtrun.quant.recipe import QuantConfig, slot_factory


class Custom(Backend):
    """A third backend: the simulate path under another name, recording "custom" for its forward GEMM."""

    name = "custom"

    def run(self, layer, x: torch.Tensor, record: RunRecord) -> torch.Tensor:
        y = Simulate().run(layer, x, record)
        record.gemms = {"fwd": "custom"}
        return y


@pytest.fixture
def custom():
    register_backend(Custom)
    yield
    del BACKENDS["custom"]


def model(backend: str) -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv1d(3, 40, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(40 * 9, 5))
    cfg = QuantConfig(grad="householder", bits_w=4, bits_a=4, bits_dx=4, bits_dw=8)
    convert(m, slot_factory(cfg), NoiseContext(seed=1))
    apply_backend(m, backend)
    return m


def step(m: nn.Module) -> list[torch.Tensor]:
    x = torch.randn(6, 3, 9, generator=torch.Generator().manual_seed(2)).requires_grad_()
    y = m(x)
    y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(3)))
    return [y.detach(), x.grad, *(p.grad for p in m.parameters())]


def test_a_registered_backend_runs_the_layers_unchanged(custom):
    m = model("custom")
    assert all(type(layer.backend) is Custom for _, layer in quant_layers(m))
    for a, b in zip(step(model("simulate")), step(m)):
        assert torch.equal(a, b)
    assert backend_report(m) == {"0": "fwd=custom", "3": "fwd=custom"}
    assert used_bits(m) == {"w": 4, "a": 4, "dx": 4, "dw": 8}
    apply_backend(m, "simulate")  # and back, by name like the built-in ones
    assert backend_report(m) == {"0": "simulate", "3": "simulate"}


def test_an_unregistered_backend_is_refused():
    with pytest.raises(ValueError, match=r"quant.backend='custom' is unknown: use one of simulate, int8, auto"):
        make_backend("custom")


def _refuse_setattr(self, name, value):
    raise AssertionError(f"a backend set layer.{name}")


@pytest.mark.parametrize("backend", ["simulate", "int8", "auto"])
def test_backends_never_set_layer_attributes(backend, monkeypatch):
    """Every attribute of every layer is the same object after a forward and backward; only the record's
    contents change (the conv is small, so int8 and auto fall back to simulate for it and say why)."""
    m = model(backend)
    layers = [layer for _, layer in quant_layers(m)]
    before = [({k: id(v) for k, v in vars(layer).items()}, dict(layer.slots)) for layer in layers]
    with monkeypatch.context() as mp:
        for cls in (QuantLinear, QuantConv1d):
            mp.setattr(cls, "__setattr__", _refuse_setattr)
        step(m)
    after = [({k: id(v) for k, v in vars(layer).items()}, dict(layer.slots)) for layer in layers]
    assert before == after
    assert all(layer.used_bits() == {"w": 4, "a": 4, "dx": 4, "dw": 8} for layer in layers)
    if backend != "simulate":
        assert layers[0].record.gemms == {"fwd": "simulate (conv GEMM too small to win (C_in*k=9, C_out=40 < 32))"}
        assert layers[1].record.gemms == {"fwd": "int8", "dx": "int8", "dw": "int8"}
