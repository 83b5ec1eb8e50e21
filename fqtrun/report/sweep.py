"""The grouped report over run and sweep folders: report.md, report.csv, report.html and PNGs.

Runs (single runs and sweep jobs alike) are grouped by their command-line overrides minus the seed
and the bookkeeping keys in `ignore`; each group's row gives mean ± sample std over its seeds.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fqtrun.errors import ConfigError
from fqtrun.report import html, numerics, plots, tables
from fqtrun.report.collect import Group, find_runs, group_runs, load_run, override_pairs, varying_keys
from fqtrun.report.machines import machine_block


@dataclass
class SweepReport:
    """What sweep_report wrote and found (the command prints it)."""

    out: Path
    groups: list[Group]
    table: tables.Table  # the rows (and the baseline's headline metric, when one was named)
    keys: list[str]  # the settings that vary between groups (the table's first columns)
    shared: str  # the settings every group shares, as overrides
    health: list  # numerics-health rows at the last probe (report/numerics.py), empty without probes
    figures: list[Path]
    notes: list[str]
    skipped: list[str]

    def as_dict(self) -> dict:
        return {"out": str(self.out), "groups": len(self.groups), "done": sum(len(g.done) for g in self.groups),
                "failed": sum(len(g.failed) for g in self.groups), "skipped": self.skipped,
                "figures": [str(f) for f in self.figures], "notes": self.notes, "numerics_rows": len(self.health)}


def sweep_report(dirs: list[Path], out: Path, draw: bool, ignore: list[str],
                 baseline: str | None = None) -> SweepReport:
    """Find, group, tabulate and plot the runs under `dirs`; write the report into `out`. With a `baseline`
    (a folder of runs, or one of the groups by its settings) the table gets each group's gap in the final
    headline metric to the baseline's and the comparison with it paired by seed (report/paired.py)."""
    out.mkdir(parents=True, exist_ok=True)
    paths, empty = find_runs(dirs)
    if not paths:
        raise ConfigError(f"no runs under {', '.join(map(str, dirs))}: a run folder has .hydra/config.yaml "
                          "and metrics.jsonl, summary.json, failed.json or variance.json")
    runs = [load_run(p) for p in paths]
    groups = group_runs(runs, ignore)
    keys, common = varying_keys(groups)
    table = tables.summarize(groups, _baseline(baseline, groups))
    skipped = [f"{p}: {why}" for p, why in empty]
    skipped += [f"{r.path}: {r.skip_reason}" for r in runs if r.skip_reason]
    notes = [f"{r.path}: {p}" for r in runs if not r.skip_reason for p in r.problems]
    notes += [f"not paired with the baseline: {row.why}" for row in table.rows if row.why]
    for g in groups:
        seeds = [r.seed for r in g.done]
        for seed in sorted({x for x in seeds if seeds.count(x) > 1}, key=str):
            notes.append(f"group {g.label}: seed {seed} appears {seeds.count(seed)} times (the same run "
                         "reported twice, or two sweeps with the same settings)")

    probed = numerics.represented(groups, lambda g: plots.group_label(g, keys))
    health = numerics.health_rows(probed)
    figures = []
    if draw:
        for path, why in (plots.headline_vs_bits(groups, keys, out),
                          plots.headline_curves(groups, keys, out),
                          plots.bit_traces(groups, keys, out / "bit_traces.png"),
                          plots.gradient_variance(groups, keys, runs, out / "gradient_variance.png"),
                          plots.numerics_health(probed, out / "numerics_health.png")):
            if path:
                figures.append(path)
            else:
                notes.append(f"not drawn: {why}")

    shared = " ".join(f"{k}={v}" for k, v in common.items())
    title = "fqtrun report: " + ", ".join(map(str, dirs))
    machines = machine_block([r.summary for r in runs if r.summary is not None])
    (out / "report.md").write_text(_markdown(title, table, keys, shared, figures, notes, skipped, health, machines),
                                   encoding="utf-8")
    tables.write_csv(out / "report.csv", table, keys)
    sections = [(HEALTH_TITLE, numerics.html_table(health))] if health else []
    (out / "report.html").write_text(html.page(title, table, keys, common, figures, notes, skipped, sections),
                                     encoding="utf-8")
    return SweepReport(out, groups, table, keys, shared, health, figures, notes, skipped)


HEALTH_TITLE = f"Numerics health at the last probe (worst {numerics.TOP} layer/slot pairs per group first)"


def _baseline(name: str | None, groups: list[Group]) -> list | None:
    """The baseline's finished runs: those under a folder of that name, else the one group whose settings
    include the overrides it names ('bits=8', 'quant=qat bits=8', '(defaults)'); None: no baseline."""
    if name is None:
        return None
    where = Path(name).expanduser()
    if where.is_dir() or ("=" not in name and name != "(defaults)"):  # group settings hold '='
        done = [r for r in map(load_run, find_runs([where])[0]) if r.done]
        if not done:
            raise ConfigError(f"baseline={name} holds no finished training run (summary.json): pass the "
                              "folder of the reference run or sweep (e.g. the fp32 model's), or a group's settings")
        return done
    wanted = override_pairs([] if name == "(defaults)" else name.split(), [])
    exact = [g for g in groups if g.key == wanted]
    found = exact or [g for g in groups if set(wanted) <= set(g.key)]
    labels = "; ".join(g.label for g in groups)
    if len(found) != 1:
        how = "no group" if not found else f"{len(found)} groups"
        raise ConfigError(f"baseline={name} is no folder and matches {how}: name a run folder or one group's "
                          f"settings, one of: {labels}")
    if not found[0].done:
        raise ConfigError(f"baseline={name}: group {found[0].label} has no finished run")
    return found[0].done


def _markdown(title, table, keys, shared, figures, notes, skipped, health, machines="") -> str:
    parts = [f"# {title}", "", *([machines, ""] if machines else []), "Mean ± sample standard deviation over seeds.", ""]
    if shared:
        parts += [f"Shared settings: `{shared}`", ""]
    if table.baseline:
        parts += [f"Gap to the baseline: its mean final test {table.baseline[0]} is {table.baseline[1]:.4f}. "
                  "Paired by seed: the mean of the per-seed differences (group − baseline) [95% CI, Student "
                  "t over the shared seeds], seeds agreeing in sign / shared seeds, verdict (better / worse, or "
                  "not resolved when the CI holds 0, with about how many seeds would resolve the difference).",
                  ""]
    parts += [tables.markdown(table, keys), ""]
    if health:
        parts += [f"## {HEALTH_TITLE}", "", numerics.markdown(health), ""]
    failed = [f for r in table.rows for f in r.failed]
    for name, items in (("Failed runs", failed), ("Skipped", skipped), ("Notes", notes)):
        if items:
            parts += [f"## {name}", "", *(f"- {i}" for i in items), ""]
    parts += [f"![{f.stem.replace('_', ' ')}]({f.name})" for f in figures]
    return "\n".join(parts) + "\n"
