"""Typed schemas of the `schedule` config group and the builder of the schedules they describe.

conf/schedule/<kind>.yaml extends schema/schedule/<kind>. One schedule drives the forward
bits (slots w and a); the gradient slots (dx, dw) keep quant.bits_dx / quant.bits_dw unless
schedule.grad_min_bits / grad_max_bits are set (spec/cpt.md: gradients stay fixed in CPT).
`static` with bits=null is the default and changes nothing: each slot keeps its quant bits.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore

from fqtrun.schedules import SCHEDULES, Staged, Static


@dataclass
class _ScheduleCommon:
    eval_bits: int | None = None  # forward bits at evaluation; null = max_bits (static: bits)
    grad_min_bits: int | None = None  # null: dx/dw keep quant.bits_dx/bits_dw (CPT: fixed)
    grad_max_bits: int | None = None  # one of the two set: static gradient bits at it


@dataclass
class StaticSchedule(_ScheduleCommon):
    kind: str = "static"
    bits: int | None = None  # null: leave quant.bits_w / quant.bits_a as they are


@dataclass
class CyclicSchedule(_ScheduleCommon):
    kind: str = "cyclic"
    min_bits: int = 3
    max_bits: int = 8
    cycles: int = 32  # the reference's value for every run


@dataclass
class CosineSchedule(_ScheduleCommon):
    kind: str = "cosine"
    min_bits: int = 3
    max_bits: int = 8


@dataclass
class TriangularSchedule(_ScheduleCommon):
    kind: str = "triangular"
    min_bits: int = 3
    max_bits: int = 8
    cycles: int = 32


@dataclass
class LinearSchedule(_ScheduleCommon):
    kind: str = "linear"
    min_bits: int = 3
    max_bits: int = 8


@dataclass
class StagedSchedule(_ScheduleCommon):
    kind: str = "staged"
    stages: list[Any] = field(default_factory=lambda: [[0.5, 4], [0.3, 6], [0.2, 8]])


SCHEMAS = {"static": StaticSchedule, "cyclic": CyclicSchedule, "cosine": CosineSchedule,
           "triangular": TriangularSchedule, "linear": LinearSchedule, "staged": StagedSchedule}
_NOT_ARGS = ("kind", "grad_min_bits", "grad_max_bits")


def register_configs(cs: ConfigStore) -> None:
    """Store each schema as schema/schedule/<kind>, which conf/schedule/<kind>.yaml extends."""
    for name, node in SCHEMAS.items():
        cs.store(group="schema/schedule", name=name, node=node)


@dataclass(frozen=True)
class PrecisionPlan:
    """What a schedule config asks for: forward and gradient schedules (None = leave alone)."""

    forward: Any  # a schedule for slots w, a; or None
    grad: Any  # a schedule for slots dx, dw; or None
    eval_bits: int | None  # forward bits at evaluation; None = whatever the quantizers hold
    kind: str

    @property
    def changes_bits(self) -> bool:
        return self.forward is not None or self.grad is not None or self.eval_bits is not None


def build_plan(node: Any, total_steps: int) -> PrecisionPlan:
    """Schedule config (a mapping) -> PrecisionPlan over `total_steps`; ValueError names the setting."""
    node = dict(node or {"kind": "static"})
    kind = node.get("kind", "static")
    if kind not in SCHEDULES:
        raise ValueError(f"schedule.kind={kind!r} is unknown: use schedule=<{'|'.join(SCHEDULES)}>")
    args = {k: v for k, v in node.items() if k not in _NOT_ARGS}
    if kind == "static" and args.get("bits") is None:
        forward = None
        eval_bits = args.get("eval_bits")
        if eval_bits is not None:
            Static(eval_bits)  # the same 1..32 check
    else:
        if kind == "staged":
            args["stages"] = [list(s) for s in args["stages"]]
        forward = SCHEDULES[kind](**args, total_steps=total_steps)
        eval_bits = forward.eval_bits
    return PrecisionPlan(forward, _grad_schedule(kind, forward, node, total_steps), eval_bits, kind)


def _grad_schedule(kind: str, forward: Any, node: dict, total_steps: int) -> Any:
    lo, hi = node.get("grad_min_bits"), node.get("grad_max_bits")
    if lo is None and hi is None:
        return None
    lo, hi = (hi, hi) if lo is None else (lo, lo) if hi is None else (lo, hi)
    for name, value in (("grad_min_bits", lo), ("grad_max_bits", hi)):
        if isinstance(value, bool) or not isinstance(value, int) or not 2 <= value <= 16:
            raise ValueError(f"schedule.{name}={value!r} must be an integer in 2..16 "
                             "(stochastic-rounding gradient quantizers)")
    if lo == hi:
        return Static(lo, total_steps=total_steps)
    if forward is None or isinstance(forward, (Static, Staged)):
        raise ValueError(f"schedule={kind} has no rising shape for the gradient bits to follow: set "
                         f"schedule.grad_min_bits=schedule.grad_max_bits (static gradient bits) or use "
                         "schedule=cyclic|cosine|triangular|linear")
    return dataclasses.replace(forward, min_bits=lo, max_bits=hi, eval_bits=None)
