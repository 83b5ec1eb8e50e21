"""Typed schemas of the `model` config group; conf/model/<name>.yaml extends one of them.

num_classes and input_shape are not settings: the trainer passes them from the DataBundle,
hydra.utils.instantiate(cfg.model, num_classes=..., input_shape=...).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from hydra.core.config_store import ConfigStore


@dataclass
class MlpConfig:
    _target_: str = "fqtrun.models.mlp.MLP"
    hidden: list[int] = field(default_factory=lambda: [100, 100])  # widths of the hidden layers


@dataclass
class Cnn1dConfig:
    _target_: str = "fqtrun.models.cnn1d.CNN1D"
    channels: int = 25  # the MNIST-1D paper's width


@dataclass
class TransformerConfig:
    _target_: str = "fqtrun.models.transformer.Transformer"
    dim: int = 64
    depth: int = 2          # encoder blocks
    heads: int = 4
    mlp_ratio: float = 4.0  # MLP width / dim
    patch: int = 4          # patch length (1-D) or side (images)


@dataclass
class GPTConfig:
    _target_: str = "fqtrun.models.gpt.GPT"
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 64  # width; a multiple of n_head (64: the most learnt in a 3-minute CPU run, README)
    block_size: int = 64  # context length: the positions learned, and the text dataset's window
    dropout: float = 0.0
    bias: bool = True  # biases in the Linear and LayerNorm layers
    # true: the output head shares the token embedding's weights (GPT-2; the untrained model then favours
    # repeating its input token, loss 3% below ln(vocab)). false: an independent head, which quantizes alone
    tie_weights: bool = False


@dataclass
class LlamaConfig:
    _target_: str = "fqtrun.models.llama.Llama"
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: Optional[int] = None  # key/value heads, dividing n_head (grouped-query attention); null: n_head
    dim: int = 64  # width; a multiple of n_head with an even head size (rotary pairs)
    ffn_hidden: Optional[int] = None  # SwiGLU width; null: Llama's 8/3 dim rounded up to multiple_of (64 -> 192)
    multiple_of: int = 32
    norm_eps: float = 1e-5  # RMSNorm's epsilon
    rope_theta: float = 10000.0  # rotary base: pair i turns by pos * rope_theta^(-2i / head size)
    block_size: int = 64  # context length: the positions the rotary tables cover, and the text dataset's window
    tie_weights: bool = False  # true: the output head shares the token embedding's weights


@dataclass
class ResNetCifarConfig:
    _target_: str = "fqtrun.models.resnet_cifar.ResNetCifar"
    depth: int = 20        # 6n+2
    shortcut: str = "A"    # A: zero-pad (He et al. CIFAR), B: 1x1 conv projection
    preact: bool = False   # pre-activation blocks (He et al. 2016b)


@dataclass
class TorchvisionConfig:
    _target_: str = "fqtrun.models.torchvision_models.build"
    arch: str = "resnet18"  # resnet18 | resnet50 | mobilenet_v2


SCHEMAS = {"mlp": MlpConfig, "cnn1d": Cnn1dConfig, "transformer": TransformerConfig, "gpt": GPTConfig,
           "llama": LlamaConfig, "resnet_cifar": ResNetCifarConfig, "torchvision": TorchvisionConfig}


def register_configs(cs: ConfigStore) -> None:
    """Store each schema as schema/model/<name>, which conf/model/<option>.yaml extends."""
    for name, node in SCHEMAS.items():
        cs.store(group="schema/model", name=name, node=node)
