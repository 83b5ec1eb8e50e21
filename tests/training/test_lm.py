"""`fqtrun train model=gpt dataset=text` end to end: learning a repetitive corpus, sampling it back, exact
resume after SIGTERM, every technique on the LM, per-token gradient rows, checkpoint and prompt errors."""

from __future__ import annotations

import copy
import json
import math
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch import nn

import fqtrun.commands.prt  # noqa: F401 (registers the prt and variance config schemas)
import fqtrun.commands.variance  # noqa: F401
from conftest import CONF
from fqtrun.build import DEFAULT_HOOKS
from fqtrun.commands.common import user_error
from fqtrun.errors import CheckpointError, ConfigError
from fqtrun.models.gpt import GPT
from fqtrun.quant.convert import convert, quant_layers
from fqtrun.quant.layers import NoiseContext
from fqtrun.quant.recipe import QuantConfig, slot_factory
from fqtrun.runs.sample import load_sampler, run_sample
from fqtrun.runs.train import run_training
from fqtrun.tasks import LanguageModel
from fqtrun.training.hooks import Hook, HookSpec
from fqtrun.training.trainer import Interrupted

SENTENCE = "the quick brown fox jumps over the lazy dog. "
# a tiny GPT on a short corpus: each step takes milliseconds
TINY_LM = ["model=gpt", "dataset=text", "dataset.tokenizer=char", "model.n_layer=1", "model.n_head=2", "model.n_embd=32", "model.block_size=16",
           "batch_size=8", "eval_batch_size=64", "trainer.max_steps=8", "trainer.eval_every=4", "logger.log_every=2",
           "dataset.val_windows=16"]


@pytest.fixture
def corpus(tmp_path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(SENTENCE * 60)
    return path


@pytest.fixture
def compose_lm(corpus):
    def make(*overrides: str, config_name: str = "train"):
        base = ["logger.wandb.mode=disabled", "logger.progress=none", f"dataset.root={corpus}", *TINY_LM]
        with initialize_config_dir(config_dir=CONF, version_base="1.3"):
            return compose(config_name=config_name, overrides=[*base, *overrides])

    return make


def records(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if "time" not in k}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def train(cfg, folder: Path, **kw) -> dict:
    """run_training into a run folder as `fqtrun train` leaves it (with .hydra/config.yaml, unresolved)."""
    (folder / ".hydra").mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, folder / ".hydra" / "config.yaml")
    return run_training(cfg, folder, **kw)


def one_line_error(fn) -> str:
    """The one-line message of the user error `fn` raises (as the CLI would print it)."""
    with pytest.raises(Exception) as info:  # noqa: PT011 (any error type; user_error decides)
        fn()
    err = user_error(info.value)
    assert err is not None, info.value
    return str(err)


LEARN = ["trainer.max_steps=250", "trainer.eval_every=250", "batch_size=16", "optim.lr=3e-3", "optim.weight_decay=0"]


def test_a_few_hundred_steps_on_a_repetitive_corpus_drive_the_loss_near_zero(compose_lm, tmp_path):
    """Every character of the repeated alphabet determines the next: the loss can reach zero at every position."""
    corpus = tmp_path / "abc.txt"
    corpus.write_text("abcdefghijklmnopqrstuvwxyz " * 80)
    summary = run_training(compose_lm(*LEARN, f"dataset.root={corpus}"), tmp_path / "run")
    assert summary["final_test_loss"] < 0.05, summary  # ln(27) = 3.3 at the start
    assert summary["final_test_acc"] == 1.0 and summary["headline"] == "loss"
    assert summary["final_test_bpc"] == pytest.approx(summary["final_test_loss"] / math.log(2))
    assert summary["final_test_ppl"] == pytest.approx(math.exp(summary["final_test_loss"]))
    data = summary["data"]
    assert data["vocab_size"] == 27 and data["block_size"] == 16 and data["tokenizer"] == "char"


def test_sampling_a_model_trained_on_one_repeated_sentence_reproduces_it(compose_lm, tmp_path):
    train(compose_lm(*LEARN), tmp_path)
    prompt, text = run_sample(OmegaConf.create({"checkpoint": str(tmp_path), "prompt": "the quick", "tokens": 90,
                                                "temperature": 0.5, "top_k": None, "seed": 0, "device": "cpu",
                                                "threads": 0}))
    assert prompt + text == (SENTENCE * 3)[:len(prompt) + 90]


class SigtermAt(Hook):
    """Sends this process SIGTERM after step `at`, as a scheduler preempting the job would."""

    def __init__(self, at: int):
        self.at = at

    def after_step(self, step: int, batch: dict) -> dict:
        if step == self.at:
            os.kill(os.getpid(), signal.SIGTERM)
        return {}


def test_resume_after_sigterm_reproduces_the_lm_run_exactly(compose_lm, tmp_path):
    overrides = ["+quant=per_sample", "bits=5", "schedule=cyclic", "schedule.cycles=2", "schedule.min_bits=3", "trainer.max_steps=12"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    run_training(compose_lm(*overrides), full)
    kill = (*DEFAULT_HOOKS, HookSpec("sigterm", None, lambda node, facts: SigtermAt(7)))
    with pytest.raises(Interrupted):
        run_training(compose_lm(*overrides), cut, hook_specs=kill)
    assert (cut / "last.pt").is_file() and not (cut / "summary.json").exists()
    run_training(compose_lm(*overrides, "resume=true"), cut)
    assert records(cut) == records(full)
    a, b = (torch.load(p / "last.pt", weights_only=True)["model"] for p in (full, cut))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_summary_says_which_layers_were_quantized(compose_lm, tmp_path):
    s = run_training(compose_lm("+quant=householder", "bits=5"), tmp_path)
    block = ["attn.q", "attn.k", "attn.v", "attn.out", "fc1", "fc2"]
    assert s["layers_quantized"] == [f"blocks.0.{n}" for n in block]
    assert s["layers_full_precision"] == {"head": "last layer (quant.keep_last)", "tok": "embedding lookup (no GEMM)",
                                          "pos": "embedding lookup (no GEMM)"}
    assert s["quant"].startswith("householder: w5 a5") and s["bits_used"] == {"w": 5, "a": 5, "dx": 5, "dw": 5}
    head = run_training(compose_lm("+quant=qat", "quant.keep_last=false", "quant.keep_first=true"), tmp_path / "h")
    assert "head" in head["layers_quantized"] and head["layers_full_precision"]["blocks.0.attn.q"].startswith("first")


@pytest.mark.parametrize("overrides,check", [
    (["+quant=per_tensor", "bits=4"], lambda s: s["final_test_loss"] < 4),
    (["+quant=per_sample", "schedule=cyclic", "schedule.cycles=2", "schedule.min_bits=5", "schedule.max_bits=8"],
     lambda s: s["gbitops"] > 0 and s["eval_bits"] == 8),
    (["+sparsity=transposable", "sparsity.n=2", "sparsity.m=4"],
     lambda s: set(s["sparsity"]["density"]) == {f"blocks.0.{n}" for n in ("attn.q", "attn.k", "attn.v", "attn.out",
                                                                         "fc1", "fc2")}
     and all(d == 0.5 for d in s["sparsity"]["density"].values())),
    (["+sparsity=nm", "+quant=householder", "bits=5"], lambda s: len(s["layers_quantized"]) == 6),
    (["+quant=qat", "bits=4", "quant.dequant=ridge"], lambda s: s["quant"].startswith("qat: w4 a4")),
    (["+quant=per_sample", "quant.backend=int8"],
     lambda s: all(v.startswith("int8") for v in s["layer_backends"].values())),
    (["+quant=per_sample", "bits=4", "variance.every=4", "variance.batches=2", "variance.k=2"],
     lambda s: s["final_var_quant"] > 0 and s["final_var_sampling"] > 0),
    (["+quant=householder", "bits=4", "batch_size=1"], lambda s: s["steps"] == 8),
    (["label_smoothing=0.1"], lambda s: math.isfinite(s["final_test_loss"])),
])
def test_every_technique_applies_to_the_lm(compose_lm, tmp_path, overrides, check):
    summary = run_training(compose_lm(*overrides), tmp_path)
    assert summary["steps"] == 8 and math.isfinite(summary["final_train_loss"])
    assert check(summary), summary


# ----------------------------------------------------------------------------- FQT on the GPT
def tiny_gpt_pair(grad: str, bits: int):
    """(FQT model, its NoiseContext, the same model under QAT) of one small GPT."""
    torch.manual_seed(0)
    model = GPT(13, (10,), n_layer=1, n_head=2, n_embd=16, block_size=10)
    qat = copy.deepcopy(model)
    convert(qat, slot_factory(QuantConfig(grad=None, bits_w=8, bits_a=8, bits_dx=8, bits_dw=8)), NoiseContext())
    noise = NoiseContext(seed=0)
    convert(model, slot_factory(QuantConfig(grad=grad, bits_w=8, bits_a=8, bits_dx=bits, bits_dw=bits)), noise)
    return model, noise, qat


@pytest.mark.parametrize("grad", ["per_tensor", "per_sample", "householder"])
def test_fqt_gradients_of_the_gpt_are_unbiased(grad):
    """E||mean_K - g_QAT||^2 = V / K (the test_fqt_layers oracle, on the GPT): the log-log slope of the squared
    error over K in {4, 16, 64} is -1 within 0.3, and each error is within a factor 3 of V / K."""
    model, noise, qat = tiny_gpt_pair(grad, 3)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, 13, (4, 10), generator=g), torch.randint(0, 13, (4, 10), generator=g)
    task = LanguageModel()
    params = list(qat.parameters())
    g_qat = torch.cat([p.reshape(-1) for p in torch.autograd.grad(task.loss(qat(x), y), params)]).double()
    loss = task.loss(model(x), y)
    draws = []
    for j in range(4 + 16 + 64):
        noise.draw = j
        grads = torch.autograd.grad(loss, list(model.parameters()), retain_graph=True)
        draws.append(torch.cat([d.reshape(-1) for d in grads]))
    draws = torch.stack(draws).double()
    v = float((draws - g_qat).pow(2).sum(1).mean())
    ks = [4, 16, 64]  # disjoint draws for each K
    errs = [float((chunk.mean(0) - g_qat).pow(2).sum()) for chunk in torch.split(draws, ks)]
    slope = np.polyfit(np.log(ks), np.log(errs), 1)[0]
    assert -1.3 <= slope <= -0.7, (slope, errs)
    for k, e in zip(ks, errs):
        assert 1 / 3 <= e * k / v <= 3, (k, e * k / v)


def test_gradient_quantizers_see_one_row_per_token():
    """dY of every quantized Linear reaches the dX and dW quantizers as (B * T, features): per-sample and
    Householder quantizers treat each token as a row."""
    model, _, _ = tiny_gpt_pair("per_sample", 4)
    seen: dict[str, list] = {}
    for name, layer in quant_layers(model):
        for slot in ("dx", "dw"):
            q = layer.slots[slot]

            def spy(g, seed, q=q, key=f"{name}.{slot}"):
                seen.setdefault(key, []).append(tuple(g.shape))
                return q(g, seed)

            spy.bits = q.bits
            layer.slots[slot] = spy
    x = torch.randint(0, 13, (3, 10))
    LanguageModel().loss(model(x), x).backward()
    assert seen["blocks.0.fc1.dx"] == [(30, 64)] and seen["blocks.0.attn.q.dw"] == [(30, 16)]
    assert seen["head.dx"] == [(30, 13)] and len(seen) == 2 * 7  # the block's 6 Linears and the head


# ----------------------------------------------------------------------------- checkpoints and sampling
def test_a_checkpoint_of_another_vocabulary_or_window_is_refused(compose_lm, corpus, tmp_path):
    train(compose_lm("+quant=per_sample"), tmp_path / "run")
    other = tmp_path / "other.txt"
    other.write_text("Pack my box with five dozen liquor jugs. " * 60)
    msg = one_line_error(lambda: run_training(compose_lm("+quant=per_sample", f"dataset.root={other}",
                                                         "resume=true"), tmp_path / "run"))
    assert "was trained with dataset.root (its vocabulary) giving a 28-symbol vocabulary" in msg, msg
    assert "pass the dataset.root (its vocabulary) the run was trained with" in msg
    msg = one_line_error(lambda: run_training(compose_lm("+quant=per_sample", "model.block_size=8", "resume=true"),
                                              tmp_path / "run"))
    assert "was trained with model.block_size giving 16, this run gives 8: pass the model.block_size" in msg
    from fqtrun.runs.variance import run_study

    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name="variance", overrides=[*TINY_LM[:7], f"dataset.root={other}",
                                                         f"checkpoint={tmp_path / 'run'}"])
    msg = one_line_error(lambda: run_study(cfg, tmp_path / "v", "gpt"))
    assert "(its vocabulary)" in msg and "\n" not in msg


def test_variance_study_of_a_trained_lm(compose_lm, corpus, tmp_path):
    from fqtrun.runs.variance import run_study

    train(compose_lm("+quant=qat"), tmp_path / "run")
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name="variance", overrides=[*TINY_LM[:7], f"dataset.root={corpus}",
                                                         f"checkpoint={tmp_path / 'run'}", "variance.bits=[4,8]",
                                                         "variance.k=2", "variance.batches=2",
                                                         "variance.batch_size=4", "variance.quantizers=[per_sample]"])
    data, _ = run_study(cfg, tmp_path / "v", "gpt")
    q = data["quantization"]["per_sample"]
    assert q["4"]["total"] > q["8"]["total"] > 0 and data["sampling"]["total"] > 0
    assert {"tok", "pos", "blocks.0.attn.q", "blocks.0.fc2"} <= set(data["layers"])  # head: tied to tok


def test_quantized_models_sample_at_their_evaluation_bits(compose_lm, tmp_path):
    train(compose_lm("+quant=per_sample", "schedule=cyclic", "schedule.cycles=2", "schedule.min_bits=3", "schedule.max_bits=6"), tmp_path)
    model, tokenizer = load_sampler(str(tmp_path / "last.pt"))
    bits = {q.bits for _, layer in quant_layers(model) for s in ("w", "a") if (q := layer.slots[s]) is not None}
    assert bits == {6} and not model.training and tokenizer.kind == "char"


@pytest.mark.parametrize("prompt,needle", [
    ("the QUICK", "prompt='the QUICK': characters 'CIKQU' are not in the vocabulary of the run's corpus"),
    ("", "prompt is empty"),
])
def test_prompt_errors(compose_lm, tmp_path, prompt, needle):
    train(compose_lm(), tmp_path)
    cfg = OmegaConf.create({"checkpoint": str(tmp_path), "prompt": prompt, "tokens": 5, "temperature": 1.0,
                            "top_k": None, "seed": 0, "device": "cpu", "threads": 0})
    assert needle in one_line_error(lambda: run_sample(cfg))


def test_sample_refuses_a_classification_run(compose_train, tmp_path):
    from conftest import TINY

    train(compose_train(*TINY, "trainer.max_steps=2"), tmp_path)
    cfg = OmegaConf.create({"checkpoint": str(tmp_path), "prompt": "x", "tokens": 5, "temperature": 1.0,
                            "top_k": None, "seed": 0, "device": "cpu", "threads": 0})
    with pytest.raises(ConfigError, match="fqtrun sample needs a language-model run"):
        run_sample(cfg)


def test_lm_setting_errors_are_one_line(compose_lm, tmp_path):
    msg = one_line_error(lambda: run_training(compose_lm("model.n_embd=30", "model.n_head=4"), tmp_path))
    assert "model.n_embd=30 is not divisible by model.n_head=4" in msg
    msg = one_line_error(lambda: run_training(compose_lm("dataset.root=/nonexistent/x.txt"), tmp_path))
    assert msg.startswith("dataset.root=/nonexistent/x.txt does not exist")


def test_a_classifier_on_text_is_refused(corpus, tmp_path):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name="train", overrides=["dataset=text", f"dataset.root={corpus}", "model=cnn1d",
                                                      "logger.wandb.mode=disabled"])
    assert "dataset=text needs a window length: use model=llama or model=gpt" in one_line_error(lambda: run_training(cfg, tmp_path))
    cfg.dataset.block_size = 8
    assert "pair model=llama (or model=gpt) with dataset=text" in one_line_error(lambda: run_training(cfg, tmp_path))


def test_checkpoint_data_signature_is_stored(compose_lm, tmp_path):
    run_training(compose_lm(), tmp_path)
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    assert ckpt["data"] == {"dataset.tokenizer": "char", "model.block_size": 16,
                            "dataset.root (its vocabulary)": "".join(sorted(set(SENTENCE)))}
    with pytest.raises(CheckpointError):
        from fqtrun.data.base import check_signature

        check_signature(ckpt["data"], {**ckpt["data"], "dataset.tokenizer": "byte"}, tmp_path)


def test_prt_runs_on_the_lm(compose_lm):
    from fqtrun.runs.prt import run_precision_range_test

    cfg = compose_lm("+quant=per_sample", "prt.b_start=7", "prt.b_max=8", "prt.steps_per_bits=4", "prt.window=2",
                     config_name="prt")
    res = run_precision_range_test(cfg)
    assert list(res.trace) and all(len(t.accs) == 4 and all(0 <= a <= 1 for a in t.accs) for t in res.trace.values())


def test_label_smoothing_is_not_the_validation_loss():
    task, smooth = LanguageModel(), LanguageModel(label_smoothing=0.1)
    out, y = torch.randn(2, 5, 7), torch.randint(0, 7, (2, 5))
    ref = nn.functional.cross_entropy(out.reshape(-1, 7), y.reshape(-1))
    torch.testing.assert_close(task.loss(out, y), ref)
    torch.testing.assert_close(smooth.eval_loss(out, y), ref)
    torch.testing.assert_close(task.loss(out, y, reduction="sum"), ref * 2)  # a window is one sample
    assert not torch.allclose(smooth.loss(out, y), ref)
