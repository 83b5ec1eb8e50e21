"""The schema of a README experiment (conf/experiment/<name>.yaml) and of `fqtrun reproduce`'s config.

An experiment is a grid of `fqtrun train` runs (variants x seeds, each variant a list of overrides
after the experiment's common ones), follow-up steps on trained runs (`fqtrun variance`, `fqtrun
mask`, `fqtrun intbn`, each with its own overrides), and the blocks of its tables.md (tables, lines,
figures: fqtrun.report.experiment classes, built with instantiate from their `_target_`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from fqtrun.errors import ConfigError

STEP_KINDS = ("variance", "mask", "intbn")  # the follow-up commands, in the order they run


@dataclass
class Variant:
    """One setting of the grid: `fqtrun train <common> <overrides> seed=<k>` for each of its seeds."""

    overrides: list[str] = field(default_factory=list)
    seeds: Optional[list[int]] = None  # null: the experiment's seeds


@dataclass
class Step:
    """`fqtrun <kind> checkpoint=<run>/last.pt <overrides>` on the trained run(s) of one variant."""

    run: str = MISSING  # the variant whose trained run the step reads
    seed: Optional[int] = None  # that seed's run alone; null: every seed of the variant
    overrides: list[str] = field(default_factory=list)


@dataclass
class ExperimentConfig:
    name: str = MISSING  # the default output folder is results/<name>
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    common: list[str] = field(default_factory=list)  # train overrides of every run, before the variant's
    variants: dict[str, Variant] = field(default_factory=dict)
    # follow-up steps by kind; their names share one namespace with the variants (the tables' sources)
    variance: dict[str, Step] = field(default_factory=dict)  # model and dataset come from the run
    mask: dict[str, Step] = field(default_factory=dict)
    intbn: dict[str, Step] = field(default_factory=dict)
    tables: list[Any] = field(default_factory=list)  # tables.md's blocks, in order (fqtrun.report.experiment)


@dataclass
class ReproduceConfig:
    experiment: ExperimentConfig = MISSING
    jobs: int = 1  # trainings at a time, each in its own process with one torch thread (1: in this process)
    out: str = "results/${experiment.name}"
    overrides: list[str] = field(default_factory=list)  # added to every training run last (e.g. epochs=1)


def register_configs(cs: ConfigStore | None = None) -> None:
    (cs or ConfigStore.instance()).store(name="reproduce_schema", node=ReproduceConfig)


def steps(exp) -> list[tuple[str, str, Any]]:
    """(kind, name, step) of every follow-up step, in the order they run."""
    return [(kind, name, step) for kind in STEP_KINDS for name, step in exp[kind].items()]


def variant_seeds(exp, variant: str) -> list[int]:
    seeds = exp.variants[variant].seeds
    return list(exp.seeds if seeds is None else seeds)


def step_seeds(exp, step) -> list[int]:
    return variant_seeds(exp, step.run) if step.seed is None else [step.seed]


def check_experiment(exp) -> None:
    """One-line ConfigError for an experiment that cannot run: no runs, a step on an unknown variant or
    seed, a name used twice."""
    where = f"experiment {exp.name}"
    if not exp.variants:
        raise ConfigError(f"{where} has no variants: add experiment.variants.<name>.overrides=[...]")
    for name in exp.variants:
        if not variant_seeds(exp, name):
            raise ConfigError(f"{where}: variant {name} has no seeds: set experiment.seeds or its seeds")
    names = list(exp.variants)
    for kind, name, step in steps(exp):
        if step.run not in exp.variants:
            raise ConfigError(f"{where}: experiment.{kind}.{name}.run={step.run} is not a variant: use one of "
                              f"{', '.join(exp.variants)}")
        if step.seed is not None and step.seed not in variant_seeds(exp, step.run):
            raise ConfigError(f"{where}: experiment.{kind}.{name}.seed={step.seed} is not a seed of variant "
                              f"{step.run} ({variant_seeds(exp, step.run)})")
        names.append(name)
    if twice := sorted({n for n in names if names.count(n) > 1}):
        raise ConfigError(f"{where}: the name {twice[0]} is used twice (variants and steps share one namespace)")
