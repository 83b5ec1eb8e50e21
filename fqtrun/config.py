"""Typed schemas of every command's config, registered with Hydra's ConfigStore.

A misspelt key or a value of the wrong type fails while Hydra composes the config, naming
the key. Range checks that types cannot express live in `validate_train`, which raises
ConfigError with one line naming the setting and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from fqtrun.errors import ConfigError
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
class AdamConfig:
    _target_: str = "torch.optim.Adam"
    _partial_: bool = True
    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0


@dataclass
class LRConfig:
    """Learning-rate schedule (group lr): per-step, with linear warm-up."""

    kind: str = "cosine"  # cosine | step | constant
    warmup_epochs: float = 0.0
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of the peak lr
    milestones: list[float] = field(default_factory=lambda: [0.5, 0.75])  # step: fractions of training
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
class SparsityConfig:
    kind: str = "nm"  # nm (row-wise) | transposable
    n: int = 2  # kept in every group of m
    m: int = 4
    every: int = 40  # steps between mask refreshes
    method: str = "exact"  # transposable search: exact | greedy
    srste_decay: float = 0.0  # extra decay on pruned weights (SR-STE), 0 = off
    keep_last: bool = True  # keep the classifier dense
    exclude: list[str] = field(default_factory=list)


@dataclass
class VarianceConfig:
    """Gradient-variance probe during training (spec/fqt.md, "Measuring gradient variance")."""

    every: int = 0  # steps between probes (0 = off); logs var/sampling and var/quant
    k: int = 10  # repeated FQT backward passes per batch
    batches: int = 4  # batches each probe averages over


@dataclass
class TrainerConfig:
    """How the loop runs across processes (training/distributed.py)."""

    distributed: bool = False  # DDP: launch with torchrun, global batch = batch_size split over the ranks


@dataclass
class TrainConfig:
    dataset: Any = MISSING
    model: Any = MISSING
    optim: Any = MISSING
    lr: LRConfig = field(default_factory=LRConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    quant: Optional[QuantConfig] = None  # +quant=<recipe>; absent = full precision
    sparsity: Optional[SparsityConfig] = None  # +sparsity=nm|transposable; absent = dense
    schedule: Any = None  # precision schedule of the forward bits (group schedule; static = as configured)
    variance: VarianceConfig = field(default_factory=VarianceConfig)
    threads: int = 0  # torch CPU threads (0 = torch's default)
    bits: int = 8  # feeds every quant.bits_* slot unless that slot is set
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    epochs: int = 150
    batch_size: int = 100
    eval_batch_size: int = 1000
    label_smoothing: float = 0.0
    grad_clip: float = 0.0  # max gradient norm, 0 = off
    nan_policy: str = "stop"  # stop | skip: what a NaN/inf loss does
    resume: bool = False  # continue the run in hydra.run.dir from its last.pt
    skip_done: bool = False  # a (sweep) job whose folder already holds summary.json returns at once
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


def register_configs(cs: ConfigStore | None = None) -> None:
    cs = cs or ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    for name, node in (("sgd", SGDConfig), ("adamw", AdamWConfig), ("adam", AdamConfig)):
        cs.store(group="schema/optim", name=name, node=node)
    from fqtrun.data.config import register_configs as register_data
    from fqtrun.models.config import register_configs as register_models

    register_data(cs)
    register_models(cs)
    from fqtrun.schedule_config import register_configs as register_schedules
    register_schedules(cs)


def validate_train(cfg) -> None:
    """Range checks on a composed train config; raises ConfigError with one line."""
    from fqtrun.quant.quantizers import check_bits
    from fqtrun.quant.recipe import validate as validate_quant

    checks = [
        (cfg.epochs >= 0, f"epochs={cfg.epochs} must be >= 0"),
        (cfg.batch_size >= 1, f"batch_size={cfg.batch_size} must be >= 1"),
        (cfg.eval_batch_size >= 1, f"eval_batch_size={cfg.eval_batch_size} must be >= 1"),
        (cfg.device in ("auto", "cpu", "cuda"), f"device={cfg.device!r} is unknown: use auto, cpu or cuda"),
        (cfg.nan_policy in ("stop", "skip"), f"nan_policy={cfg.nan_policy!r} is unknown: use stop or skip"),
        (cfg.lr.kind in ("cosine", "step", "constant"), f"lr.kind={cfg.lr.kind!r} is unknown: use cosine, step or constant"),
        (cfg.logger.progress in ("auto", "rich", "plain", "none"),
         f"logger.progress={cfg.logger.progress!r} is unknown: use auto, rich, plain or none"),
        (cfg.logger.wandb.mode in ("offline", "online", "disabled"),
         f"logger.wandb.mode={cfg.logger.wandb.mode!r} is unknown: use offline, online or disabled"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(msg)
    try:
        check_bits(cfg.bits, "bits")
        if cfg.quant is not None:
            validate_quant(cfg.quant)
    except ValueError as e:
        raise ConfigError(str(e)) from None
