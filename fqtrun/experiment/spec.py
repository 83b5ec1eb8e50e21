"""The schema of a documented experiment (conf/experiment/<name>.yaml) and of `fqtrun reproduce`'s config.

An experiment is a grid of `fqtrun train` runs (variants x seeds, each variant a list of overrides
after the experiment's common ones), follow-up steps on trained runs (`fqtrun variance`, `fqtrun
mask`, `fqtrun intbn`, each with its own overrides), and the blocks of its tables.md (tables, lines,
figures: fqtrun.report.experiment classes, built with instantiate from their `_target_`), and the
comparisons the papers claim (claims: measured paired by seed, fqtrun.report.paired).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from fqtrun.errors import ConfigError
from fqtrun.numerics_mode import NumericsModeConfig

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


class Expect(Enum):
    """What a claim expects of a against b (fqtrun.report.paired.assess): `better` / `worse`: the 95%
    interval of a − b lies wholly on that side of 0; `no_worse`: a is at most `margin` worse, i.e. the
    interval's worse end is within the margin of 0 (a non-inferiority reading)."""

    better = "better"
    worse = "worse"
    no_worse = "no_worse"


@dataclass
class Claim:
    """A comparison a paper claims, measured on a and b paired by seed; tables.md's claims table says whether
    the measurement supports it, contradicts it or does not resolve it."""

    claim: str = MISSING  # the claim in words, e.g. "PTQ 4-bit worse than BHQ 4-bit"
    source: str = MISSING  # where it is claimed, e.g. "Chen et al. 2020 (spec/fqt.md)"
    a: str = MISSING  # the variant or step the claim is about
    b: str = MISSING  # the one it is compared with (same seeds)
    key: str = MISSING  # the figure compared (a summary key, dotted for nested ones)
    expect: Expect = MISSING
    margin: float = 0.0  # expect=no_worse: how much worse a may be, in the shown units (key x scale)
    better: Optional[str] = None  # higher | lower; null: from the key's name (acc: higher; loss: lower)
    scale: float = 1.0  # shown as key x scale (100: accuracy in points)
    digits: int = 2


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
    claims: list[Claim] = field(default_factory=list)  # the papers' comparisons: tables.md's claims table


@dataclass
class ReproduceConfig:
    experiment: ExperimentConfig = MISSING
    jobs: int = 1  # trainings at a time, each in its own process with one torch thread (1: in this process)
    out: str = "results/${experiment.name}"
    overrides: list[str] = field(default_factory=list)  # added to every training run last (e.g. epochs=1)
    # portable numerics for every run and step (fqtrun/numerics_mode.py): the same tables on any x86-64 CPU
    numerics: NumericsModeConfig = field(default_factory=lambda: NumericsModeConfig(portable=True))


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


def source_seeds(exp) -> dict[str, list[int]]:
    """The seeds of every source (variant or step) by name."""
    return {name: variant_seeds(exp, name) for name in exp.variants} | {
        name: step_seeds(exp, step) for _, name, step in steps(exp)}


def check_experiment(exp) -> None:
    """One-line ConfigError for an experiment that cannot run: no runs, a step on an unknown variant or
    seed, a name used twice, a claim that cannot be measured (check_claims)."""
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
    check_claims(exp)


def check_claims(exp) -> None:
    """One-line ConfigError for a claim naming no variant or step, comparing a source with itself, on fewer
    than 2 shared seeds (a 95% interval needs 2), or with a margin its expectation does not read."""
    seeds = source_seeds(exp)
    for i, c in enumerate(exp.claims):
        where = f"experiment {exp.name}: claims[{i}] ({c.claim!r})"
        for side in ("a", "b"):
            if c[side] not in seeds:
                raise ConfigError(f"{where}: {side}={c[side]} is no variant or step: use one of "
                                  f"{', '.join(seeds)}")
        if c.a == c.b:
            raise ConfigError(f"{where} compares {c.a} with itself: set b to the variant it is compared with")
        shared = sorted(set(seeds[c.a]) & set(seeds[c.b]))
        if len(shared) < 2:
            have = f"only seed {shared[0]}" if shared else "no seed"
            raise ConfigError(f"{where}: {c.a} {seeds[c.a]} and {c.b} {seeds[c.b]} share {have}, and a "
                              "paired 95% interval needs 2 or more: run both on the same seeds (experiment.seeds)")
        if c.margin < 0 or (c.margin and c.expect != Expect.no_worse):
            raise ConfigError(f"{where}: margin={c.margin}: a margin is 0 or more and only reads with "
                              "expect=no_worse")
