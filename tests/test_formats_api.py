"""The public formats API (fqtrun.formats): the same values as the formats and the integer quantizers it
wraps, codes + scales, the Hadamard option, one-line errors, and docs/formats.md's snippet runs as printed."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from fqtrun.formats import FORMAT_NAMES, quantize, quantize_dequantize, saturated
from fqtrun.quant.formats import FORMATS
from fqtrun.quant.gradient import PerTensor
from fqtrun.quant.quantizers import MinMaxQuantizer

X = torch.randn(8, 96) * torch.exp(torch.randn(8, 1))


@pytest.mark.parametrize("name", list(FORMATS))
def test_float_formats_are_the_formats_fused_pass(name):
    for rounding, dim in (("nearest", -1), ("stochastic", 0)):
        y = quantize_dequantize(X, name, rounding=rounding, dim=dim, seed=4)
        assert torch.equal(y, FORMATS[name].fake(X, dim, rounding, 4))
        q = quantize(X, name, rounding=rounding, dim=dim, seed=4)
        assert q.codes.dtype == torch.uint8 and torch.equal(q.dequantize(), y)


def test_options_reach_the_format():
    assert torch.equal(quantize_dequantize(X, "mxfp4", scale_rule="rceil"),
                       FORMATS["mxfp4"].with_options(scale_rule="rceil").fake(X))
    assert torch.equal(quantize_dequantize(X, "nvfp4", block_2d=True),
                       FORMATS["nvfp4"].with_options(block_2d=True).fake(X))
    assert quantize(X, "nvfp4").scales.shape == (8, 6) and quantize(X, "nvfp4", block_2d=True).scales.shape == (1, 6)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_int_formats_are_fqtruns_integer_grids(bits):
    assert torch.equal(quantize_dequantize(X, f"int{bits}"), MinMaxQuantizer(bits).codes(X).dequantize())
    assert torch.equal(quantize_dequantize(X, f"int{bits}", rounding="stochastic", seed=9), PerTensor(bits)(X, 9))
    assert torch.equal(quantize(X, f"int{bits}").dequantize(), quantize_dequantize(X, f"int{bits}"))


@pytest.mark.parametrize("name", ["mxfp4", "nvfp4", "int4"])
def test_hadamard_option_returns_an_unbiased_estimate_of_x(name):
    ys = torch.stack([quantize_dequantize(X, name, "stochastic", dim=-1, seed=s, transform="rht")
                      for s in range(400)]).double()
    assert ys.shape[1:] == X.shape
    sd = ys.std(0)
    assert (sd > 0).all()  # R^T Q(x R): every element sees the noise of its whole block
    z = (ys.mean(0) - X.double()) / (sd / 20)
    assert z.abs().max() < 5.0


def test_saturated_and_errors():
    x = torch.zeros(1, 32)
    x[0, 0] = 7.0
    assert saturated(x, "mxfp4")[0, 0] and not saturated(x, "mxfp4", scale_rule="rceil").any()
    assert not saturated(x, "int4").any()
    with pytest.raises(ValueError, match="format 'mxfp5' is unknown: use one of fp8_e4m3"):
        quantize_dequantize(X, "mxfp5")
    with pytest.raises(ValueError, match="scale_rule=rceil applies to MX formats"):
        quantize_dequantize(X, "nvfp4", scale_rule="rceil")
    with pytest.raises(ValueError, match="rounding='up' is unknown"):
        quantize_dequantize(X, "int4", rounding="up")
    with pytest.raises(ValueError, match="transform='dct' is unknown"):
        quantize_dequantize(X, "mxfp4", transform="dct")
    assert set(FORMAT_NAMES) >= {"fp8_e4m3", "fp8_e5m2", "mxfp8_e4m3", "mxfp8_e5m2", "mxfp6_e3m2", "mxfp6_e2m3",
                                 "mxfp4", "nvfp4", "int8", "int2"}


def test_the_docs_snippet_runs():
    page = (Path(__file__).resolve().parents[1] / "docs" / "formats.md").read_text(encoding="utf-8")
    code = re.search(r"```python\n(.*?)```", page, re.S).group(1)
    exec(compile(code, "docs/formats.md", "exec"), {})  # noqa: S102 (the page's own example)
