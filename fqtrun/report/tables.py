"""Per-group statistics (mean and sample standard deviation over seeds) and the table in three forms."""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

from rich import box
from rich.table import Table

from fqtrun.report.collect import Group

# (summary key, column title, format): the summary numbers the table reports.
METRICS = (
    ("final_test_acc", "final test acc", ".4f"),
    ("best_test_acc", "best test acc", ".4f"),
    ("gbitops", "GBitOPs", ".4g"),
    ("wall_time_s", "wall time (s)", ".1f"),
)


@dataclass
class Stat:
    mean: float
    std: float  # sample standard deviation (n - 1); nan for a single value
    n: int  # runs that reported this key


@dataclass
class Row:
    group: Group
    seeds: list
    failed: list[str]  # one line per failed run: "<folder>: <error>"
    stats: dict[str, Stat | None]


def stat(values: list[float]) -> Stat | None:
    """Mean and sample standard deviation (ddof=1; nan for one value); None for no values."""
    vals = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if not vals:
        return None
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else float("nan")
    return Stat(mean, std, len(vals))


def summarize(groups: list[Group]) -> list[Row]:
    rows = []
    for g in groups:
        done = g.done
        stats = {key: stat([r.summary.get(key) for r in done]) for key, _, _ in METRICS}
        failed = [f"{r.path}: {(r.failed or {}).get('error', 'failed')}" for r in g.failed]
        rows.append(Row(g, [r.seed for r in done], failed, stats))
    return rows


def fmt(s: Stat | None, spec: str) -> str:
    if s is None:
        return "–"
    if s.n == 1 or not math.isfinite(s.std):
        return format(s.mean, spec)
    return f"{format(s.mean, spec)} ± {format(s.std, spec)}"


def columns(keys: list[str]) -> list[str]:
    return [*keys, "seeds", "failed", *(title for _, title, _ in METRICS)]


def cells(row: Row, keys: list[str]) -> list[str]:
    own = dict(row.group.key)
    return [*(own.get(k, "–") for k in keys), str(len(row.seeds)), str(len(row.failed)),
            *(fmt(row.stats[key], spec) for key, _, spec in METRICS)]


def markdown(rows: list[Row], keys: list[str]) -> str:
    return markdown_table(columns(keys), [cells(r, keys) for r in rows])


def markdown_table(head: list[str], body: list[list[str]]) -> str:
    """A markdown table of already formatted cells."""
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(" --- " for _ in head) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in body])


def write_csv(path: Path, rows: list[Row], keys: list[str]) -> None:
    """One row per group; numbers unrounded: <key>_mean, <key>_std, <key>_n per metric."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["group", *keys, "seeds", "failed",
                    *(f"{key}_{part}" for key, _, _ in METRICS for part in ("mean", "std", "n"))])
        for r in rows:
            own = dict(r.group.key)
            nums = []
            for key, _, _ in METRICS:
                s = r.stats[key]
                if s is None:
                    nums += ["", "", 0]
                else:
                    nums += [repr(s.mean), "" if math.isnan(s.std) else repr(s.std), s.n]
            w.writerow([r.group.label, *(own.get(k, "") for k in keys), len(r.seeds), len(r.failed), *nums])


def rich_table(rows: list[Row], keys: list[str], caption: str = "") -> Table:
    t = Table(title="fqtrun report (mean ± std over seeds)", title_justify="left", box=box.SIMPLE_HEAD,
              caption=caption or None, caption_justify="left")
    for i, c in enumerate(columns(keys)):
        t.add_column(c, justify="left" if i < len(keys) else "right", no_wrap=True)
    for r in rows:
        t.add_row(*cells(r, keys))
    return t
