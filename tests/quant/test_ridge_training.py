"""Ridge (denoising) dequantization as a training option: quant.dequant=ridge (spec/denoise_bn.md A)."""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from conftest import TINY
from fqtrun.config import validate_train
from fqtrun.errors import ConfigError
from fqtrun.quant import grid
from fqtrun.quant.convert import convert, quant_layers
from fqtrun.quant.layers import NoiseContext
from fqtrun.quant.quantizers import MinMaxQuantizer, RidgeQuantizer
from fqtrun.quant.recipe import QuantConfig, slot_factory
from fqtrun.quant.ridge import ridge_quantize
from fqtrun.runs.train import run_training


def _recipe(**kw) -> QuantConfig:
    cfg = OmegaConf.structured(QuantConfig)
    cfg.bits_w = cfg.bits_a = cfg.bits_dx = cfg.bits_dw = kw.pop("bits", 4)
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def _mask_2_4(w: torch.Tensor) -> torch.Tensor:
    """Keep the 2 largest |w| of every 4 consecutive weights of a row (slow obvious loop, test only)."""
    m = torch.zeros_like(w, dtype=torch.bool)
    for r in range(w.shape[0]):
        for g in range(0, w.shape[1], 4):
            m[r, g + w[r, g:g + 4].abs().topk(2).indices] = True
    return m


# ----- the quantizer -------------------------------------------------------------------------------
@pytest.mark.parametrize("bits,ternary,form", [(1, False, "affine"), (2, True, "linear"), (4, False, "affine")])
def test_quantizer_matches_ridge_quantize_and_codes(bits, ternary, form):
    torch.manual_seed(0)
    x = torch.randn(6, 32)
    q = RidgeQuantizer(bits, form=form, block=16, ternary=ternary)
    ref = ridge_quantize(x, "ternary" if ternary else bits, form, 0.01, "block", 16, 0)
    assert torch.equal(q(x), ref)
    c = q.codes(x)
    assert torch.equal(c.codes, c.codes.round())
    top = 1 if (ternary or bits == 1 or form == "linear") else 2**bits - 1
    assert c.codes.abs().max() <= top
    torch.testing.assert_close(c.dequantize(), ref, rtol=1e-5, atol=1e-6)


def test_mask_fits_dense_weights_and_keeps_pruned_at_zero():
    torch.manual_seed(1)
    w = torch.randn(8, 16, requires_grad=True)
    mask = _mask_2_4(w.detach())
    q = RidgeQuantizer(2, form="affine")
    y = q(w, mask=mask)
    assert torch.all(y[~mask] == 0)  # sparsity contract: the forward uses pruned entries as exact zeros
    ref = ridge_quantize(w.detach(), 2, "affine", 0.01, mask=mask)  # the fit against the dense w
    torch.testing.assert_close(y[mask], ref[mask])
    y.pow(2).sum().backward()
    assert torch.isfinite(w.grad).all() and (w.grad[~mask] != 0).any()  # straight-through to dense w
    with pytest.raises(ValueError, match="quant.ternary=true"):
        RidgeQuantizer(1)(w, mask=mask)


def test_recipe_validation_and_factory():
    from fqtrun.quant.recipe import validate

    for bad, match in (({"dequant": "x"}, "quant.dequant"), ({"block": 128}, "needs quant.dequant=ridge"),
                       ({"ternary": True}, "needs quant.dequant=ridge"),
                       ({"dequant": "ridge", "bits": 16}, "quant.bits_w=16"),
                       ({"dequant": "ridge", "ridge_form": "cubic"}, "quant.ridge_form"),
                       ({"dequant": "ridge", "ridge_lambda": -1.0}, "quant.ridge_lambda"),
                       ({"dequant": "ridge", "block": 0}, "quant.block=0")):
        with pytest.raises(ValueError, match=match):
            validate(_recipe(**bad))
    make = slot_factory(_recipe(dequant="ridge", block=128))
    w, a = make("w", nn.Linear(2, 2)), make("a", nn.Linear(2, 2))
    assert isinstance(w, RidgeQuantizer) and w.block == 128 and isinstance(a, RidgeQuantizer)
    assert isinstance(slot_factory(_recipe())("w", nn.Linear(2, 2)), MinMaxQuantizer)


def test_ste_default_is_the_min_max_fake_quant():
    """dequant=ste (default) still computes linear(minmax(x), minmax(w)) with grid's formulas."""
    assert QuantConfig().dequant == "ste"
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(12, 5))
    convert(model, slot_factory(_recipe(bits=3)), NoiseContext())
    x = torch.randn(7, 12)

    def fq(t):
        s, z = grid.minmax_grid(t, 3)
        return (torch.clamp(torch.round(t / s) + z, 0, 7) - z) * s

    lin = model[0]
    torch.testing.assert_close(model(x), fq(x) @ fq(lin.weight.detach()).t() + lin.bias.detach())


def test_ridge_gradient_reaches_weights_through_the_fit():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(16, 8))
    convert(model, slot_factory(_recipe(bits=2, dequant="ridge")), NoiseContext())
    lin = model[0]
    x = torch.randn(10, 16)
    model(x).square().sum().backward()
    # independent: autograd through ridge_quantize of the weights (activations fixed at their ridge values)
    w = lin.weight.detach().clone().requires_grad_(True)
    xq = ridge_quantize(x, 2, "affine", 0.01)
    (xq @ ridge_quantize(w, 2, "affine", 0.01).t() + lin.bias.detach()).square().sum().backward()
    torch.testing.assert_close(lin.weight.grad, w.grad)
    ste = xq.t() @ (2 * (xq @ ridge_quantize(w, 2).detach().t() + lin.bias.detach()))  # STE would give this
    assert not torch.allclose(lin.weight.grad, ste.t(), rtol=1e-3)


# ----- training -------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides", [
    ["+quant=qat", "bits=1", "quant.dequant=ridge"],
    ["+quant=qat", "bits=2", "quant.dequant=ridge", "quant.ternary=true", "quant.ridge_form=linear"],
    ["+quant=qat", "quant.bits_w=1", "quant.bits_a=4", "quant.dequant=ridge", "quant.block=128"],
    ["+quant=per_sample", "bits=4", "quant.dequant=ridge"],
], ids=["A1W1", "ternary", "W1A4-block128", "per_sample-fqt"])
def test_ridge_trains_without_nan(compose_train, tmp_path, overrides):
    cfg = compose_train(*TINY, "epochs=1", *overrides)
    summary = run_training(cfg, tmp_path)
    assert summary["steps"] == 20 and summary["skipped_steps"] == 0
    assert math.isfinite(summary["final_train_loss"]) and math.isfinite(summary["final_test_loss"])
    assert len(summary["layers_quantized"]) == 4


def test_per_sample_backward_stays_fqt_with_ridge(compose_train):
    cfg = compose_train("+quant=per_sample", "bits=4", "quant.dequant=ridge")
    validate_train(cfg)
    make = slot_factory(cfg.quant)
    assert isinstance(make("w", nn.Linear(2, 2)), RidgeQuantizer) and make("dx", nn.Linear(2, 2)) is not None


def test_bad_ridge_setting_is_one_line(compose_train):
    with pytest.raises(ConfigError, match="quant.block=64 needs quant.dequant=ridge"):
        validate_train(compose_train("+quant=qat", "quant.block=64"))


@pytest.mark.parametrize("recipe", [dict(bits=2, dequant="ridge"), dict(bits=2, dequant="ridge", ternary=True),
                                    dict(bits=2, dequant="ridge", grad="per_sample")])
def test_sparse_ridge_training_steps(recipe):
    """2:4 masks set on the layers directly (as the sparsity hook does): finite steps, zeros stay zero."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4))
    convert(model, slot_factory(_recipe(**recipe)), NoiseContext())
    for _, layer in quant_layers(model):
        layer.weight_mask = _mask_2_4(layer.weight.detach())
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = torch.randn(64, 32), torch.randint(0, 4, (64,))
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    first = model[0]
    with torch.no_grad():
        w_hat = first.slots["w"](first.weight, mask=first.weight_mask)
        assert torch.all(w_hat[~first.weight_mask] == 0)
        # the layer feeds the ridge quantizer the dense W and the mask (fit against dense W), not W * mask
        expect = nn.functional.linear(first.slots["a"](x), w_hat, first.bias)
        torch.testing.assert_close(first(x), expect)
        masked_fit = nn.functional.linear(first.slots["a"](x), first.slots["w"](first.weight * first.weight_mask),
                                          first.bias)
        assert not torch.allclose(first(x), masked_fit)
