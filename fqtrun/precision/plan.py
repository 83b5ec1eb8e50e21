"""The precision plan of a run: which schedule drives the forward slots, which the gradient slots,
and the evaluation precision (spec/cpt.md)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from fqtrun.precision.schedules import SCHEDULES, Staged, Static

_KIND = {cls: name for name, cls in SCHEDULES.items()}


@dataclass(frozen=True)
class PrecisionPlan:
    """Forward and gradient schedules (None = leave those slots alone) and the eval bits."""

    forward: Any  # a schedule for slots w, a; or None
    grad: Any  # a schedule for slots dx, dw; or None
    eval_bits: int | None  # forward bits at evaluation; None = whatever the quantizers hold
    kind: str

    @property
    def changes_bits(self) -> bool:
        return self.forward is not None or self.grad is not None or self.eval_bits is not None

    def describe(self) -> str:
        """One line: what drives w/a, what drives dx/dw, the eval precision."""
        fwd = self._one(self.forward) if self.forward is not None else "quant.bits_w/bits_a"
        grad = self._one(self.grad) if self.grad is not None else "quant.bits_dx/bits_dw"
        ev = self.eval_bits if self.eval_bits is not None else "quant.bits_w/bits_a"
        return f"w/a: {fwd}; dx/dw: {grad}; eval at {ev}"

    def _one(self, s) -> str:
        if s.min_bits == s.max_bits:
            return f"static {s.max_bits}"
        if self.kind == "staged":
            return "staged " + ",".join(f"{f:g}:{b}" for f, b in s.stages)
        period = getattr(s, "period", None)
        cycles = f" ({s.cycles} cycles of {period} steps)" if period else ""
        return f"{self.kind} {s.min_bits}..{s.max_bits}{cycles}"


def plan_of(schedule: Any) -> PrecisionPlan:
    """The plan a built schedule asks for; ValueError naming the setting when it cannot apply."""
    kind = _KIND[type(schedule)]
    forward = None if isinstance(schedule, Static) and schedule.bits is None else schedule
    return PrecisionPlan(forward, _grad_schedule(kind, schedule, forward), schedule.eval_bits, kind)


def _grad_schedule(kind: str, schedule: Any, forward: Any) -> Any:
    lo, hi = schedule.grad_min_bits, schedule.grad_max_bits
    if lo is None and hi is None:
        return None
    lo, hi = (hi, hi) if lo is None else (lo, lo) if hi is None else (lo, hi)
    if lo == hi:
        return Static(lo, total_steps=schedule.total_steps)
    if forward is None or isinstance(forward, (Static, Staged)):
        raise ValueError(f"schedule={kind} has no rising shape for the gradient bits to follow: set "
                         f"schedule.grad_min_bits=schedule.grad_max_bits (static gradient bits) or use "
                         "schedule=cyclic|cosine|triangular|linear")
    return dataclasses.replace(forward, min_bits=lo, max_bits=hi, eval_bits=None, grad_min_bits=None,
                               grad_max_bits=None)
