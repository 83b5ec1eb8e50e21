"""fqtrun report DIR...: every run under the folders -> grouped table, plots and one HTML page.

    fqtrun report multirun/2026-11-22/10-00-00              (positional folders; or dirs=[a,b])
    fqtrun report outputs multirun out=reports/today
    fqtrun report multirun/lm baseline=outputs/gpt_fp32      (a gap column: each group's final
                                                              headline metric minus the baseline's,
                                                              and the paired verdict against it)
    fqtrun report multirun/x baseline=bits=8                 (the baseline: the group with bits=8)
    fqtrun report results/fqt                               (a `fqtrun reproduce` folder: its tables.md)

Runs (single runs and sweep jobs alike) are grouped by their command-line overrides minus the
seed and the bookkeeping keys in `ignore` (fqtrun/report/sweep.py); each group's row gives mean ±
sample std over its seeds. Writes report.md, report.csv, report.html and PNGs into `out` (default:
the first DIR). A folder `fqtrun reproduce` wrote (it holds reproduce.yaml) gets its experiment's
tables again instead, from its runs, in its own tables.md (fqtrun/report/experiment.py).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig
from rich.console import Console

from fqtrun.commands.common import run_reporting_errors, split_positionals
from fqtrun.errors import ConfigError
from fqtrun.experiment.layout import TABLES_FILE, is_experiment
from fqtrun.report import numerics, tables
from fqtrun.report.experiment import experiment_report
from fqtrun.report.sweep import sweep_report


@dataclass
class ReportConfig:
    dirs: list[str] = field(default_factory=list)  # run / sweep folders (positional on the command line)
    out: str | None = None  # where the grouped report goes; null = the first of dirs (tables.md stays in its folder)
    plots: bool = True
    # the reference: a run or sweep folder (e.g. the fp32 model's), or one of the reported groups by its
    # settings (baseline=bits=8, baseline='quant=qat bits=8', baseline='(defaults)'). The table gets each
    # group's gap in the mean final headline metric (test acc; validation loss for language models) to the
    # baseline's, and the comparison paired by seed: mean difference [95% CI] seeds agreeing, verdict
    baseline: Optional[str] = None
    # override keys (and their sub-keys) that do not define an experiment: left out of the grouping
    ignore: list[str] = field(default_factory=lambda: ["seed", "resume", "skip_done", "threads", "device",
                                                       "logger", "dataset.cache_dir", "dataset.root"])


ConfigStore.instance().store(name="report_schema", node=ReportConfig)


def prepare_argv(args: list[str]) -> list[str]:
    """Positional folders -> one dirs=[...] override; Hydra flags and overrides pass through."""
    dirs, out = split_positionals(args)
    if dirs:
        quoted = ",".join("'" + d.replace("\\", "\\\\").replace("'", "\\'") + "'" for d in dirs)
        out.append(f"dirs=[{quoted}]")
    return [_quote_baseline(a) for a in out]


def _quote_baseline(arg: str) -> str:
    """baseline=bits=8 -> baseline='bits=8': a group's settings hold '=', which Hydra reads only quoted."""
    key, _, value = arg.partition("=")
    if key != "baseline" or not value or value[0] in "'\"" or not any(c in value for c in "= ()"):
        return arg
    return "baseline='" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def run_report(cfg: DictConfig, out_dir: Path | None = None) -> dict:
    """Experiment folders get their tables.md again; the other folders one grouped report. Prints both.

    `out_dir` (Hydra's run folder) is unused: the grouped report goes to cfg.out or the first folder.
    """
    if not cfg.dirs:
        raise ConfigError("no folders to report on: fqtrun report <DIR>... (or dirs=[a,b])")
    dirs = [Path(d).expanduser() for d in cfg.dirs]
    for d in dirs:
        if not d.is_dir():
            raise ConfigError(f"report folder {d} does not exist: pass run or sweep folders "
                              "(e.g. multirun/<date>/<time>) or a `fqtrun reproduce` output folder")
    console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)  # no cut columns in logs
    experiments = [d for d in dirs if is_experiment(d)]
    for d in experiments:
        console.print(experiment_report(d), markup=False)
        console.print(f"wrote {d / TABLES_FILE}")
    others = [d for d in dirs if d not in experiments]
    if not others:
        return {"experiments": [str(d) for d in experiments]}
    report = sweep_report(others, Path(cfg.out).expanduser() if cfg.out else others[0], cfg.plots, list(cfg.ignore),
                          cfg.baseline)
    console.print(tables.rich_table(report.table, report.keys, f"shared settings: {report.shared}" if report.shared else ""))
    if report.health:
        console.print(numerics.rich_table(report.health))
    for r in report.table.rows:
        for f in r.failed:
            console.print(f"failed: {f}")
    for s in report.skipped:
        console.print(f"skipped: {s}")
    for n in report.notes:
        console.print(f"note: {n}")
    result = report.as_dict()
    console.print(f"{result['groups']} groups from {result['done']} finished and {result['failed']} failed runs, "
                  f"{len(report.skipped)} skipped; wrote {report.out / 'report.md'}, report.csv, report.html and "
                  f"{len(report.figures)} PNGs")
    return {"experiments": [str(d) for d in experiments], **result}


@hydra.main(version_base="1.3", config_path="../conf", config_name="report")
def main(cfg: DictConfig) -> None:
    run_reporting_errors(run_report, cfg)
