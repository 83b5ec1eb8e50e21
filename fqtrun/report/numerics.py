"""The numerics-health records of runs (numerics/<layer>/<slot>/<stat>, fqtrun/analysis/numerics.py): their
series over steps, and the table of the last probe, worst layer/slot first, in three forms; the outlier
measures (max/RMS, block max/RMS, kurtosis; "before → after RHT" where a transform ran) as three more
columns when the runs logged them.

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
    stats: dict  # layer, slot, STATS, and the OUTLIERS the probe took


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
# the outlier measures (quant/outliers.py), shown when any row has them: "before" or "before → after RHT"
OUTLIER_COLUMNS = (("max/RMS", "crest"), ("block max/RMS", "crest_block"), ("kurtosis", "kurtosis"))


def _pct(v) -> str:
    return "–" if not isinstance(v, (int, float)) or math.isnan(v) else f"{100 * v:.2f}"


def _figure(v: float) -> str:
    """Three significant figures up to 1000 (2.10, 29.8, 120), whole numbers past it."""
    return f"{v:.2f}" if abs(v) < 10 else f"{v:.1f}" if abs(v) < 100 else f"{v:.0f}"


def _outlier(s: dict, name: str) -> str:
    """The figure, with its value after the transform where one ran: "33.1 → 10.5"; "–" when not taken."""
    before, after = s.get(name), s.get(f"{name}_rht")
    if not isinstance(before, (int, float)):
        return "–"
    return _figure(before) + (f" → {_figure(after)}" if isinstance(after, (int, float)) else "")


def with_outliers(rows: list[HealthRow]) -> bool:
    """True when some row holds outlier measures (runs probed before they existed have none)."""
    return any(name in r.stats for r in rows for _, name in OUTLIER_COLUMNS)


def columns(rows: list[HealthRow]) -> list[str]:
    return [*COLUMNS, *(c for c, _ in OUTLIER_COLUMNS)] if with_outliers(rows) else list(COLUMNS)


def cells(r: HealthRow, outliers: bool = False) -> list[str]:
    s = r.stats
    sqnr = s["sqnr_db"]
    base = [r.group, str(r.step), s["layer"], s["slot"], str(s["bits"]), _pct(s["sat"]), _pct(s["flush"]),
            "–" if math.isnan(sqnr) else f"{sqnr:.1f}", str(s["nonfinite"])]
    return base + [_outlier(s, name) for _, name in OUTLIER_COLUMNS] if outliers else base


def markdown(rows: list[HealthRow]) -> str:
    return markdown_table(columns(rows), [cells(r, with_outliers(rows)) for r in rows])


def html_table(rows: list[HealthRow]) -> str:
    return table_html(columns(rows), [cells(r, with_outliers(rows)) for r in rows], numbers_from=4)


def rich_table(rows: list[HealthRow]) -> Table:
    t = Table(title=f"numerics health at the last probe (worst {TOP} slots per group first)",
              title_justify="left", box=box.SIMPLE_HEAD)
    for i, c in enumerate(columns(rows)):
        t.add_column(c, justify="right" if i >= 4 else "left", no_wrap=True)
    for r in rows:
        t.add_row(*cells(r, with_outliers(rows)))
    return t
