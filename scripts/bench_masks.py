"""Mask search speed on one weight (spec performance.md, target 4).

Times row-wise 2:4, exact transposable 2:4 (target < 100 ms at 4096^2), greedy transposable
4:8 (target < 1 s) and exact transposable 4:8 (batched min-cost flow), next to
tensor.clone() of the same weight as the memory-speed floor, so the ratios stay meaningful on
a shared, noisy machine. Prints a table and writes JSON.

    python scripts/bench_masks.py --out bench_masks.json [--size 4096] [--reps 5] [--no-flow]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from fqtrun.sparsity.masks import nm_mask, transposable_mask


def median_ms(fn, reps: int) -> tuple[float, list[float]]:
    fn()  # warm-up: pattern tables, allocator
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times), times


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench_masks.json")
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--flow-reps", type=int, default=1, help="reps of the slow exact 4:8 search")
    p.add_argument("--no-flow", action="store_true", help="skip exact 4:8 (tens of seconds at 4096^2)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave as is)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    w = torch.randn(args.size, args.size, generator=torch.Generator().manual_seed(0))

    cases = [
        ("clone (floor)", lambda: w.clone(), args.reps, None),
        ("row-wise 2:4", lambda: nm_mask(w, 2, 4), args.reps, None),
        ("transposable 2:4 exact", lambda: transposable_mask(w, 2, 4, "exact"), args.reps, 100.0),
        ("transposable 4:8 greedy", lambda: transposable_mask(w, 4, 8, "greedy"), args.reps, 1000.0),
    ]
    if not args.no_flow:
        cases.append(
            ("transposable 4:8 exact", lambda: transposable_mask(w, 4, 8, "exact"), args.flow_reps, None)
        )

    rows = []
    for name, fn, reps, target in cases:
        med, times = median_ms(fn, reps) if "4:8 exact" not in name else _no_warmup(fn, reps)
        rows.append({"name": name, "median_ms": med, "times_ms": times, "target_ms": target})
    floor = rows[0]["median_ms"]
    for r in rows:
        r["x_clone"] = r["median_ms"] / floor

    print(
        f"mask search on a {args.size} x {args.size} fp32 weight, torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print(f"{'operation':<26}{'median ms':>12}{'x clone':>10}{'target ms':>11}")
    for r in rows:
        tgt = "" if r["target_ms"] is None else f"{r['target_ms']:.0f}"
        print(f"{r['name']:<26}{r['median_ms']:>12.1f}{r['x_clone']:>10.1f}{tgt:>11}")

    result = {
        "size": args.size,
        "reps": args.reps,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "results": rows,
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")
    return result


def _no_warmup(fn, reps):
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times), times


if __name__ == "__main__":
    main()
