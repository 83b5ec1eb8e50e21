"""MX (floor and rceil) and NVFP4 round-to-nearest against an independent implementation: torchao's CPU
casting (torchao.prototype.mx_formats: to_mx with its scaling modes, NVFP4Tensor.to_nvfp4), bit for bit,
on random, outlier and all-zero blocks. Skipped when torchao is not installed (`pip install torchao`, or
the bench extra)."""

from __future__ import annotations

import warnings

import pytest
import torch

from fqtrun.formats import quantize, quantize_dequantize

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    mx = pytest.importorskip("torchao.prototype.mx_formats.mx_tensor", reason="torchao is not installed")
    nv = pytest.importorskip("torchao.prototype.mx_formats.nvfp4_tensor", reason="torchao is not installed")
from torchao.prototype.mx_formats.config import ScaleCalculationMode  # noqa: E402
from torchao.prototype.mx_formats.constants import DTYPE_FP6_E2M3, DTYPE_FP6_E3M2  # noqa: E402

MX = {"mxfp8_e4m3": torch.float8_e4m3fn, "mxfp8_e5m2": torch.float8_e5m2, "mxfp6_e3m2": DTYPE_FP6_E3M2,
      "mxfp6_e2m3": DTYPE_FP6_E2M3, "mxfp4": torch.float4_e2m1fn_x2}
MODES = {"floor": ScaleCalculationMode.FLOOR, "rceil": ScaleCalculationMode.RCEIL}


def blocks(seed: int) -> torch.Tensor:
    """(64, 256): rows of very different scales, one huge outlier, all-zero blocks, power-of-two maxima."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 256, generator=g) * torch.exp(2 * torch.randn(64, 1, generator=g))
    x[3, 5] = 1e4
    x[7, 32:64] = 0.0
    x[8] = 0.0
    x[9, :32] = 2.0 ** torch.randint(-10, 10, (32,), generator=g).float()
    x[10, 64:96] = -(2.0 ** 3)
    return x


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))


@pytest.mark.parametrize("rule", list(MODES))
@pytest.mark.parametrize("name", list(MX))
@pytest.mark.parametrize("seed", [0, 1])
def test_mx_equals_torchao_bit_for_bit(name, rule, seed):
    x = blocks(seed)
    scale, data = mx.to_mx(x, MX[name], 32, MODES[rule])
    ref = mx.to_dtype(data, scale, MX[name], 32, torch.float32)
    assert same_bits(quantize_dequantize(x, name, scale_rule=rule), ref)  # values, signed zeros included
    q = quantize(x, name, scale_rule=rule)
    assert torch.equal(q.scale_codes, scale.view(torch.uint8))  # the E8M0 exponents
    assert same_bits(q.dequantize(), ref)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nvfp4_equals_torchao_bit_for_bit(seed):
    x = blocks(seed)
    t = nv.NVFP4Tensor.to_nvfp4(x, per_tensor_scale=nv.per_tensor_amax_to_scale(x.abs().amax()))
    ref = t.dequantize(torch.float32)
    assert same_bits(quantize_dequantize(x, "nvfp4"), ref)
    q = quantize(x, "nvfp4")
    assert torch.equal(q.scale_codes, t.scale.view(torch.uint8))  # the E4M3 block scales
    assert torch.equal(q.tensor_scale, t.per_tensor_scale)
    assert same_bits(q.dequantize(), ref)
