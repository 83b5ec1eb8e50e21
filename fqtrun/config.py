"""Typed schemas of every command's config, registered with Hydra's ConfigStore.

A misspelt key or a value of the wrong type fails while Hydra composes the config, naming
the key. Range checks that types cannot express live in `validate_train` (and in the objects
the groups instantiate), which raise ConfigError with one line naming the setting and the fix.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import MISSING, DictConfig, open_dict

from fqtrun.config_keys import check_known_settings
from fqtrun.errors import ConfigError
from fqtrun.numerics_mode import NumericsModeConfig
from fqtrun.quant.bits import check_bits
from fqtrun.quant.recipe import QuantConfig


# ----- optimizers (group optim: built with instantiate(cfg.optim, params=...)) -----------
@dataclass
class SGDConfig:
    _target_: str = "torch.optim.SGD"
    _partial_: bool = True
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False


@dataclass
class AdamWConfig:
    _target_: str = "torch.optim.AdamW"
    _partial_: bool = True
    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.01


@dataclass
class AdamConfig(AdamWConfig):
    _target_: str = "torch.optim.Adam"
    weight_decay: float = 0.0  # L2 in the gradient (AdamW decouples it)


# ----- learning-rate schedules (group lr: instantiate(cfg.lr)(total_steps=..., steps_per_epoch=...)) ---------
@dataclass
class ConstantLR:
    _target_: str = "fqtrun.training.lr.constant"
    _partial_: bool = True
    warmup_epochs: float = 0.0  # linear warm-up over this many epochs


@dataclass
class CosineLR:
    _target_: str = "fqtrun.training.lr.cosine"
    _partial_: bool = True
    warmup_epochs: float = 0.0
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of the peak lr


@dataclass
class StepLR:
    _target_: str = "fqtrun.training.lr.step"
    _partial_: bool = True
    warmup_epochs: float = 0.0
    milestones: list[float] = field(default_factory=lambda: [0.5, 0.75])  # fractions of training
    gamma: float = 0.1


@dataclass
class WandbConfig:
    mode: str = "offline"  # offline (default, sync later with `wandb sync`) | online | disabled
    project: str = "fqtrun"
    entity: Optional[str] = None
    tags: list[str] = field(default_factory=list)


@dataclass
class LoggerConfig:
    log_every: int = 10  # steps between metrics.jsonl train records
    progress: str = "auto"  # auto (rich bar on a terminal, plain lines otherwise) | rich | plain | none
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class CheckpointConfig:
    every: int = 1  # epochs between checkpoints (0: only at the end); always on SIGTERM/Ctrl-C
    keep_all: bool = False  # also keep epoch_NNNN.pt besides last.pt


@dataclass
class VarianceConfig:
    """Gradient-variance probe during training (spec/fqt.md, "Measuring gradient variance")."""

    every: int = 0  # steps between probes (0 = off); logs var/sampling and var/quant
    k: int = 10  # repeated FQT backward passes per batch
    batches: int = 4  # batches each probe averages over


@dataclass
class NumericsConfig(NumericsModeConfig):
    """Numerics health per quantized layer and slot (fqtrun/analysis/numerics.py): saturated and flushed
    fractions, SQNR, non-finite count, bits, in metrics.jsonl as numerics/<layer>/<slot>/<stat>; and
    `portable` (fqtrun/numerics_mode.py): the same bits on every x86-64 CPU with this torch build."""

    every: int = 0  # steps between probes (0 = off)


@dataclass
class TrainerConfig:
    """How the loop runs: its length in steps (else epochs), evaluation cadence, processes."""

    max_steps: Optional[int] = None  # stop after this many optimizer steps (null: epochs x steps per epoch)
    eval_every: int = 0  # steps between evaluations (and checkpoints); 0: at the end of every epoch
    # processes: none | ddp | fsdp (ddp, fsdp: launch with torchrun; global batch = batch_size split over the
    # ranks; fsdp also shards parameters and optimizer state over them: training/fsdp.py)
    strategy: str = "none"
    distributed: bool = False  # the older spelling of strategy=ddp (true with strategy=none means ddp)
    # torch.compile the model's forward and backward with the quantizers inside (their custom ops,
    # quant/ops.py); the first steps compile (a minute on 2 cores), numerics-probe steps run eager
    compile: bool = False


@dataclass
class TrainConfig:
    dataset: Any = MISSING
    model: Any = MISSING
    optim: Any = MISSING
    lr: Any = MISSING
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    quant: Optional[QuantConfig] = None  # +quant=<recipe>; absent = full precision
    sparsity: Any = None  # +sparsity=nm|transposable; absent = dense
    schedule: Any = MISSING  # precision schedule of the forward bits (group schedule; static = as configured)
    variance: VarianceConfig = field(default_factory=VarianceConfig)
    numerics: NumericsConfig = field(default_factory=NumericsConfig)
    threads: int = 0  # torch CPU threads (0 = torch's default)
    bits: int = 8  # feeds every quant.bits_* slot unless that slot is set (needs +quant=<recipe>)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    epochs: int = 150
    batch_size: int = 100
    eval_batch_size: int = 1000
    label_smoothing: float = 0.0
    grad_clip: float = 0.0  # max gradient norm, 0 = off
    nan_policy: str = "stop"  # stop | skip: what a NaN/inf loss (or quantized input, weight, dY) does
    resume: bool = False  # continue the run in hydra.run.dir from its last.pt
    skip_done: bool = False  # a (sweep) job whose folder already holds summary.json returns at once
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


def register_configs(cs: ConfigStore | None = None) -> None:
    """Every schema of the train config and its groups, in Hydra's ConfigStore."""
    from fqtrun.data.config import register_configs as register_data
    from fqtrun.models.config import register_configs as register_models
    from fqtrun.precision.config import register_configs as register_schedules
    from fqtrun.sparsity.config import register_configs as register_sparsity

    cs = cs or ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    for name, node in (("sgd", SGDConfig), ("adamw", AdamWConfig), ("adam", AdamConfig)):
        cs.store(group="schema/optim", name=name, node=node)
    for name, node in (("constant", ConstantLR), ("cosine", CosineLR), ("step", StepLR)):
        cs.store(group="schema/lr", name=name, node=node)
    for register in (register_data, register_models, register_schedules, register_sparsity):
        register(cs)


def validate_train(cfg, overrides: Sequence[str] = ()) -> None:
    """Range checks on a composed train config; raises ConfigError with one line.

    `overrides` (the command line's) catch settings that would do nothing: bits=N without a recipe.
    """
    checks = [
        (cfg.epochs >= 0, f"epochs={cfg.epochs} must be >= 0"),
        (cfg.batch_size >= 1, f"batch_size={cfg.batch_size} must be >= 1"),
        (cfg.eval_batch_size >= 1, f"eval_batch_size={cfg.eval_batch_size} must be >= 1"),
        (cfg.device in ("auto", "cpu", "cuda"), f"device={cfg.device!r} is unknown: use auto, cpu or cuda"),
        (cfg.nan_policy in ("stop", "skip"), f"nan_policy={cfg.nan_policy!r} is unknown: use stop or skip"),
        (cfg.logger.progress in ("auto", "rich", "plain", "none"),
         f"logger.progress={cfg.logger.progress!r} is unknown: use auto, rich, plain or none"),
        (cfg.logger.wandb.mode in ("offline", "online", "disabled"),
         f"logger.wandb.mode={cfg.logger.wandb.mode!r} is unknown: use offline, online or disabled"),
        (cfg.trainer.max_steps is None or cfg.trainer.max_steps >= 1,
         f"trainer.max_steps={cfg.trainer.max_steps} must be >= 1 (or null: epochs decide)"),
        (cfg.trainer.eval_every >= 0, f"trainer.eval_every={cfg.trainer.eval_every} must be >= 0"),
        (not (cfg.trainer.compile and cfg.numerics.portable),
         "trainer.compile=true with numerics.portable=true: compiled kernels reorder float operations, so the "
         "run would not be portable (and inductor builds no vector code under the portable pins): drop one"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(msg)
    try:
        check_bits(cfg.bits, "bits")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    bits = [o for o in overrides if o.lstrip("+~").split("=", 1)[0] == "bits"]
    if bits and cfg.quant is None:
        raise ConfigError(f"{bits[0]} sets quantizer bits but the run has no quantization recipe: add "
                          "+quant=<qat|per_tensor|per_sample|householder>, or drop bits")
    instantiate_checked(cfg.quant)  # the recipe validates itself (quant/recipe.py)


def instantiate_checked(node, **kwargs):
    """instantiate(node) (None stays None) with a bad setting's ValueError as a one-line ConfigError."""
    if node is None:
        return None
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as e:
        cause = e.__cause__
        while isinstance(cause, InstantiationException) and cause.__cause__ is not None:
            cause = cause.__cause__
        if isinstance(cause, ValueError):
            raise ConfigError(" ".join(str(cause).split())) from None
        raise


def compose_conf(config_name: str, overrides: Sequence[str], return_hydra_config: bool = False) -> DictConfig:
    """conf/<config_name>.yaml composed with the overrides, as `fqtrun <config_name>` would, whether or not a
    Hydra app on the same conf/ is already running in this process (then its config dir is used).

    A setting that no schema declares (added with +key=...) is a one-line ConfigError (config_keys)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    running = GlobalHydra.instance().is_initialized()
    conf_dir = str(Path(__file__).resolve().parent / "conf")
    with nullcontext() if running else initialize_config_dir(config_dir=conf_dir, version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=list(overrides), return_hydra_config=True)
    choices = {k: str(v) for k, v in cfg.hydra.runtime.choices.items() if v is not None}
    if not return_hydra_config:
        with open_dict(cfg):
            del cfg["hydra"]
    check_known_settings(cfg, config_name, choices)  # a +key that nothing reads is refused, not ignored
    return cfg
