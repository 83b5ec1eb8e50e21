"""Dense -> N:M reconstruction pieces (spec sparsity.md, "Training with masks"): the per-row least
squares, the conv's GEMM operand, BN re-estimation."""

from __future__ import annotations

import math

import numpy
import pytest
import torch
from torch import nn

from fqtrun.sparsity.reconstruct import gemm_input, reestimate_bn, solve_rows


def test_solve_rows_matches_lstsq_per_row():
    """Each row: least squares on its own kept columns (numpy lstsq on the ridge-augmented system)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 12, generator=g, dtype=torch.float64)  # (samples, fan_in)
    w = torch.randn(5, 12, generator=g, dtype=torch.float64)
    keep = torch.rand(5, 12, generator=g) < 0.5
    keep[:, 0] = True
    h = x.T @ x
    damping = 1e-3
    got = solve_rows(h, w, keep, damping)
    lam = damping * float(h.diagonal().mean())
    for i in range(5):
        k = keep[i].numpy()
        a = numpy.vstack([x.numpy()[:, k], math.sqrt(lam) * numpy.eye(k.sum())])
        b = numpy.concatenate([x.numpy() @ w[i].numpy(), numpy.zeros(k.sum())])
        ref = numpy.zeros(12)
        ref[k] = numpy.linalg.lstsq(a, b, rcond=None)[0]
        numpy.testing.assert_allclose(got[i].numpy(), ref, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("conv", [nn.Conv1d(3, 4, 3, stride=2, padding=1), nn.Conv2d(3, 4, (3, 2), padding=(1, 0),
                                                                                       dilation=(1, 2))])
def test_gemm_input_reproduces_the_conv(conv):
    x = torch.randn(2, 3, *([9] if isinstance(conv, nn.Conv1d) else [7, 6]), generator=torch.Generator().manual_seed(1))
    cols = gemm_input(conv, x)  # (B * positions, C * k)
    y = conv(x)
    ref = y.reshape(y.shape[0], y.shape[1], -1).transpose(1, 2).reshape(-1, y.shape[1])
    torch.testing.assert_close(cols @ conv.weight.reshape(4, -1).T + conv.bias, ref, rtol=1e-5, atol=1e-5)


def test_bn_reestimation_is_the_average_over_batches():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Dropout(0.5)).eval()
    model[1].running_mean.fill_(7.0)
    batches = [torch.randn(16, 4) * (i + 1) for i in range(3)]
    assert reestimate_bn(model, batches) == 1
    with torch.no_grad():
        h = [model[0](x) for x in batches]
    torch.testing.assert_close(model[1].running_mean, torch.stack([v.mean(0) for v in h]).mean(0))
    torch.testing.assert_close(model[1].running_var, torch.stack([v.var(0) for v in h]).mean(0))
    assert model[1].momentum == 0.1 and not model.training and not model[1].training
