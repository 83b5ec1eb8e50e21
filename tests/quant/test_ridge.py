"""Ridge dequantization (spec/denoise_bn.md part A) against independent references."""

import pytest
import torch

from fqtrun.quant.ridge import ridge_codes, ridge_fit, ridge_quantize, round_codes, scaled_input

BITS = [1, 2, 3, 4, 8, "ternary"]
FORMS = ["affine", "linear"]


def _lstsq_fit(x: torch.Tensor, q: torch.Tensor, lam: float, form: str) -> torch.Tensor:
    """Numerical minimiser of mean((x - s q - c)^2) + lam s^2 (c = 0 for linear), via an augmented lstsq."""
    n = x.numel()
    cols = [q / n**0.5] + ([torch.full_like(q, 1 / n**0.5)] if form == "affine" else [])
    design = torch.stack(cols, 1)  # (n, p)
    penalty = torch.zeros(1, design.shape[1], dtype=x.dtype)
    penalty[0, 0] = lam**0.5  # only the slope is penalised
    sol = torch.linalg.lstsq(torch.cat([design, penalty]), torch.cat([x / n**0.5, x.new_zeros(1)])[:, None]).solution
    return q * sol[0, 0] + (sol[1, 0] if form == "affine" else 0.0)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("lam", [0.0, 0.01, 0.5])
def test_closed_form_is_the_ridge_minimiser(bits, form, lam):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 200, generator=g, dtype=torch.float64) * torch.tensor([[0.1], [1.0], [3.0]]) + 0.3
    y = ridge_quantize(x, bits, form, lam=lam, granularity="channel")
    codes = ridge_codes(x, bits, form, granularity="channel")
    for c in range(3):
        ref = _lstsq_fit(x[c], codes[c], lam, form)
        torch.testing.assert_close(y[c], ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("form", FORMS)
def test_fit_of_x_on_itself_is_identity(form):
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(2), dtype=torch.float64) + 2.0
    torch.testing.assert_close(ridge_fit(x, x, lam=0.0, form=form), x, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(ridge_fit(x, x, lam=0.5, form=form), x)  # the ridge penalty does shrink


def test_constant_codes_without_ridge_stay_finite():
    x = torch.randn(2, 50, generator=torch.Generator().manual_seed(3), dtype=torch.float64, requires_grad=True)
    q = torch.full_like(x, 3.0)
    y = ridge_fit(x, q, lam=0.0, form="affine")
    torch.testing.assert_close(y, x.detach().mean(-1, keepdim=True).expand_as(x))  # least squares: mean x
    y.sum().backward()
    assert torch.isfinite(x.grad).all()
    y_lin = ridge_fit(x, torch.zeros_like(x), lam=0.0, form="linear")
    assert torch.equal(y_lin, torch.zeros_like(x))
    # an all-constant input through the whole quantizer: constant codes, finite output
    const = torch.full((4, 16), 0.7, dtype=torch.float64, requires_grad=True)
    for bits in BITS:
        for form in FORMS:
            out = ridge_quantize(const, bits, form, lam=0.0, granularity="channel")
            out.sum().backward()
            assert torch.isfinite(out).all() and torch.isfinite(const.grad).all(), (bits, form)
            const.grad = None
    zeros = torch.zeros(3, 8, dtype=torch.float64)
    for bits in BITS:
        assert torch.equal(ridge_quantize(zeros, bits, "affine", lam=0.0), zeros)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("bits", [1, 3, "ternary"])
def test_gradcheck_through_fit_with_detached_residual(bits, form):
    """The backward of ridge_quantize is the true derivative of f(x) + fixed rounding residual."""
    g = torch.Generator().manual_seed(4)
    x0 = (torch.randn(2, 12, generator=g, dtype=torch.float64) + 0.2).requires_grad_(True)
    residual = (round_codes(scaled_input(x0, bits, form), bits, form) - scaled_input(x0, bits, form)).detach()

    def surrogate(x):
        return ridge_fit(x, scaled_input(x, bits, form) + residual, lam=0.01, form=form)

    assert torch.autograd.gradcheck(surrogate, (x0,), eps=1e-6, atol=1e-6)
    # ridge_quantize has this very forward value and gradient
    w = torch.randn(2, 12, generator=g, dtype=torch.float64)
    (gq,) = torch.autograd.grad((ridge_quantize(x0, bits, form, granularity="channel") * w).sum(), x0)
    (gs,) = torch.autograd.grad((surrogate(x0) * w).sum(), x0)
    torch.testing.assert_close(ridge_quantize(x0, bits, form, granularity="channel"), surrogate(x0))
    torch.testing.assert_close(gq, gs)
    assert gq.abs().sum() > 0


def _slow_channel(x, bits, form, channel_dim):
    out = torch.empty_like(x)
    for c in range(x.shape[channel_dim]):
        sl = x.select(channel_dim, c)
        out.select(channel_dim, c).copy_(ridge_quantize(sl, bits, form, granularity="tensor"))
    return out


def _slow_block(x, bits, form, channel_dim, block):
    moved = x.movedim(channel_dim, 0)
    out = torch.empty_like(moved)
    for c in range(moved.shape[0]):
        flat = moved[c].reshape(-1)
        pieces = [ridge_quantize(flat[i:i + block], bits, form) for i in range(0, flat.numel(), block)]
        out[c] = torch.cat(pieces).reshape(moved[c].shape)
    return out.movedim(0, channel_dim)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("bits", [1, 4, "ternary"])
@pytest.mark.parametrize("channel_dim", [0, 1, -1])
def test_channel_and_block_granularity_match_slow_loops(bits, form, channel_dim):
    x = torch.randn(3, 5, 20, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    x = x * torch.rand(3, 5, 1, generator=torch.Generator().manual_seed(6), dtype=torch.float64) * 4
    fast = ridge_quantize(x, bits, form, granularity="channel", channel_dim=channel_dim)
    torch.testing.assert_close(fast, _slow_channel(x, bits, form, channel_dim), rtol=1e-12, atol=1e-12)
    for block in (7, 20, 33):  # ragged last block, exact fit, and a block longer than a row in some layouts
        fast = ridge_quantize(x, bits, form, granularity="block", block=block, channel_dim=channel_dim)
        slow = _slow_block(x, bits, form, channel_dim, block)
        torch.testing.assert_close(fast, slow, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("bits", [2, 4, "ternary"])
def test_mask_gives_zero_level_and_fits_dense_x(bits, form):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(4, 64, generator=g, dtype=torch.float64) + 0.5
    mask = torch.rand(4, 64, generator=g) > 0.5
    codes = ridge_codes(x, bits, form, granularity="channel", mask=mask)
    sparse = torch.where(mask, x, torch.zeros_like(x))
    if form == "affine" and bits != "ternary":  # zero level z = round(-lo / s_f) over the sparse input
        lo = sparse.amin(-1, keepdim=True).clamp(max=0)
        hi = sparse.amax(-1, keepdim=True).clamp(min=0)
        zero = torch.round(-lo / ((hi - lo) / (2**bits - 1)))
    else:
        zero = torch.zeros(4, 1, dtype=x.dtype)
    assert torch.equal(codes[~mask], zero.expand_as(x)[~mask])
    assert torch.equal(codes, ridge_codes(sparse, bits, form, granularity="channel"))  # codes of mask * x
    y = ridge_quantize(x, bits, form, granularity="channel", mask=mask)
    dense_fit = torch.stack([_lstsq_fit(x[c], codes[c], 0.01, form) for c in range(4)])
    sparse_fit = torch.stack([_lstsq_fit(sparse[c], codes[c], 0.01, form) for c in range(4)])
    torch.testing.assert_close(y, dense_fit, rtol=1e-9, atol=1e-9)
    if form == "affine":
        assert (y - sparse_fit).abs().max() > 1e-3  # the fit really uses the dense x
    else:  # q = 0 at masked entries, so mean(q x) cannot see them: both fits agree, masked y is exactly 0
        torch.testing.assert_close(y, sparse_fit, rtol=1e-9, atol=1e-9)
        assert torch.equal(y[~mask], torch.zeros_like(y[~mask]))
    # gradient reaches masked entries through the straight-through mask and the dense statistics
    xr = x.clone().requires_grad_(True)
    ridge_quantize(xr, bits, form, granularity="channel", mask=mask).pow(2).sum().backward()
    assert (xr.grad[~mask] != 0).any()


def test_bad_settings_raise():
    x = torch.randn(4, 4)
    with pytest.raises(ValueError, match="bits"):
        ridge_quantize(x, 9)
    with pytest.raises(ValueError, match="form"):
        ridge_quantize(x, 4, form="log")
    with pytest.raises(ValueError, match="lam"):
        ridge_quantize(x, 4, lam=-1.0)
    with pytest.raises(ValueError, match="granularity"):
        ridge_quantize(x, 4, granularity="row")
    with pytest.raises(ValueError, match="channel_dim"):
        ridge_quantize(x, 4, granularity="channel", channel_dim=2)
    with pytest.raises(ValueError, match="ternary"):
        ridge_quantize(x, 1, mask=x > 0)
    with pytest.raises(ValueError, match="mask"):
        ridge_quantize(x, 4, mask=(x > 0).float())
