"""fqtrun prt: the precision range test that picks CPT's q_min (spec/cpt.md, "Precision Range Test").

    fqtrun prt +quant=per_sample                                   # MNIST-1D CNN
    fqtrun prt model=resnet20 dataset=cifar10 dataset.root=/data/cifar10 +quant=per_sample

For b = prt.b_start, b_start + 1, ..., prt.b_max: train prt.steps_per_bits steps with the forward
slots (w, a) at b and the gradients at their fixed quant.bits_dx / bits_dw; the gain is the mean
train accuracy over the last prt.window steps minus over the first; q_min is the first b whose
gain exceeds prt.threshold. q_max = prt.b_max, the static baseline the schedule replaces.
Every train setting applies (optim, lr, batch_size, ...). Writes prt.json and prt.png, prints a
table and the schedule override to train with (fqtrun/runs/prt.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import hydra
import torch
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from fqtrun.commands.common import run_reporting_errors
from fqtrun.config import TrainConfig, register_configs
from fqtrun.files import write_json
from fqtrun.precision.prt import PRTResult, plot_prt, result_record
from fqtrun.runs.prt import run_precision_range_test
from fqtrun.training.loggers import make_console, summary_table


@dataclass
class PrtSettings:
    b_start: int = 2  # first forward precision tried
    b_max: int = 8  # the last one tried, and q_max of the suggested schedule (the static baseline)
    steps_per_bits: int = 100  # K: training steps at each precision
    window: int = 10  # w: steps averaged at the start and at the end of the K
    threshold: float = 0.05  # tau: train-accuracy gain (fraction, not percent) that picks q_min
    fresh_model: bool = False  # true: every precision restarts model, optimizer and batches


@dataclass
class PrtCommandConfig(TrainConfig):
    """The train config (model, data, optimizer, +quant=<recipe>) plus the test's settings."""

    prt: PrtSettings = field(default_factory=PrtSettings)


register_configs()
ConfigStore.instance().store(name="prt_schema", node=PrtCommandConfig)


def run_prt(cfg: DictConfig, out_dir: Path) -> dict:
    """Run the precision range test; writes prt.json and prt.png into out_dir; returns the record."""
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    res = run_precision_range_test(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    record = result_record(res, cfg.prt)
    write_json(out_dir / "prt.json", record)
    record["plot"] = str(plot_prt(res, out_dir / "prt.png"))
    _print(res, out_dir)
    return record


def _print(res: PRTResult, out_dir: Path) -> None:
    console = make_console()
    w = res.window
    rows = [(f"{b} bits", f"acc {sum(t.accs[:w]) / w:.3f} -> {sum(t.accs[-w:]) / w:.3f}   gain {t.delta:+.3f}"
             + ("   <- q_min" if b == res.q_min else "")) for b, t in res.trace.items()]
    rows += [("threshold", f"{res.threshold:g}"), ("q_min / q_max", f"{res.q_min} / {res.b_max}"),
             ("outputs", f"{out_dir / 'prt.json'}, {out_dir / 'prt.png'}")]
    console.print(summary_table("fqtrun prt: train-accuracy gain per precision", rows))
    print(res.summary())  # plain print: never wrapped, so the override can be copied
    if res.override:
        print(f"train with: fqtrun train <the same dataset/model/quant overrides> {res.override}")


@hydra.main(version_base="1.3", config_path="../conf", config_name="prt")
def main(cfg: DictConfig) -> None:
    run_reporting_errors(run_prt, cfg)
