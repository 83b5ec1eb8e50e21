"""model=gpt: causal (a later token never changes earlier logits), explicit Linear projections, GPT-2's
initialisation (an untrained model predicts uniformly: loss ln(vocab)), sampling, and its setting errors."""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from conftest import assert_causal
from fqtrun.build import build_model
from fqtrun.data.text import build as build_text
from fqtrun.errors import ConfigError
from fqtrun.models.gpt import GPT
from fqtrun.tasks import LanguageModel


def gpt(vocab: int = 11, block_size: int = 12, **kw) -> GPT:
    torch.manual_seed(0)
    settings = {"n_layer": 2, "n_head": 2, "n_embd": 16, **kw}
    return GPT(vocab, (block_size,), block_size=block_size, **settings).eval()


@pytest.mark.parametrize("bias,tie", [(True, True), (False, False)])
def test_a_later_token_never_changes_earlier_logits(bias, tie):
    model = gpt(bias=bias, tie_weights=tie)
    assert_causal(model)


def test_every_projection_is_an_explicit_linear_layer():
    model = gpt()
    assert not any(isinstance(m, nn.MultiheadAttention) for m in model.modules())
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    per_block = ["attn.q", "attn.k", "attn.v", "attn.out", "fc1", "fc2"]
    assert names == [f"blocks.{i}.{p}" for i in range(2) for p in per_block] + ["head"]
    assert model.head.weight is not model.tok.weight  # untied by default
    tied = gpt(tie_weights=True)
    assert tied.head.weight is tied.tok.weight
    assert sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in tied.parameters()) == 11 * 16


def test_gpt2_initialisation():
    model = gpt(n_layer=4, n_embd=64, vocab=50)
    assert model.tok.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert model.blocks[0].fc2.weight.std().item() == pytest.approx(0.02 / math.sqrt(8), rel=0.1)
    assert all(float(m.bias.detach().abs().max()) == 0 for m in model.modules() if isinstance(m, nn.Linear) and m.bias is not None)


@pytest.mark.parametrize("tie,rel", [(False, 0.02), (True, 0.04)])
def test_an_untrained_model_predicts_uniformly(tie, rel):
    """Loss of the fresh default-sized model on the embedded corpus: ln(vocab) within 2% untied (measured
    +0.3% on Python 3.11's corpus, +1.0% on 3.12's: random logits add their variance); within 4% tied, where the input token's own logit is
    higher (h . e_in, h the normalised e_in), which favours repeated characters (measured -3.0%)."""
    bundle = build_text(None, "char", block_size=64, val_windows=64)
    torch.manual_seed(0)
    model = GPT(bundle.num_classes, bundle.input_shape, tie_weights=tie)
    loss = LanguageModel().evaluate(model, bundle.test, 64, torch.device("cpu"))["loss"]
    assert loss == pytest.approx(math.log(bundle.num_classes), rel=rel)


def test_generate_appends_tokens_and_top_k_1_is_greedy():
    model = gpt()
    idx = torch.tensor([[1, 2, 3]])
    out = model.generate(idx, 15, top_k=1)  # longer than block_size: the context is cropped
    assert out.shape == (1, 18) and torch.equal(out[:, :3], idx)
    for t in range(3, 18):
        assert int(out[0, t]) == int(model(out[:, max(0, t - 12):t])[0, -1].argmax())


@pytest.mark.parametrize("kw,needle", [
    ({"n_embd": 18, "n_head": 4}, "model.n_embd=18 is not divisible by model.n_head=4"),
    ({"block_size": 4}, "windows of 12 tokens exceed model.block_size=4"),
    ({"dropout": 1.0}, "model.dropout=1.0"),
    ({"n_layer": 0}, "model.n_layer=0"),
])
def test_bad_settings_raise_one_line(kw, needle):
    settings = {"n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 12, **kw}
    with pytest.raises(ValueError) as e:
        GPT(11, (12,), **settings)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_model_and_data_must_be_for_the_same_task(tmp_path):
    text = build_text(None, "char", block_size=8, val_windows=2)
    with pytest.raises(ConfigError, match=r"pair model=llama \(or model=gpt\) with dataset=text"):
        build_model(OmegaConf.create({"_target_": "fqtrun.models.mlp.MLP"}), text)
    from fqtrun.data.synthetic import build as synthetic

    with pytest.raises(ConfigError, match=r"built for language model but dataset=synthetic is for classification"):
        build_model(OmegaConf.create({"_target_": "fqtrun.models.gpt.GPT", "block_size": 64}), synthetic())
