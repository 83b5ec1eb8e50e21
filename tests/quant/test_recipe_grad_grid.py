"""quant.grad_grid: PSQ's row grid (min-max by default, zero-aligned on request), refused where it would do nothing."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf
from torch import nn

from fqtrun.quant.gradient import PerColumn, PerSample, make_gradient_quantizer
from fqtrun.quant.recipe import QuantConfig, slot_factory, validate


def recipe(**kw) -> QuantConfig:
    kw = {"bits_w": 8, "bits_a": 8, "bits_dx": 4, "bits_dw": 8, **kw}
    return OmegaConf.structured(QuantConfig(**kw))


@pytest.mark.parametrize("grad", ["per_sample", "psq"])
@pytest.mark.parametrize("grid", ["minmax", "zero_aligned"])
def test_psq_slot_gets_the_grid(grad, grid):
    cfg = recipe(grad=grad, grad_grid=grid)
    validate(cfg)
    make = slot_factory(cfg)
    dx, dw = make("dx", nn.Linear(2, 2)), make("dw", nn.Linear(2, 2))
    assert isinstance(dx, PerSample) and dx.grid == grid
    assert isinstance(dw, PerColumn)  # the dW quantizer keeps its own (zero-aligned) grid
    assert PerSample(4).grid == "minmax"  # the default


@pytest.mark.parametrize("grad", ["per_tensor", "householder", None])
def test_zero_aligned_refused_where_it_does_nothing(grad):
    with pytest.raises(ValueError, match="quant.grad_grid=zero_aligned applies to quant.grad=per_sample only"):
        validate(recipe(grad=grad, grad_grid="zero_aligned"))
    with pytest.raises(ValueError, match="quant.grad_grid=zero_aligned applies to per_sample only"):
        make_gradient_quantizer(grad or "bhq", 4, grid="zero_aligned")


def test_unknown_grid_named():
    with pytest.raises(ValueError, match="quant.grad_grid='nearest' is unknown: use one of minmax, zero_aligned"):
        validate(recipe(grad="per_sample", grad_grid="nearest"))
    with pytest.raises(ValueError, match="quant.grad_grid='nearest' is unknown"):
        PerSample(4, grid="nearest")
