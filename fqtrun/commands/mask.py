"""fqtrun mask: what an N:M / transposable N:M mask costs a trained model, and dense -> N:M conversion.

    fqtrun mask checkpoint=outputs/<run>/last.pt sparsity.kind=transposable sparsity.n=4 sparsity.m=8
    fqtrun mask checkpoint=outputs/<run>/last.pt sparsity.n=2 sparsity.m=4 convert.calibration_batches=8

Spec sparsity.md; N is the number KEPT in every group of M (2:4 keeps 2 of 4). The study is
fqtrun.runs.mask.run_mask_study (schema: fqtrun.sparsity.config.MaskStudyConfig); this app runs it
in Hydra's output folder (mask.json, mask.md, sparse/) and prints its tables.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from fqtrun.commands.common import run_reporting_errors
from fqtrun.config import register_configs
from fqtrun.runs.mask import run_mask_study
from fqtrun.sparsity.tables import terminal_tables
from fqtrun.training.loggers import make_console

register_configs()  # the train schemas (a run folder's config) and mask_schema


def mask(cfg: DictConfig, out_dir: Path) -> dict:
    summary = run_mask_study(cfg, out_dir)
    console = make_console()
    if not console.is_terminal:  # piped or logged: room for full layer names
        console.width = max(console.width, 110)
    for table in terminal_tables(summary, out_dir):
        console.print(table)
    return summary


@hydra.main(version_base="1.3", config_path="../conf", config_name="mask")
def main(cfg: DictConfig) -> None:
    run_reporting_errors(mask, cfg)
