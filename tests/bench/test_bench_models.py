"""The benchmark's models: the linear-heavy choice, the CNN, and their quantized copies."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from omegaconf import OmegaConf

from fqtrun.bench.models import MLPBlocks, cnn_model, fqt_model, linear_model, torchao_model
from fqtrun.bench.settings import QUICK, BenchSettings
from fqtrun.quant.backends import backend_report

TINY = BenchSettings(**QUICK)


def test_mlp_choice_is_the_block_model_at_bench_sizes():
    name, model, shape, classes = linear_model(OmegaConf.create({"_target_": "fqtrun.models.mlp.MLP"}), TINY)
    assert isinstance(model, MLPBlocks) and shape == (64,) and classes == TINY.classes
    assert name == "mlp: 1 x (Linear 64->128, GELU, Linear 128->64)"
    assert model(torch.randn(5, *shape)).shape == (5, TINY.classes)


def test_other_choices_are_built_from_their_model_config():
    cfg = OmegaConf.create({"_target_": "fqtrun.models.cnn1d.CNN1D", "channels": 8})
    name, model, shape, classes = linear_model(cfg, TINY)
    assert (name, shape, classes) == ("CNN1D", (TINY.features,), TINY.classes)
    assert model(torch.randn(5, *shape)).shape == (5, TINY.classes)


def test_cnn_model_at_the_cnn_sizes():
    name, model = cnn_model(TINY)
    assert name == "cnn1d (channels 32, input 4x32, batch 16)"
    assert model(torch.randn(2, TINY.cnn_in_channels, TINY.cnn_length)).shape == (2, TINY.classes)


def test_fqt_model_quantizes_a_copy():
    model = MLPBlocks(16, 32, 1, 3)
    quantized = fqt_model(model, TINY, "int8")
    assert backend_report(model) == {}  # the original is left as it was
    report = backend_report(quantized)
    assert list(report) == ["body.0", "body.2", "head"] and all(v.startswith("int8") for v in report.values())


@pytest.mark.skipif(importlib.util.find_spec("torchao") is not None, reason="torchao is installed")
def test_torchao_model_says_why_not():
    assert torchao_model(MLPBlocks(16, 32, 1, 3)) == "not installed"


def test_a_language_model_is_built_over_token_windows():
    cfg = OmegaConf.create({"_target_": "fqtrun.models.gpt.GPT", "n_layer": 1, "n_head": 2, "n_embd": 16,
                            "block_size": 12})
    name, model, shape, vocab = linear_model(cfg, TINY)
    assert (shape, vocab) == ((12,), TINY.vocab) and name == f"GPT (12-token windows, vocabulary {TINY.vocab})"
    assert model(torch.randint(0, vocab, (3, 12))).shape == (3, 12, vocab)
