"""fqtrun report DIR...: every run under the folders -> grouped table, plots and one HTML page.

    fqtrun report multirun/2026-11-22/10-00-00              (positional folders; or dirs=[a,b])
    fqtrun report outputs multirun out=reports/today

Runs (single runs and sweep jobs alike) are grouped by their command-line overrides minus the
seed and the bookkeeping keys in `ignore`; each group's row gives mean ± sample std over its
seeds. Writes report.md, report.csv, report.html and PNGs into `out` (default: the first DIR).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig
from rich.console import Console

from fqtrun.commands.common import run_reporting_errors
from fqtrun.errors import ConfigError
from fqtrun.report import html, numerics, plots, tables
from fqtrun.report.collect import find_runs, group_runs, load_run, varying_keys


@dataclass
class ReportConfig:
    dirs: list[str] = field(default_factory=list)  # run / sweep folders (positional on the command line)
    out: str | None = None  # where the report goes; null = the first of dirs
    plots: bool = True
    # override keys (and their sub-keys) that do not define an experiment: left out of the grouping
    ignore: list[str] = field(default_factory=lambda: ["seed", "resume", "skip_done", "threads", "device",
                                                       "logger", "dataset.cache_dir", "dataset.root"])


ConfigStore.instance().store(name="report_schema", node=ReportConfig)

# Hydra flags whose next argument is their value, not a folder.
_VALUE_FLAGS = {"-c", "--cfg", "-p", "--package", "-cp", "--config-path", "-cn", "--config-name",
                "-cd", "--config-dir", "--experimental-rerun"}


def prepare_argv(args: list[str]) -> list[str]:
    """Positional folders -> one dirs=[...] override; Hydra flags and overrides pass through."""
    out, dirs, value_next = [], [], False
    for a in args:
        if value_next or a.startswith("-") or ("=" in a and not Path(a).exists()):
            out.append(a)
            value_next = a in _VALUE_FLAGS
        else:
            dirs.append(a)
    if dirs:
        quoted = ",".join("'" + d.replace("\\", "\\\\").replace("'", "\\'") + "'" for d in dirs)
        out.append(f"dirs=[{quoted}]")
    return out


def run_report(cfg: DictConfig, out_dir: Path | None = None) -> dict:
    """Find, group, tabulate and plot; returns what was written and what was skipped.

    `out_dir` (Hydra's run folder) is unused: the report goes to cfg.out or the first folder.
    """
    if not cfg.dirs:
        raise ConfigError("no folders to report on: fqtrun report <DIR>... (or dirs=[a,b])")
    dirs = [Path(d).expanduser() for d in cfg.dirs]
    for d in dirs:
        if not d.is_dir():
            raise ConfigError(f"report folder {d} does not exist: pass run or sweep folders "
                              "(e.g. multirun/<date>/<time>)")
    out = Path(cfg.out).expanduser() if cfg.out else dirs[0]
    out.mkdir(parents=True, exist_ok=True)

    paths, empty = find_runs(dirs)
    if not paths:
        raise ConfigError(f"no runs under {', '.join(map(str, dirs))}: a run folder has .hydra/config.yaml "
                          "and metrics.jsonl, summary.json, failed.json or variance.json")
    runs = [load_run(p) for p in paths]
    ignore = list(cfg.ignore)
    groups = group_runs(runs, ignore)
    keys, common = varying_keys(groups)
    rows = tables.summarize(groups)
    skipped = [f"{p}: {why}" for p, why in empty]
    skipped += [f"{r.path}: {r.skip_reason}" for r in runs if r.skip_reason]
    notes = [f"{r.path}: {p}" for r in runs if not r.skip_reason for p in r.problems]
    for g in groups:
        seeds = [r.seed for r in g.done]
        for seed in sorted({x for x in seeds if seeds.count(x) > 1}, key=str):
            notes.append(f"group {g.label}: seed {seed} appears {seeds.count(seed)} times (the same run "
                         "reported twice, or two sweeps with the same settings)")

    probed = numerics.represented(groups, lambda g: plots.group_label(g, keys))
    health = numerics.health_rows(probed)
    figures, plot_notes = [], []
    if cfg.plots:
        for result in (plots.accuracy_vs_bits(groups, keys, out / "accuracy_vs_bits.png"),
                       plots.accuracy_curves(groups, keys, out / "accuracy_curves.png"),
                       plots.bit_traces(groups, keys, out / "bit_traces.png"),
                       plots.gradient_variance(groups, keys, runs, out / "gradient_variance.png"),
                       plots.numerics_health(probed, out / "numerics_health.png")):
            path, why = result
            if path:
                figures.append(path)
            else:
                plot_notes.append(f"not drawn: {why}")

    shared = " ".join(f"{k}={v}" for k, v in common.items())
    title = "fqtrun report: " + ", ".join(map(str, dirs))
    (out / "report.md").write_text(_markdown(title, rows, keys, shared, figures, notes + plot_notes, skipped,
                                             health), encoding="utf-8")
    tables.write_csv(out / "report.csv", rows, keys)
    sections = [(HEALTH_TITLE, numerics.html_table(health))] if health else []
    page = html.page(title, rows, keys, common, figures, notes + plot_notes, skipped, sections)
    (out / "report.html").write_text(page, encoding="utf-8")

    console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)  # no cut columns in logs
    caption = f"shared settings: {shared}" if shared else ""
    console.print(tables.rich_table(rows, keys, caption))
    if health:
        console.print(numerics.rich_table(health))
    for r in rows:
        for f in r.failed:
            console.print(f"failed: {f}")
    for s in skipped:
        console.print(f"skipped: {s}")
    for n in notes + plot_notes:
        console.print(f"note: {n}")
    n_done = sum(len(g.done) for g in groups)
    n_failed = sum(len(g.failed) for g in groups)
    console.print(f"{len(groups)} groups from {n_done} finished and {n_failed} failed runs, {len(skipped)} "
                  f"skipped; wrote {out / 'report.md'}, report.csv, report.html and {len(figures)} PNGs")
    return {"out": str(out), "groups": len(groups), "done": n_done, "failed": n_failed, "skipped": skipped,
            "figures": [str(f) for f in figures], "notes": notes + plot_notes, "numerics_rows": len(health)}


HEALTH_TITLE = f"Numerics health at the last probe (worst {numerics.TOP} layer/slot pairs per group first)"


def _markdown(title, rows, keys, shared, figures, notes, skipped, health) -> str:
    parts = [f"# {title}", "", "Mean ± sample standard deviation over seeds.", ""]
    if shared:
        parts += [f"Shared settings: `{shared}`", ""]
    parts += [tables.markdown(rows, keys), ""]
    if health:
        parts += [f"## {HEALTH_TITLE}", "", numerics.markdown(health), ""]
    failed = [f for r in rows for f in r.failed]
    for name, items in (("Failed runs", failed), ("Skipped", skipped), ("Notes", notes)):
        if items:
            parts += [f"## {name}", "", *(f"- {i}" for i in items), ""]
    parts += [f"![{f.stem.replace('_', ' ')}]({f.name})" for f in figures]
    return "\n".join(parts) + "\n"


@hydra.main(version_base="1.3", config_path="../conf", config_name="report")
def main(cfg: DictConfig) -> None:
    run_reporting_errors(run_report, cfg)
