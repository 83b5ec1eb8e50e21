"""Typed schemas of the `sparsity` config group and of the mask study (`fqtrun mask`, conf/mask.yaml).

conf/sparsity/<name>.yaml extends NMSparsity or TransposableSparsity; `instantiate(cfg.sparsity)`
builds the mask policy (sparsity/policy.py MaskPolicy), which checks the values (N < M, known
kind and method) with one-line errors. MaskStudyConfig is stored as mask_schema here, with the
group schemas, so any caller that composes the `mask` config (the command, the experiments) finds it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from fqtrun.numerics_mode import NumericsModeConfig


@dataclass
class NMSparsity:
    """Row-wise N:M: keep n of every m consecutive weights along the input dimension."""

    _target_: str = "fqtrun.sparsity.policy.MaskPolicy"
    kind: str = "nm"
    n: int = 2  # kept in every group of m
    m: int = 4
    every: int = 40  # steps between mask refreshes
    srste_decay: float = 0.0  # extra decay on pruned weights (SR-STE), 0 = off
    keep_last: bool = True  # keep the classifier dense
    exclude: list[str] = field(default_factory=list)  # fnmatch patterns of layer names kept dense


@dataclass
class TransposableSparsity(NMSparsity):
    """Transposable N:M: every m x m block keeps n per row AND per column, so W^T is N:M too."""

    kind: str = "transposable"
    method: str = "exact"  # exact | greedy


SCHEMAS = {"nm": NMSparsity, "transposable": TransposableSparsity}


@dataclass
class MaskSparsity:
    """The masks a study applies (one kind for both, unlike the group's per-kind schemas)."""

    kind: str = "nm"  # nm (row-wise) | transposable (every m x m block: n per row and per column)
    n: int = 2  # kept in every group of m
    m: int = 4
    method: str = "exact"  # transposable search: exact | greedy
    keep_last: bool = True  # keep the classifier dense
    exclude: list[str] = field(default_factory=list)  # fnmatch patterns of layer names kept dense


@dataclass
class ConvertSettings:
    enabled: Optional[bool] = None  # null: true when calibration_batches > 0
    calibration_batches: int = 8  # training batches for the reconstruction and BN re-estimation
    batch_size: int = 100
    damping: float = 0.01  # ridge of the per-row least squares, relative to the mean input energy
    bn: bool = True  # re-estimate BatchNorm statistics after the reconstruction


@dataclass
class MaskStudyConfig:
    checkpoint: str = MISSING  # last.pt of a `fqtrun train` run folder (its .hydra/config.yaml is read)
    sparsity: MaskSparsity = field(default_factory=MaskSparsity)
    convert: ConvertSettings = field(default_factory=ConvertSettings)
    eval_batch_size: int = 1000
    seed: int = 0  # order of the calibration batches
    device: str = "auto"
    threads: int = 0  # torch CPU threads (0 = torch's default)
    numerics: NumericsModeConfig = field(default_factory=NumericsModeConfig)


def register_configs(cs: ConfigStore) -> None:
    """Store each group schema as schema/sparsity/<name> (conf/sparsity/<name>.yaml extends it) and mask_schema."""
    for name, node in SCHEMAS.items():
        cs.store(group="schema/sparsity", name=name, node=node)
    cs.store(name="mask_schema", node=MaskStudyConfig)
