"""model=llama: one block against a slow reference written out by hand (RMSNorm, rotary by explicit cos/sin per
position and pair, attention by explicit softmax per query, GQA by head repetition, SwiGLU), causality, the
parameter count, setting errors, every projection quantizable, a real training run and sampling, and
HuggingFace's LlamaForCausalLM with our weights giving the same logits, loss and gradients."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch import nn
from transformers import LlamaConfig as HFLlamaConfig
from transformers import LlamaForCausalLM

from conftest import CONF, assert_causal
from fqtrun.build import build_model, build_recipe
from fqtrun.commands.common import user_error
from fqtrun.data.text import build as build_text
from fqtrun.errors import ConfigError
from fqtrun.models.llama import Llama, swiglu_hidden
from fqtrun.quant.convert import convert, quant_layers
from fqtrun.quant.layers import NoiseContext
from fqtrun.quant.recipe import slot_factory
from fqtrun.runs.sample import run_sample
from fqtrun.runs.train import run_training
from fqtrun.tasks import LanguageModel

PROJECTIONS = ["attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down"]


def llama(vocab: int = 11, block_size: int = 12, **kw) -> Llama:
    torch.manual_seed(0)
    settings = {"n_layer": 2, "n_head": 4, "dim": 16, **kw}
    return Llama(vocab, (block_size,), block_size=block_size, **settings).eval()


def randomize_norms(model: nn.Module) -> None:
    """RMSNorm weights start at 1; random ones make the reference check their use too."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))


# ----------------------------------------------------------------------------- the slow reference
def ref_rmsnorm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def ref_rotate(vec: torch.Tensor, pos: int, theta: float) -> torch.Tensor:
    """One head's vector at position pos: pair (i, i + hs/2) turned by the angle pos * theta^(-2i / hs)."""
    hs = vec.shape[0]
    out = vec.clone()
    for i in range(hs // 2):
        angle = pos * theta ** (-2 * i / hs)
        a, b = vec[i], vec[i + hs // 2]
        out[i] = a * math.cos(angle) - b * math.sin(angle)
        out[i + hs // 2] = a * math.sin(angle) + b * math.cos(angle)
    return out


def ref_block(x: torch.Tensor, block: nn.Module, n_head: int, n_kv_head: int, theta: float, eps: float):
    """One Llama block in float64, every step spelt out: x (B, T, D) -> (B, T, D)."""
    x = x.double()
    W = {n: p.detach().double() for n, p in block.named_parameters()}
    b_, t_, d = x.shape
    hs, group = d // n_head, n_head // n_kv_head
    h = ref_rmsnorm(x, W["attn_norm.weight"], eps)
    q = (h @ W["attn.q.weight"].T).reshape(b_, t_, n_head, hs)
    k = (h @ W["attn.k.weight"].T).reshape(b_, t_, n_kv_head, hs)
    v = (h @ W["attn.v.weight"].T).reshape(b_, t_, n_kv_head, hs)
    k = torch.stack([k[:, :, j // group] for j in range(n_head)], dim=2)  # GQA: query head j reads kv head j // group
    v = torch.stack([v[:, :, j // group] for j in range(n_head)], dim=2)
    att = torch.zeros(b_, t_, n_head, hs, dtype=torch.float64)
    for b in range(b_):
        for j in range(n_head):
            keys = [ref_rotate(k[b, s, j], s, theta) for s in range(t_)]
            for t in range(t_):
                qt = ref_rotate(q[b, t, j], t, theta)
                scores = torch.stack([qt @ keys[s] / math.sqrt(hs) for s in range(t + 1)])  # only s <= t
                p = torch.exp(scores - scores.max())
                p = p / p.sum()
                att[b, t, j] = sum(p[s] * v[b, s, j] for s in range(t + 1))
    x = x + att.reshape(b_, t_, d) @ W["attn.o.weight"].T
    h = ref_rmsnorm(x, W["mlp_norm.weight"], eps)
    gate = h @ W["mlp.gate.weight"].T
    silu = gate / (1 + torch.exp(-gate))
    return x + (silu * (h @ W["mlp.up.weight"].T)) @ W["mlp.down.weight"].T


@pytest.mark.parametrize("n_head,n_kv_head", [(4, 4), (4, 2), (4, 1)])
def test_one_block_equals_the_slow_reference(n_head, n_kv_head):
    model = llama(n_head=n_head, n_kv_head=n_kv_head, rope_theta=100.0, norm_eps=1e-3)  # small theta: big angles
    randomize_norms(model)
    block = model.blocks[0]
    assert block.attn.k.out_features == n_kv_head * 4 and block.attn.q.out_features == 16
    x = torch.randn(2, 7, 16, generator=torch.Generator().manual_seed(1))
    out = block(x, model.rope_cos[:7], model.rope_sin[:7])
    torch.testing.assert_close(out.double(), ref_block(x, block, n_head, n_kv_head, 100.0, 1e-3),
                               atol=1e-5, rtol=1e-5)


def test_swiglu_width_is_llamas_rule():
    # the published Llama MLP widths (multiple_of=256): 7B dim 4096 -> 11008, 13B dim 5120 -> 13824
    assert swiglu_hidden(4096, 256) == 11008 and swiglu_hidden(5120, 256) == 13824
    assert swiglu_hidden(64, 32) == 192  # the default: int(8 * 64 / 3) = 170, up to 192
    assert llama().blocks[0].mlp.gate.out_features == swiglu_hidden(16, 32) == 64
    assert llama(ffn_hidden=24).blocks[0].mlp.down.in_features == 24


# ----------------------------------------------------------------------------- the model's contracts
@pytest.mark.parametrize("kw", [{}, {"n_kv_head": 2, "tie_weights": True}])
def test_a_later_token_never_changes_earlier_logits(kw):
    model = llama(**kw)
    assert_causal(model)


def llama_params(vocab: int, n_layer: int, dim: int, n_head: int, n_kv_head: int, hidden: int, tied: bool) -> int:
    """Embedding + per block (q, o: dim^2; k, v: dim * n_kv_head * head size; gate, up, down: dim * hidden; two
    RMSNorms) + final RMSNorm + head (none when tied)."""
    kv = n_kv_head * (dim // n_head)
    block = 2 * dim * dim + 2 * dim * kv + 3 * dim * hidden + 2 * dim
    return vocab * dim + n_layer * block + dim + (0 if tied else vocab * dim)


@pytest.mark.parametrize("kw,n_kv_head,hidden", [({}, 4, 64), ({"n_kv_head": 1, "tie_weights": True}, 1, 64),
                                                 ({"n_layer": 3, "dim": 24, "n_head": 2, "ffn_hidden": 40}, 2, 40)])
def test_parameter_count_formula(kw, n_kv_head, hidden):
    model = llama(**kw)
    s = {"n_layer": 2, "dim": 16, "n_head": 4, **kw}
    expected = llama_params(11, s["n_layer"], s["dim"], s["n_head"], n_kv_head, hidden, kw.get("tie_weights", False))
    assert sum(p.numel() for p in model.parameters()) == expected


def test_the_default_size_is_the_documented_count():
    """docs/llama.md states the default model's count on the embedded corpus's character vocabulary."""
    assert llama_params(103, 4, 64, 4, 4, 192, False) == 226_752
    assert sum(p.numel() for p in Llama(103, (64,)).parameters()) == 226_752


def test_no_biases_and_every_projection_is_a_linear():
    model = llama()
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert names == [f"blocks.{i}.{p}" for i in range(2) for p in PROJECTIONS] + ["head"]
    assert all(m.bias is None for m in model.modules() if isinstance(m, nn.Linear))
    assert {n for n, _ in model.named_parameters() if "bias" in n} == set()
    assert model.head.weight is not model.tok.weight
    tied = llama(tie_weights=True)
    assert tied.head.weight is tied.tok.weight
    assert "rope_cos" not in model.state_dict()  # derived from the settings, not checkpointed


@pytest.mark.parametrize("recipe", ["per_sample", "nvfp4"])
def test_a_recipe_converts_all_eight_projections(recipe):
    """With keep_last (the head) and keep_last_blocks off, every q, k, v, o, gate, up, down and the head quantize."""
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        node = compose(config_name="train", overrides=[f"+quant={recipe}", "logger.wandb.mode=disabled"]).quant
    model = llama(n_kv_head=2, dim=32, block_size=16)  # 16-element format blocks fit every reduction
    report = convert(model, slot_factory(build_recipe(node)), NoiseContext(seed=0))
    assert report.converted == [f"blocks.{i}.{p}" for i in range(2) for p in PROJECTIONS] + ["head"]
    assert len(list(quant_layers(model))) == 15
    x = torch.randint(0, 11, (2, 16))
    loss = LanguageModel().loss(model.train()(x), x)
    loss.backward()
    assert math.isfinite(loss.item())
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("kw,needle", [
    ({"n_kv_head": 3}, "model.n_kv_head=3 does not divide model.n_head=4"),
    ({"dim": 18}, "model.dim=18 is not divisible by model.n_head=4"),
    ({"dim": 12}, "model.dim / model.n_head = 3 is odd"),
    ({"block_size": 4}, "windows of 12 tokens exceed model.block_size=4"),
    ({"n_layer": 0}, "model.n_layer=0"),
    ({"norm_eps": 0.0}, "model.norm_eps=0.0"),
    ({"ffn_hidden": 0}, "model.ffn_hidden=0"),
])
def test_bad_settings_raise_one_line(kw, needle):
    settings = {"n_layer": 1, "n_head": 4, "dim": 16, "block_size": 12, **kw}
    with pytest.raises(ConfigError) as e:
        Llama(11, (12,), **settings)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_the_kv_head_error_lists_the_divisors():
    with pytest.raises(ConfigError, match=r"pick n_kv_head among 1, 2, 3, 6$"):
        Llama(11, (12,), n_head=6, n_kv_head=4, dim=24, block_size=12)


def test_llama_pairs_with_text_only():
    text = build_text(None, "char", block_size=8, val_windows=2)
    model = build_model(OmegaConf.create({"_target_": "fqtrun.models.llama.Llama", "block_size": 8}), text)
    assert isinstance(model, Llama) and model.head.out_features == text.num_classes
    from fqtrun.data.synthetic import build as synthetic

    with pytest.raises(ConfigError, match=r"\(Llama\) is built for language model but dataset=synthetic"):
        build_model(OmegaConf.create({"_target_": "fqtrun.models.llama.Llama", "block_size": 64}), synthetic())


# ----------------------------------------------------------------------------- through the trainer
SENTENCE = "the quick brown fox jumps over the lazy dog. "
TINY = ["model=llama", "dataset=text", "dataset.tokenizer=char", "model.n_layer=2", "model.n_head=4", "model.n_kv_head=2", "model.dim=32",
        "model.block_size=16", "batch_size=16", "eval_batch_size=64", "trainer.max_steps=40", "trainer.eval_every=40",
        "logger.log_every=10", "dataset.val_windows=16", "optim.lr=1e-2", "optim.weight_decay=0"]


def test_train_with_a_recipe_then_sample(tmp_path: Path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(SENTENCE * 60)
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name="train", overrides=["logger.wandb.mode=disabled", "logger.progress=none",
                                                      f"dataset.root={corpus}", *TINY, "+quant=per_sample"])
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    OmegaConf.save(cfg, run / ".hydra" / "config.yaml")
    s = run_training(cfg, run)
    assert s["steps"] == 40 and s["layers_quantized"] == [f"blocks.{i}.{p}" for i in range(2) for p in PROJECTIONS]
    assert s["layers_full_precision"] == {"head": "last layer (quant.keep_last)", "tok": "embedding lookup (no GEMM)"}
    vocab = len(set(SENTENCE))
    # 40 steps on one repeated sentence: far below the uniform ln(vocab) = 3.3 nats
    assert s["final_test_loss"] < 0.5 * math.log(vocab), s["final_test_loss"]
    prompt, text = run_sample(OmegaConf.create({"checkpoint": str(run), "prompt": "the quick", "tokens": 30,
                                                "temperature": 1.0, "top_k": None, "seed": 0, "device": "cpu",
                                                "threads": 0}))
    assert len(text) == 30 and set(text) <= set(SENTENCE)


def test_the_kv_head_error_through_the_trainer_is_one_line(tmp_path: Path):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name="train", overrides=["logger.wandb.mode=disabled", *TINY, "model.n_kv_head=3"])
    with pytest.raises(Exception) as info:  # noqa: PT011 (hydra wraps it; user_error unwraps)
        run_training(cfg, tmp_path)
    err = user_error(info.value)
    assert isinstance(err, ConfigError) and str(err).startswith("model.n_kv_head=3 does not divide model.n_head=4")


# ----------------------------------------------------------------------------- peer: HuggingFace transformers
def to_hf(model: Llama, n_head: int, n_kv_head: int, theta: float, eps: float, tied: bool) -> LlamaForCausalLM:
    """LlamaForCausalLM built from a config of the same sizes (nothing downloaded), our weights copied in."""
    block = model.blocks[0]
    config = HFLlamaConfig(vocab_size=model.head.out_features, hidden_size=model.tok.embedding_dim,
                           intermediate_size=block.mlp.gate.out_features, num_hidden_layers=len(model.blocks),
                           num_attention_heads=n_head, num_key_value_heads=n_kv_head,
                           max_position_embeddings=model.block_size, rms_norm_eps=eps, rope_theta=theta,
                           tie_word_embeddings=tied, attention_bias=False, mlp_bias=False,
                           attn_implementation="eager")
    hf = LlamaForCausalLM(config).eval()
    names = {"attn.q": "self_attn.q_proj", "attn.k": "self_attn.k_proj", "attn.v": "self_attn.v_proj",
             "attn.o": "self_attn.o_proj", "mlp.gate": "mlp.gate_proj", "mlp.up": "mlp.up_proj",
             "mlp.down": "mlp.down_proj", "attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"}
    ours = dict(model.named_parameters())
    with torch.no_grad():
        hf.model.embed_tokens.weight.copy_(ours["tok.weight"])
        hf.model.norm.weight.copy_(ours["norm.weight"])
        if not tied:
            hf.lm_head.weight.copy_(ours["head.weight"])
        for i, layer in enumerate(hf.model.layers):
            for mine, theirs in names.items():
                layer.get_submodule(theirs).weight.copy_(ours[f"blocks.{i}.{mine}.weight"])
    assert sum(p.numel() for p in hf.parameters()) == sum(p.numel() for p in model.parameters())
    return hf


@pytest.mark.parametrize("n_kv_head,tied", [(4, False), (2, True)])
def test_huggingface_llama_gives_the_same_logits_loss_and_gradients(n_kv_head, tied):
    model = llama(vocab=37, block_size=16, n_layer=2, n_head=4, n_kv_head=n_kv_head, dim=32, rope_theta=500.0,
                  tie_weights=tied)
    randomize_norms(model)
    hf = to_hf(model, 4, n_kv_head, 500.0, 1e-5, tied)
    windows = torch.randint(0, 37, (3, 17), generator=torch.Generator().manual_seed(2))  # T + 1 tokens
    x, y = windows[:, :-1], windows[:, 1:]
    logits = model(x)
    loss = LanguageModel().loss(logits, y)
    out = hf(input_ids=windows, labels=windows)  # HF shifts the labels itself
    torch.testing.assert_close(logits, out.logits[:, :-1], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(loss, out.loss, atol=1e-6, rtol=1e-5)
    loss.backward()
    out.loss.backward()
    torch.testing.assert_close(model.blocks[1].attn.k.weight.grad, hf.model.layers[1].self_attn.k_proj.weight.grad,
                               atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(model.blocks[0].mlp.gate.weight.grad, hf.model.layers[0].mlp.gate_proj.weight.grad,
                               atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(model.tok.weight.grad, hf.model.embed_tokens.weight.grad, atol=1e-6, rtol=1e-4)
