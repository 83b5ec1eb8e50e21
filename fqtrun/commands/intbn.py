"""fqtrun intbn: swap BatchNorm + requantization for the integer form clip((A x + B) >> T, 0, L)
(spec/denoise_bn.md B; fqtrun/runs/intbn.py, fqtrun/intbn/).

    fqtrun intbn checkpoint=outputs/<run>/last.pt [bits=8]

Writes intbn.json and prints the per-layer shifts and the accuracies.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig
from rich.table import Table

from fqtrun.commands.common import run_reporting_errors
from fqtrun.config import register_configs
from fqtrun.runs.intbn import register_intbn_schema, run_intbn_study
from fqtrun.training.loggers import make_console, summary_table

register_configs()  # the train schemas (a run folder's config)
register_intbn_schema()


def intbn(cfg: DictConfig, out_dir: Path) -> dict:
    summary = run_intbn_study(cfg, out_dir)
    print_summary(summary, out_dir)
    return summary


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.1f}" if isinstance(v, float) else str(v)


def print_summary(s: dict, out_dir: Path) -> None:
    console = make_console()
    table = Table(title=f"fqtrun intbn: {s['model']}, per converted BN (shift bits T)", title_justify="left")
    for col in ("layer", "ch", "bits", "exact", "T ours mean/max", "T naive mean/max", "code mismatches"):
        table.add_column(col, justify="left" if col == "layer" else "right")
    for r in s["layers"]:
        naive = f"{_fmt(r['shift_naive_mean'])}/{_fmt(r['shift_naive_max'])}"
        if r["naive_never_exact"]:
            naive += f" ({r['naive_never_exact']} never)"
        table.add_row(r["bn"], str(r["channels"]), str(r["bits_out"]), "yes" if r["verified_exact"] else "NO",
                      f"{r['shift_mean']:.1f}/{r['shift_max']}", naive, f"{r['code_mismatches']}/{r['codes_compared']}")
    console.print(table)
    console.print(summary_table("accuracy on the test split", [
        ("fake-quant, dynamic scales (as trained)", f"{s['acc_fake_quant_dynamic']:.4f}"),
        ("static scales, float32 BN", f"{s['acc_static_float32_bn']:.4f}"),
        ("float BN + requant (exact reference)", f"{s['acc_float_bn_requant']:.4f}"),
        ("integer BN (A, B, T)", f"{s['acc_integer_bn']:.4f}"),
        ("difference / predictions equal", f"{s['acc_difference']:+.4f} / {s['predictions_equal']}"),
        ("converted / kept float", f"{s['converted']} / {len(s['kept_float'])}"),
        ("outputs", str(out_dir / "intbn.json")),
    ]))


@hydra.main(version_base="1.3", config_path="../conf", config_name="intbn")
def main(cfg: DictConfig) -> None:
    run_reporting_errors(intbn, cfg)
