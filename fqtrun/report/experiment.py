"""An experiment folder's tables.md: the blocks of its spec (tables, lines, figures) over its records.

Each block is built with instantiate from the spec's `experiment.tables` (its `_target_` names a
class below) and renders markdown from the folder's Results (fqtrun.experiment.layout): one record
per seed of every variant (its summary.json) and of every step (variance.json, mask.json, intbn.json).
A cell is one figure of one source (a variant or step name) over its records; a Verdict cell compares
it with a baseline source paired by seed (fqtrun.report.paired). The experiment's claims (spec.Claim)
become the last block: each paper's comparison, measured, and whether it holds.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from fqtrun.analysis.variance import LAYERS_PLOT
from fqtrun.errors import ConfigError
from fqtrun.experiment.layout import TABLES_FILE, Results, load_results
from fqtrun.experiment.spec import Claim, Expect, check_claims, source_seeds, steps
from fqtrun.precision.trace_plot import plot_bit_traces
from fqtrun.report.machines import machine_block
from fqtrun.report.markdown import markdown_table, mean_std
from fqtrun.report.paired import Comparison, assess, compare, direction, lookup


# ----- cells: one figure of one source -----------------------------------------------------------
def value(record: dict, key: str):
    """record[key] with a dotted key (accuracy.dense); a dict of per-layer figures gives their mean; None if absent."""
    v: Any = record
    for part in key.split("."):
        if not isinstance(v, dict) or part not in v:
            return None
        v = v[part]
    return statistics.fmean(v.values()) if isinstance(v, dict) and v else v


def values(results: Results, source: str, key: str) -> list[float]:
    vals = [value(r, key) for r in results.records[source]]
    if any(not isinstance(v, (int, float)) for v in vals):
        raise ConfigError(f"a record of {source} in {results.folder} has no number at {key!r}: fix the "
                          "experiment's tables or re-run its reproduction")
    return vals


class Cell:
    """One figure of a source over its records: cell(source, results) -> the cell's text."""

    def sources(self) -> list[str]:
        """The sources the cell reads besides its row's."""
        return []

    def legend(self) -> str:
        """A line under the table that explains the cell ("": none needed)."""
        return ""


@dataclass
class MeanStd(Cell):
    """'mean ± sample std' over the seeds (one seed: the value), times `scale`."""

    key: str
    scale: float = 1.0
    digits: int = 2

    def __call__(self, source: str, results: Results) -> str:
        return mean_std(values(results, source, self.key), self.scale, self.digits)


@dataclass
class Mean(Cell):
    """The mean over the seeds times `scale`, then `suffix`; `missing` where no record holds the key."""

    key: str
    scale: float = 1.0
    digits: int = 2
    suffix: str = ""
    missing: Optional[str] = None

    def __call__(self, source: str, results: Results) -> str:
        if self.missing is not None and all(value(r, self.key) is None for r in results.records[source]):
            return self.missing
        return f"{self.scale * statistics.fmean(values(results, source, self.key)):.{self.digits}f}{self.suffix}"


@dataclass
class Ratio(Cell):
    """Mean of `key` over the source's seeds / the same over its baseline's (`baselines`; else itself)."""

    key: str
    digits: int = 4
    baselines: dict[str, str] = field(default_factory=dict)

    def __call__(self, source: str, results: Results) -> str:
        base = statistics.fmean(values(results, self.baselines.get(source, source), self.key))
        return f"{statistics.fmean(values(results, source, self.key)) / base:.{self.digits}f}"

    def sources(self) -> list[str]:
        return list(self.baselines.values())


def seed_values(results: Results, source: str, key: str) -> dict[int, float]:
    """{seed: the figure} of a source's records (the seed read from each record's seed<k> folder)."""
    lookup(results.records, source, "variant or step")
    figures = values(results, source, key)
    return {int(f.name.removeprefix("seed")): v for f, v in zip(results.folders[source], figures)}


@dataclass
class Verdict(Cell):
    """The row's source against its baseline paired by seed: mean difference [95% CI] seeds agreeing, verdict
    (fqtrun.report.paired), e.g. '+2.41 [+0.90, +3.92] 3/3 better'. The baseline is `baselines[source]`,
    else `baseline`, else the source itself with `baseline_key` (two figures of one record, e.g. accuracy
    after reconstruction vs after magnitude masks); a source that is its own baseline shows 'baseline'."""

    key: str
    baseline: Optional[str] = None
    baselines: dict[str, str] = field(default_factory=dict)  # source -> its baseline, where it differs
    baseline_key: Optional[str] = None  # the baseline's figure; null: key
    scale: float = 1.0
    digits: int = 2
    better: Optional[str] = None  # higher | lower; null: from the key's name
    direction: str = field(init=False)

    def __post_init__(self):
        if not (self.baseline or self.baselines or self.baseline_key):
            raise ConfigError(f"a Verdict on {self.key} compares nothing: set baseline, baselines or "
                              "baseline_key")
        self.direction = direction(self.key, self.better)  # a one-line error at build time, before any run

    def against(self, source: str) -> Optional[tuple[str, str]]:
        """(the baseline source, its figure's key) of the source's row; None: the source is its own
        baseline."""
        base, key = self.baselines.get(source, self.baseline or source), self.baseline_key or self.key
        return None if (base, key) == (source, self.key) else (base, key)

    def __call__(self, source: str, results: Results) -> str:
        if self.against(source) is None:
            return "baseline"
        return self.compare(source, results).text(self.scale, self.digits)

    def compare(self, source: str, results: Results) -> Comparison:
        base, base_key = self.against(source)
        b = base if base_key == self.key else f"{base} {base_key}"
        mine, theirs = seed_values(results, source, self.key), seed_values(results, base, base_key)
        return compare(source, mine, b, theirs, self.direction)

    def sources(self) -> list[str]:
        return [*self.baselines.values(), *([self.baseline] if self.baseline else [])]

    def legend(self) -> str:
        """The line under a table that says how to read the cell and which way is better."""
        scale = f" ×{self.scale:g}" if self.scale != 1 else ""
        pairs = [f"{s} − {b}" for s, b in self.baselines.items()]
        if self.baseline:
            pairs.append(f"{'other rows' if pairs else 'row'} − {self.baseline}")
        what = (f"{', '.join(pairs)}; {self.key}{scale}" if pairs else
                f"{self.key} − {self.baseline_key} of the same run{scale}")
        return (f"Verdicts pair runs by seed ({what}): mean difference [95% CI, Student t over the seeds], "
                f"seeds agreeing in sign / seeds, verdict ({self.direction} is better); not resolved: the CI "
                "holds 0, and (~n seeds) is about how many seeds would resolve the difference seen.")


@dataclass
class Count(Cell):
    """How many seeds the source has."""

    def __call__(self, source: str, results: Results) -> str:
        return str(len(results.records[source]))


# ----- blocks: a table, a line or a figure of tables.md -----------------------------------------------
def _block(*parts: str) -> str:
    return "\n".join(p.rstrip("\n") + "\n" for p in parts if p)


def _legends(cells) -> str:
    """The cells' legends, each once, one line each."""
    return "\n".join(dict.fromkeys(line for cell in cells if (line := cell.legend())))


@dataclass
class RunTable:
    """One row per source: its label cells, then one cell per column."""

    header: list[str]
    rows: dict[str, list[str]]  # source -> its label cells
    columns: list[Any]  # cells
    title: str = ""
    note: str = ""

    def render(self, results: Results) -> str:
        body = [[*labels, *(cell(source, results) for cell in self.columns)] for source, labels in self.rows.items()]
        return _block(self.title, markdown_table(self.header, body), _legends(self.columns), self.note)

    def sources(self) -> list[str]:
        return [*self.rows, *(s for cell in self.columns for s in cell.sources())]

    def cells(self) -> list[tuple[str, Any]]:
        """(source, cell) of every computed cell."""
        return [(source, cell) for source in self.rows for cell in self.columns]


@dataclass
class GridTable:
    """One row per label, one cell per source in it, all the same figure (e.g. quantizer x bits)."""

    header: list[str]
    rows: dict[str, list[str]]  # row label -> the sources of its cells
    cell: Any
    title: str = ""
    note: str = ""

    def render(self, results: Results) -> str:
        body = [[label, *(self.cell(s, results) for s in sources)] for label, sources in self.rows.items()]
        return _block(self.title, markdown_table(self.header, body), _legends([self.cell]), self.note)

    def sources(self) -> list[str]:
        return [*(s for sources in self.rows.values() for s in sources), *self.cell.sources()]

    def cells(self) -> list[tuple[str, Any]]:
        return [(source, self.cell) for sources in self.rows.values() for source in sources]


@dataclass
class Line:
    """A sentence with one figure: `text` with {} where cell(source) goes."""

    text: str
    source: str
    cell: Any

    def render(self, results: Results) -> str:
        return _block(self.text.format(self.cell(self.source, results)))

    def sources(self) -> list[str]:
        return [self.source, *self.cell.sources()]

    def cells(self) -> list[tuple[str, Any]]:
        return [(self.source, self.cell)]


def _one(results: Results, source: str) -> tuple[dict, Path]:
    """The single record (and its folder) of a one-seed step."""
    records, folders = results.records[source], results.folders[source]
    if len(records) != 1:
        raise ConfigError(f"{source} has {len(records)} seeds: this table shows a single run's step (set its seed)")
    return records[0], folders[0]


class OneStep:
    """A block of one step's single record (its `source`)."""

    source: str

    def sources(self) -> list[str]:
        return [self.source]


@dataclass
class VarianceTable(OneStep):
    """A `fqtrun variance` step: quantization variance per quantizer (rows) and bits (columns), and its plot."""

    source: str
    title: str = "Gradient variance (sampling variance {sampling:.2e})"  # {sampling}: the sampling variance
    per_layer_bits: Optional[int] = None  # also a table per layer (rows) at these bits, sampling beside it

    def render(self, results: Results) -> str:
        data, folder = _one(results, self.source)
        quant = data["quantization"]
        bits = sorted({int(b) for per_bits in quant.values() for b in per_bits})
        rows = [[q, *(f"{per_bits[str(b)]['total']:.2e}" for b in bits)] for q, per_bits in quant.items()]
        image = (folder / "variance.png").relative_to(results.folder)
        layers_image = folder / LAYERS_PLOT  # per layer at the lowest bits, written by the variance step
        return _block(self.title.format(sampling=data["sampling"]["total"]),
                      markdown_table(["quantizer", *(f"{b} bits" for b in bits)], rows),
                      self._per_layer(data), f"![gradient variance vs bits]({image.as_posix()})",
                      f"![gradient variance per layer at {bits[0]} bits]"
                      f"({layers_image.relative_to(results.folder).as_posix()})"
                      if self.per_layer_bits is not None and layers_image.exists() else "")

    def _per_layer(self, data: dict) -> str:
        if self.per_layer_bits is None:
            return ""
        at = {q: per_bits[str(self.per_layer_bits)] for q, per_bits in data["quantization"].items()}
        rows = [[layer, f"{var:.2e}", *(f"{a['per_layer'][layer]:.2e}" for a in at.values())]
                for layer, var in data["sampling"]["per_layer"].items()]
        rows.append(["total", f"{data['sampling']['total']:.2e}", *(f"{a['total']:.2e}" for a in at.values())])
        return markdown_table(["layer", "sampling", *(f"{q} ({self.per_layer_bits} bits)" for q in at)], rows)


@dataclass
class IntbnTable(OneStep):
    """A `fqtrun intbn` step: shift bits per converted BN, ours vs naive, and the accuracies."""

    source: str
    title: str = "Integer BN (acc_range={acc_range})"  # formatted with intbn.json's fields

    def render(self, results: Results) -> str:
        s, _ = _one(results, self.source)
        rows = [[r["bn"], str(r["channels"]), "yes" if r["verified_exact"] else "NO",
                 f"{r['shift_mean']:.1f} / {r['shift_max']}",
                 "-" if r["shift_naive_mean"] is None else f"{r['shift_naive_mean']:.1f} / {r['shift_naive_max']}"]
                for r in s["layers"]]
        header = ["BN", "channels", "exact", "shift ours mean / max", "shift naive mean / max"]
        accuracy = (f"accuracy: float BN + requant {100 * s['acc_float_bn_requant']:.2f} %, integer BN "
                    f"{100 * s['acc_integer_bn']:.2f} % (difference {100 * s['acc_difference']:+.2f}), fake-quant "
                    f"with dynamic scales {100 * s['acc_fake_quant_dynamic']:.2f} %; {len(s['kept_float'])} BNs "
                    "stay float (their output feeds a residual add).")
        return _block(self.title.format(**s), markdown_table(header, rows), accuracy)


@dataclass
class BitTraces:
    """The bit-width trace of each variant's first seed, one panel each, written to `file`."""

    runs: dict[str, str]  # panel title -> variant
    file: str = "bit_trace.png"
    title: str = "bit-width traces"

    def render(self, results: Results) -> str:
        plot_bit_traces({label: results.folders[v][0] / "metrics.jsonl" for label, v in self.runs.items()},
                        results.folder / self.file)
        return _block(f"![{self.title}]({self.file})")

    def sources(self) -> list[str]:
        return list(self.runs.values())


@dataclass
class ClaimsTable:
    """The experiment's claims (spec.Claim), each measured a − b paired by seed: the difference and its 95%
    CI, seeds agreeing, the verdict for a, and whether that supports the claim (report.paired.assess)."""

    claims: list[Claim]
    title: str = "#### The papers' claims, measured"
    directions: list[str] = field(init=False)

    def __post_init__(self):
        self.directions = []
        for i, c in enumerate(self.claims):
            try:
                self.directions.append(direction(c.key, c.better))
            except ConfigError as e:
                raise ConfigError(f"claims[{i}] ({c.claim!r}): {e}") from None

    def render(self, results: Results) -> str:
        rows = []
        for c, way in zip(self.claims, self.directions):
            m = compare(c.a, seed_values(results, c.a, c.key), c.b, seed_values(results, c.b, c.key), way)
            status, more = assess(m, c.expect.value, c.margin / c.scale)
            shown = f"{c.key}" + (f" ×{c.scale:g}" if c.scale != 1 else "") + f", {way} is better"
            margin = f" (margin {c.margin:g})" if c.expect == Expect.no_worse else ""
            rows.append([c.claim + margin, c.source, f"{c.a} − {c.b}", shown, m.interval(c.scale, c.digits),
                         f"{m.agree}/{m.n}", m.verdict_text(), status + (f" ({more})" if more else "")])
        header = ["claim", "source", "measured", "figure", "difference [95% CI]", "seeds agreeing", "verdict",
                  "the claim is"]
        legend = ("Paired by seed; verdict: better / worse when the 95% CI of the difference excludes 0, else "
                  "not resolved. A claim that a is better (worse) is supported by that verdict and contradicted by "
                  "the opposite one; a claim that a is no worse than b within a margin is supported when the CI's "
                  "worse end lies within the margin, contradicted when the whole CI is worse by more than it. "
                  "(~n seeds): about how many seeds would resolve it if the difference seen held.")
        return _block(self.title, markdown_table(header, rows), legend)

    def sources(self) -> list[str]:
        return [s for c in self.claims for s in (c.a, c.b)]


def build_blocks(exp) -> list:
    """The experiment's blocks as objects, each naming only its variants and steps, and its claims table last;
    else a one-line ConfigError.

    `fqtrun reproduce` calls it before training, so a bad table stops the run before any time is spent."""
    blocks = []
    for i, node in enumerate(exp.tables):
        try:
            blocks.append(instantiate(node, _convert_="all"))
        except InstantiationException as e:
            cause = e.__cause__ or e
            raise ConfigError(f"experiment.tables[{i}] of {exp.name} cannot be built "
                              f"({' '.join(str(cause).split())[:200]}): fix it in conf/experiment/") from None
        if numbers := [x for x in _labels(blocks[-1]) if not isinstance(x, str)]:
            raise ConfigError(f"experiment.tables[{i}] of {exp.name} has the label {numbers[0]!r}, which YAML read as "
                              "a number (unquoted 2:4 is 124 to it): quote the label in conf/experiment/")
        known = [*exp.variants, *(name for _, name, _ in steps(exp))]
        if unknown := [s for s in blocks[-1].sources() if s not in known]:
            raise ConfigError(f"experiment.tables[{i}] of {exp.name} names {unknown[0]!r}, which is no variant or "
                              f"step: use one of {', '.join(known)}")
        _check_pairs(blocks[-1], source_seeds(exp), f"experiment.tables[{i}] of {exp.name}")
    if exp.claims:
        check_claims(exp)
        try:
            blocks.append(ClaimsTable(OmegaConf.to_object(exp.claims)))
        except ConfigError as e:
            raise ConfigError(f"experiment {exp.name}: {e}") from None
    return blocks


def _check_pairs(block, seeds: dict[str, list[int]], where: str) -> None:
    """A Verdict between sources that share fewer than 2 seeds is a one-line ConfigError before any run."""
    for source, cell in getattr(block, "cells", list)():
        if isinstance(cell, Verdict) and (against := cell.against(source)):
            base = against[0]
            if len(shared := sorted(set(seeds[source]) & set(seeds[base]))) < 2:
                have = f"only seed {shared[0]}" if shared else "no seed"
                raise ConfigError(f"{where}: {source} {seeds[source]} vs {base} {seeds[base]} share {have}, "
                                  "and a paired 95% interval needs 2 or more: run both on the same seeds")


def _labels(block) -> list:
    """A table's header and row label cells (text the spec writes; the cells compute the rest)."""
    if isinstance(block, RunTable):
        return [*block.header, *(label for labels in block.rows.values() for label in labels)]
    if isinstance(block, GridTable):
        return [*block.header, *block.rows]
    return []


def experiment_report(folder: Path) -> str:
    """Render an experiment folder's tables into <folder>/tables.md (and its figures); returns the markdown."""
    results = load_results(Path(folder))
    runs = [r for name in results.spec.experiment.variants for r in results.records[name]]  # the trainings
    blocks = [block.render(results) for block in build_blocks(results.spec.experiment)]
    text = "\n".join([machine, *blocks] if (machine := machine_block(runs)) else blocks)
    (results.folder / TABLES_FILE).write_text(text, encoding="utf-8")
    return text
