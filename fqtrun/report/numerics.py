"""The numerics-health records of runs (numerics/<layer>/<slot>/<stat>, fqtrun/analysis/numerics.py): their
series over steps, and the table of the last probe, worst layer/slot first, in three forms.

Each group is represented by its first finished run (the probes of other seeds look alike); groups whose
runs logged no probe are left out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from rich import box
from rich.table import Table

from fqtrun.quant.health import STATS, severity
from fqtrun.report.collect import Group, Run
from fqtrun.report.html import table_html
from fqtrun.report.markdown import markdown_table

PREFIX = "numerics/"
TOP = 8  # rows per group in the table: the worst slots


@dataclass
class HealthRow:
    group: str
    step: int
    stats: dict  # layer, slot, STATS


def series(run: Run) -> dict[tuple[str, str], dict[str, list[tuple[int, float]]]]:
    """(layer, slot) -> stat -> [(probe step, value)] over the run's records, in step order."""
    out: dict = {}
    for rec in run.metrics:
        step = rec.get("numerics/step")
        if not isinstance(step, int):
            continue
        for key, value in rec.items():
            if key.startswith(PREFIX) and key != "numerics/step" and isinstance(value, (int, float)):
                layer, slot, stat = key[len(PREFIX):].rsplit("/", 2)
                out.setdefault((layer, slot), {}).setdefault(stat, []).append((step, value))
    return out


def last_probe(run: Run) -> tuple[int, list[dict]] | None:
    """(step, rows worst first) of the run's last probe, or None when it logged none."""
    probes = [r for r in run.metrics if isinstance(r.get("numerics/step"), int)]
    if not probes:
        return None
    rec = probes[-1]
    rows: dict[tuple[str, str], dict] = {}
    for key, value in rec.items():
        if key.startswith(PREFIX) and key != "numerics/step":
            layer, slot, stat = key[len(PREFIX):].rsplit("/", 2)
            rows.setdefault((layer, slot), {"layer": layer, "slot": slot})[stat] = value
    full = [r for r in rows.values() if all(s in r for s in STATS)]
    return rec["numerics/step"], sorted(full, key=severity)


def represented(groups: list[Group], label) -> list[tuple[str, Run]]:
    """(label of the group, its first finished run) of every group."""
    return [(label(g), g.done[0]) for g in groups if g.done]


def health_rows(runs: list[tuple[str, Run]], top: int = TOP) -> list[HealthRow]:
    """The worst `top` slots of each run's last probe."""
    out = []
    for label, run in runs:
        probe = last_probe(run)
        if probe is not None:
            step, rows = probe
            out += [HealthRow(label, step, r) for r in rows[:top]]
    return out


COLUMNS = ("group", "step", "layer", "slot", "bits", "saturated %", "flushed %", "SQNR (dB)", "non-finite")


def _pct(v) -> str:
    return "–" if not isinstance(v, (int, float)) or math.isnan(v) else f"{100 * v:.2f}"


def cells(r: HealthRow) -> list[str]:
    s = r.stats
    sqnr = s["sqnr_db"]
    return [r.group, str(r.step), s["layer"], s["slot"], str(s["bits"]), _pct(s["sat"]), _pct(s["flush"]),
            "–" if math.isnan(sqnr) else f"{sqnr:.1f}", str(s["nonfinite"])]


def markdown(rows: list[HealthRow]) -> str:
    return markdown_table(list(COLUMNS), [cells(r) for r in rows])


def html_table(rows: list[HealthRow]) -> str:
    return table_html(list(COLUMNS), [cells(r) for r in rows], numbers_from=4)


def rich_table(rows: list[HealthRow]) -> Table:
    t = Table(title=f"numerics health at the last probe (worst {TOP} slots per group first)",
              title_justify="left", box=box.SIMPLE_HEAD)
    for i, c in enumerate(COLUMNS):
        t.add_column(c, justify="right" if i >= 4 else "left", no_wrap=True)
    for r in rows:
        t.add_row(*cells(r))
    return t
