"""Cost of the numerics-health probe (numerics.every, fqtrun/analysis/numerics.py) on an FQT train step.

A probe step measures every slot of every quantized layer; the other steps only read a flag. Plain and
probe steps of the same model are timed in interleaved repetitions (median per-repetition ratio), and
the overhead at numerics.every=N is (probe / plain - 1) / N of a step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fqtrun.analysis.numerics import NumericsProbe
from fqtrun.bench.harness import interleaved, median_ms, median_ratios
from fqtrun.bench.settings import BenchSettings
from fqtrun.quant.convert import quant_layers


def numerics_bench(model: torch.nn.Module, step: Callable[[], torch.Tensor], s: BenchSettings) -> dict:
    """{plain_step_ms, probe_step_ms, probe_step_x_plain, every, overhead_at_every} for `step`, one train
    step of the quantized `model`."""
    probe = NumericsProbe(list(quant_layers(model)), every=1, log_every=1)

    def probed_step():
        probe.before_step(0)  # every=1: this step is a probe step
        step()
        return probe.after_step(1, {})

    times = interleaved({"plain": step, "probe": probed_step}, s.reps, s.warmup)
    ratio = median_ratios(times, "plain")["probe"]
    return {"plain_step_ms": round(median_ms(times["plain"]), 2), "probe_step_ms": round(median_ms(times["probe"]), 2),
            "probe_step_x_plain": round(ratio, 3), "every": s.numerics_every,
            "overhead_at_every": round((ratio - 1) / s.numerics_every, 5)}
