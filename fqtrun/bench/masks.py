"""Mask search speed on one square weight (spec/performance.md, target 4).

Row-wise 2:4, exact transposable 2:4 (target < 100 ms at 4096^2), greedy transposable 4:8 (target
< 1 s) and exact transposable 4:8 (batched min-cost flow: seconds, timed alone without a warm-up),
each against tensor.clone() of the same weight, the memory-speed floor, so the ratios stay meaningful
on a shared, noisy machine.
"""

from __future__ import annotations

import time

import torch

from fqtrun.bench.harness import interleaved, median_ms, median_ratios
from fqtrun.bench.settings import BenchSettings
from fqtrun.sparsity.masks import nm_mask, transposable_mask

FLOOR = "clone() (floor)"
TARGETS_MS = {"transposable 2:4, exact": 100.0, "transposable 4:8, greedy": 1000.0}


def mask_bench(s: BenchSettings, seed: int) -> dict:
    """{operation: {median_ms, x_clone, target_ms}} on a bench.mask_size square fp32 weight."""
    w = torch.randn(s.mask_size, s.mask_size, generator=torch.Generator().manual_seed(seed))
    fns = {FLOOR: w.clone, "row-wise 2:4": lambda: nm_mask(w, 2, 4),
           "transposable 2:4, exact": lambda: transposable_mask(w, 2, 4, "exact"),
           "transposable 4:8, greedy": lambda: transposable_mask(w, 4, 8, "greedy")}
    times = interleaved(fns, s.mask_reps, warmup=1)
    ratios = median_ratios(times, FLOOR)
    # 3 significant digits: a fast CPU clones the small default weight in about a microsecond
    rows = {k: {"median_ms": float(f"{median_ms(v):.3g}"), "x_clone": round(ratios[k], 2)} for k, v in times.items()}
    if s.mask_flow:
        flow = []
        for _ in range(s.mask_flow_reps):
            t0 = time.perf_counter()
            transposable_mask(w, 4, 8, "exact")
            flow.append(time.perf_counter() - t0)
        rows["transposable 4:8, exact (min-cost flow)"] = {
            "median_ms": float(f"{median_ms(flow):.3g}"), "x_clone": round(median_ms(flow) / median_ms(times[FLOOR]), 1)}
    for k, row in rows.items():
        row["target_ms"] = TARGETS_MS.get(k)
    return {"size": s.mask_size, "rows": rows}
