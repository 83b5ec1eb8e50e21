"""Typed schemas of the `schedule` config group; conf/schedule/<name>.yaml extends one of them.

Each is partial (`_partial_: true`): the run length is known only once the data is, so the
trainer builds the schedule with `instantiate(cfg.schedule)(total_steps=N)`. One schedule drives
the forward bits (slots w and a); the gradient slots (dx, dw) keep quant.bits_dx / quant.bits_dw
unless grad_min_bits / grad_max_bits are set (spec/cpt.md: gradients stay fixed in CPT).
`static` with bits=null is the default and changes nothing: each slot keeps its quant bits.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore

_PKG = "fqtrun.precision.schedules"


@dataclass
class _ScheduleCommon:
    _partial_: bool = True
    eval_bits: int | None = None  # forward bits at evaluation; null = max_bits (static: bits)
    grad_min_bits: int | None = None  # null: dx/dw keep quant.bits_dx/bits_dw (CPT: fixed)
    grad_max_bits: int | None = None  # one of the two set: static gradient bits at it


@dataclass
class StaticSchedule(_ScheduleCommon):
    _target_: str = f"{_PKG}.Static"
    bits: int | None = None  # null: leave quant.bits_w / quant.bits_a as they are


@dataclass
class CyclicSchedule(_ScheduleCommon):
    _target_: str = f"{_PKG}.Cyclic"
    min_bits: int = 3
    max_bits: int = 8
    cycles: int = 32  # the reference's value for every run


@dataclass
class CosineSchedule(_ScheduleCommon):
    _target_: str = f"{_PKG}.CosineGrowth"
    min_bits: int = 3
    max_bits: int = 8


@dataclass
class TriangularSchedule(CyclicSchedule):
    _target_: str = f"{_PKG}.Triangular"


@dataclass
class LinearSchedule(CosineSchedule):
    _target_: str = f"{_PKG}.Linear"


@dataclass
class StagedSchedule(_ScheduleCommon):
    _target_: str = f"{_PKG}.Staged"
    stages: list[Any] = field(default_factory=lambda: [[0.5, 4], [0.3, 6], [0.2, 8]])


SCHEMAS = {"static": StaticSchedule, "cyclic": CyclicSchedule, "cosine": CosineSchedule,
           "triangular": TriangularSchedule, "linear": LinearSchedule, "staged": StagedSchedule}


def register_configs(cs: ConfigStore) -> None:
    """Store each schema as schema/schedule/<name>, which conf/schedule/<name>.yaml extends."""
    for name, node in SCHEMAS.items():
        cs.store(group="schema/schedule", name=name, node=node)
