"""fqtrun variance: sampling vs quantization variance of the FQT gradient, per quantizer and bits
(spec/fqt.md, "Measuring gradient variance"; fqtrun/runs/variance.py).

    fqtrun variance variance.quantizers=[per_tensor,per_sample,householder] variance.bits=[3,4,5,6,8] \
        checkpoint=outputs/<run>/last.pt

Writes variance.json, variance.csv, variance.png, variance_layers.png and prints a table.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from fqtrun.build import model_name
from fqtrun.commands.common import hydra_choices, run_reporting_errors
from fqtrun.config import register_configs
from fqtrun.runs.variance import register_variance_schema, run_study
from fqtrun.training.loggers import make_console

register_configs()
register_variance_schema()


def variance(cfg: DictConfig, out_dir: Path) -> dict:
    data, table = run_study(cfg, out_dir, model_name(cfg, hydra_choices()))
    make_console().print(table)
    print(f"wrote {out_dir / 'variance.json'}, variance.csv, variance.png, variance_layers.png")
    return data


@hydra.main(version_base="1.3", config_path="../conf", config_name="variance")
def main(cfg: DictConfig) -> None:
    run_reporting_errors(variance, cfg)
