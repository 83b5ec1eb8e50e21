"""quant/native.py: the C kernel of BHQ's reflection against the torch form it replaces.

Oracle: the same transform's torch operations (native.reflect forced off). On CPUs with FMA the
kernel makes the same roundings, so the values must be equal bit for bit; elsewhere to fp32
rounding. Plus: the build is cached, and a missing compiler falls back with a warning.
"""

from __future__ import annotations

import pytest
import torch

from fqtrun.quant import native
from fqtrun.quant.gradient import block_householder_transform, make_gradient_quantizer
from fqtrun.quant.grid import covering_grid, span_grid, sr_quantize


def transform_and_input(n: int, k: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k, generator=g) * torch.exp(2 * torch.randn(n, 1, generator=g))
    x[: max(1, n // 8)] *= 1000  # a few dominant rows: groups of several sizes
    return block_householder_transform(x.amax(dim=1) - x.amin(dim=1)), x


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if "-mfma" in native._flags():
        return torch.equal(a, b)
    return torch.allclose(a, b, rtol=1e-6, atol=1e-6 * float(b.abs().max()))


@pytest.mark.parametrize("n,k", [(1, 5), (2, 7), (37, 300), (256, 129)])
def test_kernel_equals_the_torch_form(n, k, monkeypatch):
    if native._library() is None:
        pytest.skip("no C compiler here: the torch form is what runs")
    t, x = transform_and_input(n, k, seed=n + k)
    q = make_gradient_quantizer("bhq", 4)
    fast = [t.apply(x), t.householder(x), t.inverse(x), t.inverse_(x.clone()), q(x, 9)]
    monkeypatch.setattr(native, "reflect", lambda *args, **kwargs: None)
    monkeypatch.setattr(native, "sr_inverse", lambda *args, **kwargs: None)
    slow = [t.apply(x), t.householder(x), t.inverse(x), t.inverse_(x.clone()), q(x, 9)]
    for a, b in zip(fast[:4], slow[:4]):
        assert same(a, b)
    if "-mfma" in native._flags():  # SR noise, roundings and T^-1 as the torch path: the same output
        assert torch.equal(fast[4], slow[4])
    else:
        torch.testing.assert_close(fast[4], slow[4], rtol=0, atol=float(slow[4].abs().max()) * 2**-3)


@pytest.mark.parametrize("bits", [2, 5, 8])
@pytest.mark.parametrize("kind", ["span", "zero-aligned"])
def test_fused_sr_and_inverse_equal_the_two_torch_passes(bits, kind, monkeypatch):
    if native._library() is None:
        pytest.skip("no C compiler here: the torch form is what runs")
    t, x = transform_and_input(48, 200, seed=bits)
    y = t.apply(x)
    scale, zero, lo = span_grid(y, bits, keep_dim=0) if kind == "span" else (*covering_grid(y, bits, keep_dim=0), None)
    fused = native.sr_inverse(y, scale, zero, lo, bits, 11, t.group, t.weight, t.coef, t.row_scale)
    monkeypatch.setattr(native, "reflect", lambda *args, **kwargs: None)
    ref = t.inverse(sr_quantize(y, scale, zero, bits, 11, dequant=True, lo=lo))  # eager torch SR, same noise
    assert same(fused, ref)


def test_kernel_declines_what_it_cannot_take():
    t, x = transform_and_input(8, 16, seed=1)
    out = torch.empty_like(x)
    assert native.reflect(out, x.double(), t.group, t.weight, t.coef) is None  # float64
    assert native.reflect(out, x.t(), t.group, t.weight, t.coef) is None  # not contiguous
    xg = x.clone().requires_grad_()
    assert native.reflect(out, xg, t.group, t.weight, t.coef) is None  # autograd cannot see it
    assert native.reflect(out, x.to("meta"), t.group, t.weight, t.coef) is None  # no data


def test_build_is_cached_and_a_missing_compiler_falls_back(tmp_path, monkeypatch):
    monkeypatch.setenv("FQTRUN_NATIVE_CACHE", str(tmp_path / "cache"))
    native._library.cache_clear()
    try:
        if native._library() is not None:  # a compiler is here: the library lands in the cache
            assert len(list((tmp_path / "cache").glob("bhq-*.so"))) == 1
        native._library.cache_clear()
        monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
        monkeypatch.setenv("FQTRUN_NATIVE_CACHE", str(tmp_path / "other"))
        with pytest.warns(UserWarning, match="native kernel unavailable"):
            assert native._library() is None
        t, x = transform_and_input(16, 40, seed=2)
        assert native.reflect(torch.empty_like(x), x, t.group, t.weight, t.coef) is None
        y = t.inverse(t.apply(x))  # the torch form runs instead
        torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-4 * float(x.abs().max()))
    finally:
        native._library.cache_clear()
