"""Precision Range Test: find CPT's q_min from short trainings (spec/cpt.md, "Precision Range Test").

For b = b_start, b_start + 1, ..., b_max: train K steps at forward precision b (through a
callback, so no trainer is needed), delta = mean train accuracy over the last w steps minus
over the first w; q_min is the first b with delta > tau. The callback decides whether the
model carries over between precisions (the paper: the first epochs of one run) or restarts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

TrainSteps = Callable[[int, int], Sequence[float]]  # (bits, k) -> k train accuracies


@dataclass(frozen=True)
class BitsTrial:
    """The K per-step train accuracies at one precision and their improvement delta."""

    accs: tuple[float, ...]
    delta: float


@dataclass(frozen=True)
class PRTResult:
    """q_min (None when no precision up to b_max improved), the trace per bits, the settings."""

    q_min: int | None
    b_max: int
    trace: dict[int, BitsTrial]
    threshold: float
    window: int

    @property
    def found(self) -> bool:
        return self.q_min is not None

    @property
    def override(self) -> str | None:
        """Hydra overrides for a CPT run between q_min and b_max, or None when nothing was found."""
        if self.q_min is None:
            return None
        return f"schedule=cyclic schedule.min_bits={self.q_min} schedule.max_bits={self.b_max}"

    def summary(self) -> str:
        """One line for the log: the choice, or why there is none."""
        deltas = ", ".join(f"{b}:{trial.delta:+.3f}" for b, trial in self.trace.items())
        if self.q_min is None:
            return (
                f"PRT: no precision in {min(self.trace)}..{self.b_max} improved train accuracy by more than "
                f"{self.threshold} (deltas {deltas}); train longer per precision, lower prt.threshold or raise prt.b_max"
            )
        return f"PRT: q_min={self.q_min} (deltas {deltas}); suggested: {self.override}"


def accuracy_delta(accs: Sequence[float], window: int) -> float:
    """Mean of the last `window` accuracies minus the mean of the first `window`."""
    return sum(accs[-window:]) / window - sum(accs[:window]) / window


def precision_range_test(
    train_steps: TrainSteps,
    b_start: int = 2,
    b_max: int = 8,
    steps_per_bits: int = 100,
    window: int = 10,
    threshold: float = 0.05,
) -> PRTResult:
    """Raise the forward precision from b_start until K steps of training improve accuracy by > tau."""
    for name, value, low in (("b_start", b_start, 1), ("b_max", b_max, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= 32:
            raise ValueError(f"prt.{name}={value!r} must be an integer bit-width in 1..32")
    if b_start > b_max:
        raise ValueError(f"prt.b_start={b_start} must be <= prt.b_max={b_max}")
    if not isinstance(window, int) or window < 1:
        raise ValueError(f"prt.window={window!r} must be an integer >= 1")
    if not isinstance(steps_per_bits, int) or steps_per_bits < 2 * window:
        raise ValueError(
            f"prt.steps_per_bits={steps_per_bits!r} must be an integer >= 2 * prt.window={2 * window}: "
            "the first and last windows must not overlap"
        )
    trace: dict[int, BitsTrial] = {}
    for bits in range(b_start, b_max + 1):
        accs = tuple(float(a) for a in train_steps(bits, steps_per_bits))
        if len(accs) != steps_per_bits:
            raise ValueError(
                f"prt: train_steps({bits}, {steps_per_bits}) returned {len(accs)} accuracies; it must return one per step"
            )
        trace[bits] = BitsTrial(accs, accuracy_delta(accs, window))
        if trace[bits].delta > threshold:
            return PRTResult(bits, b_max, trace, threshold, window)
    return PRTResult(None, b_max, trace, threshold, window)
