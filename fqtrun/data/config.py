"""Typed schemas of the `dataset` config group; conf/dataset/<name>.yaml extends one of them.

Hydra validates every YAML and override against these (a misspelt key or a wrong type stops
the run at composition); hydra.utils.instantiate(cfg.dataset) calls `_target_` -> DataBundle.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from hydra.core.config_store import ConfigStore
from omegaconf import II


@dataclass
class Mnist1dConfig:
    _target_: str = "fqtrun.data.mnist1d.build"
    cache_dir: str = "~/.cache/fqtrun"  # generated once, then read from here
    seed: int = 42                      # make_dataset's seed (42 = the published dataset)


@dataclass
class DigitsConfig:
    _target_: str = "fqtrun.data.digits.build"
    test_fraction: float = 0.2
    seed: int = 0  # of the stratified train/test split


@dataclass
class SyntheticConfig:
    _target_: str = "fqtrun.data.synthetic.build"
    input_shape: list[int] = field(default_factory=lambda: [40])
    num_classes: int = 10
    n_train: int = 1000
    n_test: int = 200
    seed: int = 0


@dataclass
class Cifar10Config:
    _target_: str = "fqtrun.data.cifar.build_cifar10"
    root: str = "???"     # folder holding cifar-10-batches-py/
    augment: bool = True  # RandomCrop(32, pad 4) + horizontal flip on train


@dataclass
class Cifar100Config:
    _target_: str = "fqtrun.data.cifar.build_cifar100"
    root: str = "???"     # folder holding cifar-100-python/
    augment: bool = True


@dataclass
class ImagenetConfig:
    _target_: str = "fqtrun.data.imagenet.build"
    root: str = "???"  # folder holding train/ and val/, one sub-folder per class
    crop: int = 224    # train RandomResizedCrop and val CenterCrop size
    resize: int = 256  # val Resize before the centre crop


@dataclass
class TextConfig:
    _target_: str = "fqtrun.data.text.build"
    root: Optional[str] = None  # a text file or a folder of .txt files; null: the embedded CPython docs
    # char (vocabulary from the training split) | byte (256 symbols) | bpe (byte-level BPE trained on the
    # training split, saved with the run) | the path of a tokenizer.json to use as it is
    tokenizer: str = "bpe"
    block_size: Optional[int] = II("oc.select:model.block_size,null")  # window length: model.block_size
    val_fraction: float = 0.1  # the last 10% of the tokens is the validation split
    val_windows: int = 1000  # at most this many validation windows (evenly spaced over the split)
    vocab_size: Optional[int] = None  # tokenizer=bpe only: its size, 256 bytes + merges (null: 1024)


@dataclass
class TokensConfig:
    _target_: str = "fqtrun.data.tokens.build"
    root: str = "???"  # a folder with train.bin and val.bin (nanoGPT's format; `fqtrun prepare` writes one)
    block_size: Optional[int] = II("oc.select:model.block_size,null")  # window length: model.block_size
    vocab_size: Optional[int] = None  # the model's vocabulary (null: the folder's meta.json / meta.pkl)
    val_windows: int = 1000  # at most this many validation windows (evenly spaced over val.bin)


SCHEMAS = {"mnist1d": Mnist1dConfig, "digits": DigitsConfig, "synthetic": SyntheticConfig,
           "cifar10": Cifar10Config, "cifar100": Cifar100Config, "imagenet": ImagenetConfig, "text": TextConfig,
           "tokens": TokensConfig}


def register_configs(cs: ConfigStore) -> None:
    """Store each schema as schema/dataset/<name>, which conf/dataset/<name>.yaml extends."""
    for name, node in SCHEMAS.items():
        cs.store(group="schema/dataset", name=name, node=node)
