"""Per-group statistics (mean and sample standard deviation over seeds) and the table in three forms."""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

from rich import box
from rich.table import Table as RichTable

from fqtrun.errors import ConfigError
from fqtrun.report.collect import Group, Run, headline
from fqtrun.report.paired import Comparison, compare, direction

# (summary key, column title, format): the numbers the table reports. The task's come first, from
# its headline metric (summary.json "headline"; runs written before it are classification, acc).
EXTRA = {"loss": (("final_test_bpc", "final test bpc", ".4f"), ("final_test_ppl", "final test ppl", ".3f"),
                 ("final_test_bpb", "final test bpb", ".4f"))}  # bits per byte: compares across tokenizers
COSTS = (
    ("gbitops", "GBitOPs", ".4g"),
    ("wall_time_s", "wall time (s)", ".1f"),
)


def task_metrics(name: str) -> tuple[tuple[str, str, str], ...]:
    return ((f"final_test_{name}", f"final test {name}", ".4f"), (f"best_test_{name}", f"best test {name}", ".4f"),
            *EXTRA.get(name, ()))


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
    gap: float | None = None  # mean headline minus the baseline's (None: no baseline, or another metric)
    paired: Comparison | str | None = None  # against the baseline paired by seed; "baseline" for its own
    # group; None without a baseline; why not, for a group that cannot pair (Row.why)
    why: str = ""


@dataclass
class Table:
    """The rows, the numbers they report (METRICS-style triples) and the baseline the gap is taken to."""

    rows: list[Row]
    metrics: tuple[tuple[str, str, str], ...]
    baseline: tuple[str, float] | None = None  # (headline metric, the baseline runs' mean), when named


def stat(values: list[float]) -> Stat | None:
    """Mean and sample standard deviation (ddof=1; nan for one value); None for no values."""
    vals = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if not vals:
        return None
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else float("nan")
    return Stat(mean, std, len(vals))


def summarize(groups: list[Group], baseline: list[Run] | None = None) -> Table:
    """Each group's statistics over its seeds; with `baseline` (finished runs), every group's gap of the
    mean final headline metric to theirs (e.g. the validation-loss gap to full precision)."""
    names = list(dict.fromkeys(headline(r.summary) for g in groups for r in g.done)) or ["acc"]
    metrics = tuple(m for n in names for m in task_metrics(n)) + COSTS
    ref = None
    if baseline:
        name = headline(baseline[0].summary)
        s = stat([r.summary.get(f"final_test_{name}") for r in baseline if headline(r.summary) == name])
        ref = (name, s.mean) if s is not None else None
    rows = []
    for g in groups:
        done = g.done
        stats = {key: stat([r.summary.get(key) for r in done]) for key, _, _ in metrics}
        failed = [f"{r.path}: {(r.failed or {}).get('error', 'failed')}" for r in g.failed]
        own = stats.get(f"final_test_{ref[0]}") if ref else None
        gap = own.mean - ref[1] if own is not None and {headline(r.summary) for r in done} == {ref[0]} else None
        row = Row(g, [r.seed for r in done], failed, stats, gap)
        if ref:
            row.paired, row.why = _paired(g, baseline, ref[0])
        rows.append(row)
    return Table(rows, metrics, ref)


def _paired(group: Group, baseline: list[Run], name: str) -> tuple[Comparison | str | None, str]:
    """The group against the baseline runs paired by seed in the final headline metric: (the comparison, or
    "baseline" for the baseline's own group, or None and why it cannot pair)."""
    if set(map(id, group.done)) == set(map(id, baseline)):
        return "baseline", ""
    key = f"final_test_{name}"
    mine, base = ({r.seed: r.summary[key] for r in runs if headline(r.summary) == name and r.seed is not None}
                  for runs in (group.done, baseline))
    try:
        return compare(group.label, mine, "the baseline", base, direction(key)), ""
    except ConfigError as e:
        return None, str(e)


def fmt(s: Stat | None, spec: str) -> str:
    if s is None:
        return "–"
    if s.n == 1 or not math.isfinite(s.std):
        return format(s.mean, spec)
    return f"{format(s.mean, spec)} ± {format(s.std, spec)}"


def gap_title(table: Table) -> list[str]:
    if not table.baseline:
        return []
    name = table.baseline[0]
    return [f"gap in final test {name} to baseline",
            f"paired vs baseline ({direction(f'final_test_{name}')} {name} is better)"]


def paired_text(row: Row) -> str:
    """The paired cell: '+2.41 [+0.90, +3.92] 3/3 better', 'baseline', or '–' (Row.why says why)."""
    if isinstance(row.paired, Comparison):
        return row.paired.text(digits=4)
    return row.paired or "–"


def columns(table: Table, keys: list[str]) -> list[str]:
    return [*keys, "seeds", "failed", *(title for _, title, _ in table.metrics), *gap_title(table)]


def cells(table: Table, row: Row, keys: list[str]) -> list[str]:
    own = dict(row.group.key)
    gap = [("–" if row.gap is None else f"{row.gap:+.4f}"), paired_text(row)] if table.baseline else []
    return [*(own.get(k, "–") for k in keys), str(len(row.seeds)), str(len(row.failed)),
            *(fmt(row.stats[key], spec) for key, _, spec in table.metrics), *gap]


def markdown(table: Table, keys: list[str]) -> str:
    head = columns(table, keys)
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(" --- " for _ in head) + "|"]
    lines += ["| " + " | ".join(cells(table, r, keys)) + " |" for r in table.rows]
    return "\n".join(lines)


def write_csv(path: Path, table: Table, keys: list[str]) -> None:
    """One row per group; numbers unrounded: <key>_mean, <key>_std, <key>_n per metric (and the gap, and the
    paired comparison: its mean, interval, seeds agreeing, seeds, verdict)."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        gap = ["gap_to_baseline", *PAIRED_CSV] if table.baseline else []
        w.writerow(["group", *keys, "seeds", "failed",
                    *(f"{key}_{part}" for key, _, _ in table.metrics for part in ("mean", "std", "n")), *gap])
        for r in table.rows:
            own = dict(r.group.key)
            nums = []
            for key, _, _ in table.metrics:
                s = r.stats[key]
                if s is None:
                    nums += ["", "", 0]
                else:
                    nums += [repr(s.mean), "" if math.isnan(s.std) else repr(s.std), s.n]
            if table.baseline:
                nums += ["" if r.gap is None else repr(r.gap), *_paired_csv(r.paired)]
            w.writerow([r.group.label, *(own.get(k, "") for k in keys), len(r.seeds), len(r.failed), *nums])


PAIRED_CSV = ("paired_mean", "paired_ci_low", "paired_ci_high", "paired_agree", "paired_n", "verdict")


def _paired_csv(paired: Comparison | str | None) -> list:
    if isinstance(paired, Comparison):
        c = paired
        return [repr(c.mean), repr(c.low), repr(c.high), c.agree, c.n, c.verdict]
    return ["", "", "", "", "", paired or ""]


def rich_table(table: Table, keys: list[str], caption: str = "") -> RichTable:
    t = RichTable(title="fqtrun report (mean ± std over seeds)", title_justify="left", box=box.SIMPLE_HEAD,
                  caption=caption or None, caption_justify="left")
    for i, c in enumerate(columns(table, keys)):
        t.add_column(c, justify="left" if i < len(keys) else "right", no_wrap=True)
    for r in table.rows:
        t.add_row(*cells(table, r, keys))
    return t
