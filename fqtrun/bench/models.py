"""The models the benchmark times (the linear-heavy model choice and a CNN) and their quantized copies."""

from __future__ import annotations

import copy

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from fqtrun.bench.settings import BenchSettings
from fqtrun.build import build_recipe, quantize_model
from fqtrun.models.cnn1d import CNN1D
from fqtrun.quant.layers import NoiseContext
from fqtrun.quant.recipe import QuantConfig


class MLPBlocks(nn.Module):
    """blocks x (Linear width->hidden, GELU, Linear hidden->width), then a Linear classifier."""

    def __init__(self, width: int, hidden: int, blocks: int, classes: int):
        super().__init__()
        layers: list[nn.Module] = []
        for _ in range(blocks):
            layers += [nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width)]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def linear_model(model_cfg: DictConfig, s: BenchSettings) -> tuple[str, nn.Module, tuple[int, ...], int]:
    """(name, model, input shape, classes or vocabulary) of the linear-heavy model: model=mlp means MLPBlocks at the bench
    sizes; a language model (model=gpt) is built from its model config over windows of its
    block_size tokens and a bench.vocab vocabulary; any other choice on a (bench.features,) signal."""
    if str(model_cfg._target_).endswith("mlp.MLP"):
        name = f"mlp: {s.blocks} x (Linear {s.width}->{s.hidden}, GELU, Linear {s.hidden}->{s.width})"
        return name, MLPBlocks(s.width, s.hidden, s.blocks, s.classes), (s.width,), s.classes
    make = instantiate(model_cfg, _partial_=True)
    name = str(model_cfg._target_).rsplit(".", 1)[-1]
    if getattr(make.func, "task", "classification") == "language_model":
        shape = (int(model_cfg.block_size),)
        return f"{name} ({shape[0]}-token windows, vocabulary {s.vocab})", make(s.vocab, shape), shape, s.vocab
    shape = (s.features,)
    return name, make(num_classes=s.classes, input_shape=shape), shape, s.classes


def cnn_model(s: BenchSettings) -> tuple[str, nn.Module]:
    """(name, model) of the CNN: CNN1D at the bench.cnn_* sizes."""
    name = f"cnn1d (channels {s.cnn_channels}, input {s.cnn_in_channels}x{s.cnn_length}, batch {s.cnn_batch})"
    return name, CNN1D(s.classes, (s.cnn_in_channels, s.cnn_length), channels=s.cnn_channels)


def fqt_model(model: nn.Module, s: BenchSettings, backend: str) -> nn.Module:
    """A copy of `model` with every layer FQT-quantized at bench.bits (bench.grad for dX) on `backend`."""
    m = copy.deepcopy(model)
    recipe = build_recipe(OmegaConf.structured(QuantConfig(
        name=f"fqt-{backend}", grad=s.grad, bits_w=s.bits, bits_a=s.bits, bits_dx=s.bits, bits_dw=s.bits,
        backend=backend, compile=s.compile)))
    quantize_model(recipe, False, m, NoiseContext(seed=0))
    return m


def format_model(model: nn.Module, s: BenchSettings) -> nn.Module:
    """A copy of `model` with every layer in bench.step_format (RHT16 and SR on the gradient slots)."""
    m = copy.deepcopy(model)
    recipe = build_recipe(OmegaConf.structured(QuantConfig(
        name=s.step_format, format=s.step_format, grad_transform="rht", bits_w=8, bits_a=8, bits_dx=8, bits_dw=8)))
    quantize_model(recipe, False, m, NoiseContext(seed=0))
    return m


def torchao_model(model: nn.Module) -> nn.Module | str:
    """torchao's int8 mixed-precision training on a copy, or why not."""
    try:
        from torchao.prototype.quantized_training import int8_mixed_precision_training
        from torchao.quantization import quantize_
    except ImportError:
        return "not installed"
    m = copy.deepcopy(model)
    try:
        quantize_(m, int8_mixed_precision_training(), filter_fn=lambda mod, name: isinstance(mod, nn.Linear))
    except Exception as err:  # noqa: BLE001 (version mismatch: report, do not fail the bench)
        return f"failed: {err!r:.80}"
    return m
