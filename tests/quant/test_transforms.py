"""The random Hadamard transform (spec/formats.md, RHT): R = H_g diag(sigma) / sqrt(g) blockwise against a
dense Sylvester construction, R R^T = I, a GEMM of transformed operands equals the plain GEMM, inverse
undoes forward, signs are a pure function of the key, bad settings refuse."""

from __future__ import annotations

import math

import pytest
import torch

from fqtrun.quant.transforms import RandomHadamard, make_transform


def sylvester(g: int) -> torch.Tensor:
    """H_g by the Kronecker definition, float64, entries +-1."""
    h = torch.ones(1, 1, dtype=torch.float64)
    for _ in range(int(math.log2(g))):
        h = torch.kron(torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64), h)
    return h


@pytest.mark.parametrize("g", [16, 32, 64, 128])
def test_forward_is_x_times_the_dense_r_and_r_is_orthogonal(g):
    t = RandomHadamard(g)
    n = 3 * g
    r = t.forward(torch.eye(n), 1, key=11).double()  # rows of the identity: R itself, blockwise
    sigma = t.sign_vector(n, 11, "cpu").double()
    dense = torch.block_diag(*[sylvester(g) @ torch.diag(sigma[i:i + g]) / math.sqrt(g) for i in range(0, n, g)])
    assert torch.allclose(r, dense, atol=1e-6)
    assert torch.allclose(r @ r.t(), torch.eye(n, dtype=torch.float64), atol=1e-6)
    assert set(sigma.tolist()) == {-1.0, 1.0}


@pytest.mark.parametrize("g", [16, 32, 128])
def test_a_gemm_of_transformed_operands_equals_the_plain_gemm(g):
    t = RandomHadamard(g)
    a = torch.randn(50, 90) * 3
    b = torch.randn(90, 40)
    at, bt = t.forward(a, 1, 5), t.forward(b, 0, 5)  # along the reduction, one key: R cancels
    assert at.shape[1] == bt.shape[0] == t.padded(90)
    assert torch.allclose(at @ bt, a @ b, atol=1e-4, rtol=1e-5)
    assert not torch.allclose(at @ t.forward(b, 0, 6), a @ b, atol=1e-2)  # other signs do not cancel


def test_inverse_undoes_forward_along_any_dim():
    t = RandomHadamard(32)
    x = torch.randn(3, 40, 7)
    for dim in (0, 1, 2, -1):
        y = t.forward(x, dim, 9)
        assert y.shape[dim % 3] == t.padded(x.shape[dim])
        back = t.inverse(y, dim, 9).narrow(dim, 0, x.shape[dim])
        assert torch.allclose(back, x, atol=1e-5)


def test_signs_are_a_pure_function_of_the_key():
    t = RandomHadamard(16)
    assert torch.equal(t.sign_vector(64, 3, "cpu"), t.sign_vector(64, 3, "cpu"))
    assert not torch.equal(t.sign_vector(64, 3, "cpu"), t.sign_vector(64, 4, "cpu"))
    assert 16 < (t.sign_vector(64, 3, "cpu") > 0).sum() < 48


@pytest.mark.parametrize("kwargs,match", [({"name": "dct"}, "rht"), ({"name": "rht", "block": 24}, "rht_block=24"),
                                          ({"name": "rht", "signs": "often"}, "rht_signs")])
def test_bad_settings_refuse(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_transform(**kwargs)
    assert make_transform(None) is None and make_transform("none") is None
