"""fqtrun train: train a model as configured (fqtrun.runs.train.run_training) and print its summary."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from fqtrun.commands.common import hydra_choices, run_reporting_errors, task_overrides
from fqtrun.config import register_configs
from fqtrun.quant.health import describe
from fqtrun.runs.train import run_training
from fqtrun.training.loggers import make_console, summary_table
from fqtrun.training.trainer import Interrupted

register_configs()


def train(cfg: DictConfig, out_dir: Path) -> dict:
    """Run the training in out_dir with the command line's overrides; print the summary table."""
    try:
        summary = run_training(cfg, out_dir, overrides=task_overrides(), choices=hydra_choices())
    except Interrupted as e:
        print(f"interrupted by signal {e.signum}: checkpoint saved to {out_dir / 'last.pt'}; continue with: "
              f"fqtrun train resume=true hydra.run.dir={out_dir} <the same overrides>", file=sys.stderr)
        sys.exit(128 + e.signum)
    if int(os.environ.get("RANK", "0")) == 0:  # DDP: rank 0 alone reports
        print_summary(summary, out_dir)
    return summary


def print_summary(s: dict, out_dir: Path) -> None:
    rows = [
        ("model / dataset", f"{s['model']} / {s['dataset']}"),
        ("quantization", s["quant"]),
        ("bits used (last step)", " ".join(f"{k}={v}" for k, v in s["bits_used"].items()) or "fp32"),
        ("layers converted", f"{len(s['layers_quantized'])} (+{len(s['layers_full_precision'])} kept fp)"
         if s["layers_quantized"] or s["layers_full_precision"] else "none"),
        ("epochs / steps", f"{s['epochs']} / {s['steps']}"),
        *((f"final test {k[11:]}", f"{v:.4f}") for k, v in s.items() if k.startswith("final_test_")),
        *((f"best test {k[10:]}", f"{v:.4f}") for k, v in s.items() if k.startswith("best_test_")),
        ("final train loss", f"{s['final_train_loss']:.4f}"),
        ("wall time", f"{s['wall_time_s']:.1f} s"),
    ]
    if "sparsity" in s:
        sp = s["sparsity"]
        mean = sum(sp["density"].values()) / len(sp["density"])
        rows.insert(3, ("sparsity", f"{sp['kind']} {sp['n']}:{sp['m']} on {len(sp['density'])} layers, "
                                    f"density {mean:.3f}"))
    backends = s.get("layer_backends") or {}
    if any(v != "simulate" for v in backends.values()):
        n_int8 = sum(v == "int8" for v in backends.values())
        rows.insert(4, ("GEMM backend", f"int8 on {n_int8}/{len(backends)} layers (others: see summary.json)"))
    if "gbitops" in s:
        rows.append(("GBitOPs (savings)", f"{s['gbitops']:.1f} ({100 * s['bitops_savings']:.1f}%)"))
    if s.get("numerics"):
        rows.append((f"numerics, worst (step {s['numerics_step']})", describe(s["numerics"][0])))
    if s.get("skipped_steps"):
        rows.append(("skipped steps (NaN/inf)", str(s["skipped_steps"])))
    console = make_console()
    console.print(summary_table("fqtrun train: summary", rows))
    console.print(f"outputs: {out_dir.resolve()}", soft_wrap=True)


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> None:
    run_reporting_errors(train, cfg)
