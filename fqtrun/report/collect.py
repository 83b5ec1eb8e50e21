"""Find the runs under some folders, read what each left behind, and group them by their settings.

A run is a folder with .hydra/config.yaml and at least one of metrics.jsonl, summary.json,
failed.json (a sweep job that failed) or variance.json (`fqtrun variance`). Single runs and
multirun sweeps look the same from here. Reading never raises on a damaged run: what could not
be read becomes a line in `Run.problems`, and `Run.skip_reason` says why a run is left out.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

MARKERS = ("metrics.jsonl", "summary.json", "failed.json", "variance.json")
NOT_RUNS = {".hydra", ".submitit", "wandb", "__pycache__", ".git"}  # never searched for runs


def headline(summary: dict) -> str:
    """The metric a run's summary leads with (acc for classification, loss for language models; a
    summary written before the key existed is a classification run's)."""
    return str(summary.get("headline", "acc"))


def needed(summary: dict) -> tuple[str, str]:
    """The keys a summary cannot enter the table without: its final and best headline metric."""
    return f"final_test_{headline(summary)}", f"best_test_{headline(summary)}"


@dataclass
class Run:
    path: Path
    overrides: list[str]
    config: dict
    summary: dict | None = None
    metrics: list[dict] = field(default_factory=list)
    failed: dict | None = None
    variance: dict | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def is_training(self) -> bool:
        return self.summary is not None or self.failed is not None or bool(self.metrics)

    @property
    def done(self) -> bool:
        return self.summary is not None and all(isinstance(self.summary.get(k), (int, float))
                                                for k in needed(self.summary))

    @property
    def skip_reason(self) -> str | None:
        """Why the run is not in the table (None: it is, as done or as failed)."""
        if self.done or self.failed is not None:
            return None
        if self.summary is not None:
            missing = [k for k in needed(self.summary) if not isinstance(self.summary.get(k), (int, float))]
            return f"summary.json lacks {', '.join(missing)}"
        if self.variance is not None:
            return None  # a `fqtrun variance` run: only the variance plot uses it
        unread = any(p.startswith("summary.json") for p in self.problems)
        why = [] if unread else ["no summary.json (unfinished, killed, or still running)"]
        return "; ".join([*why, *self.problems])

    @property
    def seed(self):
        return self.config.get("seed")


def find_runs(dirs: list[Path]) -> tuple[list[Path], list[tuple[Path, str]]]:
    """(run folders, [(folder, why) for .hydra folders that hold nothing to report]), sorted."""
    runs, empty = set(), set()
    for top in dirs:
        for here, subdirs, files in os.walk(top):
            path = Path(here)
            if (path / ".hydra" / "config.yaml").is_file():
                (runs if any(m in files for m in MARKERS) else empty).add(path)
                subdirs[:] = []  # a run folder holds no further runs
                continue
            subdirs[:] = sorted(d for d in subdirs if d not in NOT_RUNS)
    why = f"nothing to report (none of {', '.join(MARKERS)})"
    return sorted(runs, key=_natural), [(p, why) for p in sorted(empty, key=_natural)]


def load_run(path: Path) -> Run:
    """Read one run folder; damaged or missing files become problems, never exceptions."""
    problems: list[str] = []
    try:
        config = OmegaConf.to_container(OmegaConf.load(path / ".hydra" / "config.yaml"), resolve=False)
    except (OSError, ValueError, yaml.YAMLError, OmegaConfBaseException) as e:
        config, problems = {}, [f".hydra/config.yaml unreadable ({type(e).__name__})"]
    summary = _read_json(path / "summary.json", problems)
    overrides = _read_overrides(path / ".hydra" / "overrides.yaml")
    if overrides is None:
        overrides = list(summary.get("overrides", [])) if summary else []
    metrics = _read_metrics(path / "metrics.jsonl", problems)
    failed = _read_json(path / "failed.json", problems)
    variance = _read_json(path / "variance.json", problems)
    config = config if isinstance(config, dict) else {}
    return Run(path, overrides, config, summary, metrics, failed, variance, problems)


def _read_json(path: Path, problems: list[str]) -> dict | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        problems.append(f"{path.name} is not valid JSON (truncated?)")
        return None
    if not isinstance(data, dict):
        problems.append(f"{path.name} is not a JSON object")
        return None
    return data


def _read_overrides(path: Path) -> list[str] | None:
    try:
        data = OmegaConf.to_container(OmegaConf.load(path))
    except (OSError, ValueError, yaml.YAMLError, OmegaConfBaseException):  # absent or damaged: use summary's
        return None
    return [str(o) for o in data] if isinstance(data, list) else None


def _read_metrics(path: Path, problems: list[str]) -> list[dict]:
    """The records of metrics.jsonl up to the first damaged line ("nan"/"inf" strings -> floats)."""
    if not path.is_file():
        return []
    records = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                problems.append(f"metrics.jsonl line {number} is not valid JSON (truncated?): "
                                f"kept the {len(records)} records before it")
                break
            if isinstance(rec, dict):
                records.append({k: _number(v) for k, v in rec.items()})
    return records


def _number(v):
    if isinstance(v, str) and v.lower() in ("nan", "inf", "-inf", "infinity", "-infinity"):
        return float(v)
    return v


# ----- grouping --------------------------------------------------------------------------------
def override_pairs(overrides: list[str], ignore: list[str]) -> tuple[tuple[str, str], ...]:
    """Sorted (key, value) of the overrides that define an experiment: the seed and the keys in
    `ignore` (and their sub-keys) left out, a leading + / ++ dropped."""
    pairs = {}
    for o in overrides:
        key, sep, value = o.partition("=")
        key = key.lstrip("+")
        if not sep or any(key == i or key.startswith(i + ".") for i in ignore):
            continue
        pairs[key] = value
    return tuple(sorted(pairs.items()))


@dataclass
class Group:
    key: tuple[tuple[str, str], ...]
    runs: list[Run]  # done and failed

    @property
    def label(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.key) or "(defaults)"

    @property
    def done(self) -> list[Run]:
        return [r for r in self.runs if r.done]

    @property
    def failed(self) -> list[Run]:
        return [r for r in self.runs if not r.done]


def group_runs(runs: list[Run], ignore: list[str]) -> list[Group]:
    """Training runs in the table (done or failed) grouped by override_pairs, in natural order."""
    groups: dict[tuple, list[Run]] = {}
    for r in runs:
        if r.is_training and r.skip_reason is None:
            groups.setdefault(override_pairs(r.overrides, ignore), []).append(r)
    return [Group(k, v) for k, v in sorted(groups.items(), key=lambda kv: _natural_key(kv[0]))]


def varying_keys(groups: list[Group]) -> tuple[list[str], dict[str, str]]:
    """(override keys whose value differs between groups, {key: value} shared by all groups)."""
    keys = sorted({k for g in groups for k, _ in g.key})
    values = {k: {dict(g.key).get(k) for g in groups} for k in keys}
    common = {k: next(iter(v)) for k, v in values.items() if len(v) == 1 and None not in v}
    return [k for k in keys if k not in common], common


def _natural_key(pairs) -> tuple:
    """Sort 4 before 16: numbers by value, then text."""
    out = []
    for k, v in pairs:
        try:
            num = float(v)
            out.append((k, 0, num if math.isfinite(num) else 0.0, v))
        except ValueError:
            out.append((k, 1, 0.0, v))
    return tuple(out)


def _natural(path: Path) -> tuple:
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in path.parts)
