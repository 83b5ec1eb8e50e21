"""Precision Range Test: find CPT's q_min from short trainings (spec/cpt.md, "Precision Range Test").

For b = b_start, b_start + 1, ..., b_max: train K steps at forward precision b (through a
callback, so no trainer is needed), delta = mean train accuracy over the last w steps minus
over the first w; q_min is the first b with delta > tau. The callback decides whether the
model carries over between precisions (the paper: the first epochs of one run) or restarts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from fqtrun.quant.bits import check_bits

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
    check_bits(b_start, "prt.b_start")
    check_bits(b_max, "prt.b_max")
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


def result_record(res: PRTResult, settings) -> dict:
    w = res.window
    return {
        "q_min": res.q_min,
        "q_max": res.b_max,
        "override": res.override,
        "summary": res.summary(),
        "settings": {"b_start": settings.b_start, "b_max": settings.b_max, "steps_per_bits": settings.steps_per_bits,
                     "window": w, "threshold": res.threshold, "fresh_model": bool(settings.fresh_model)},
        "trace": [{"bits": b, "gain": t.delta, "acc_first": sum(t.accs[:w]) / w, "acc_last": sum(t.accs[-w:]) / w,
                   "accs": list(t.accs)} for b, t in res.trace.items()],
    }


def plot_prt(res: PRTResult, out_png: Path) -> Path:
    """Left: per-step train accuracy, one colour per precision; right: the gain per precision vs tau."""
    from matplotlib.figure import Figure

    from fqtrun.figures import save_figure

    fig = Figure(figsize=(10, 3.5))
    left, right = fig.subplots(1, 2)
    start = 0
    for b, t in res.trace.items():
        left.plot(range(start, start + len(t.accs)), t.accs, linewidth=0.8, label=f"{b} bits")
        start += len(t.accs)
    left.set_xlabel("step")
    left.set_ylabel("train batch accuracy")
    left.legend(fontsize=7)
    bits = list(res.trace)
    colors = ["tab:green" if b == res.q_min else "tab:gray" for b in bits]
    right.bar(bits, [res.trace[b].delta for b in bits], color=colors)
    right.axhline(res.threshold, color="tab:red", linestyle="--", label=f"threshold {res.threshold:g}")
    right.set_xticks(bits)
    right.set_xlabel("forward bits")
    right.set_ylabel(f"acc gain (last {res.window} - first {res.window})")
    right.set_title(f"q_min = {res.q_min}" if res.found else "no q_min found", fontsize=9)
    right.legend(fontsize=7)
    return save_figure(fig, out_png)
