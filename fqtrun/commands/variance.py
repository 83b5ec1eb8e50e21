"""fqtrun variance: sampling vs quantization variance of the FQT gradient, per quantizer and bits
(spec/fqt.md, "Measuring gradient variance"; fqtrun/runs/variance.py).

    fqtrun variance variance.quantizers=[per_tensor,per_sample,householder] variance.bits=[3,4,5,6,8] \
        checkpoint=outputs/<run>/last.pt

Writes variance.json, variance.csv, variance.png and prints a table.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig

from fqtrun.build import model_name
from fqtrun.commands.common import hydra_choices, run_reporting_errors
from fqtrun.config import register_configs
from fqtrun.runs.variance import run_study
from fqtrun.training.loggers import make_console


@dataclass
class VarianceStudyConfig:
    quantizers: list[str] = field(default_factory=lambda: ["per_tensor", "per_sample", "householder"])
    bits: list[int] = field(default_factory=lambda: [3, 4, 5, 6, 8])  # dX gradient bits studied
    dw_bits: Optional[int] = None  # dW gradient bits: null = the studied bits (strict), 8 = the paper's protocol
    dw_quantizer: str = "per_column"  # quantizer of dY in the dW GEMM: per_column | per_tensor
    forward_bits: int = 8  # QAT forward: weights and input activations
    weight_granularity: str = "tensor"  # forward weight ranges: tensor | channel
    k: int = 10  # repeated FQT backward passes per batch
    batches: int = 10  # batches of the train set averaged over
    batch_size: int = 100


@dataclass
class VarianceCommandConfig:
    dataset: Any = MISSING
    model: Any = MISSING
    variance: VarianceStudyConfig = field(default_factory=VarianceStudyConfig)
    checkpoint: Optional[str] = None  # a run's last.pt (or its folder); null = a fresh model
    seed: int = 0  # model init (fresh), held batches, noise
    device: str = "auto"
    threads: int = 0


register_configs()
ConfigStore.instance().store(name="variance_schema", node=VarianceCommandConfig)


def variance(cfg: DictConfig, out_dir: Path) -> dict:
    data, table = run_study(cfg, out_dir, model_name(cfg, hydra_choices()))
    make_console().print(table)
    print(f"wrote {out_dir / 'variance.json'}, variance.csv, variance.png")
    return data


@hydra.main(version_base="1.3", config_path="../conf", config_name="variance")
def main(cfg: DictConfig) -> None:
    run_reporting_errors(variance, cfg)
