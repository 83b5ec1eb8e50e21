"""Overhead of the numerics-health probe (numerics.every) on the bench MLP's FQT train step (int8 by default).

A probe step measures every slot of every layer (fqtrun/quant/health.py); the other steps only read a
flag. Plain steps and probe steps of the same model are timed in interleaved repetitions (the bench's
harness: median per-repetition ratios, so a shared machine's drift cancels), and the overhead at
numerics.every=N is (probe / plain - 1) / N of a step. Prints a table and writes JSON.

    python scripts/bench_numerics.py --out bench_numerics.json [--reps 15] [--threads 2] [--every 100]
        [--backend simulate]   # where torch._int_mm has no fast kernel (a CPU without AVX-512 VNNI)
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from fqtrun.analysis.numerics import NumericsProbe
from fqtrun.bench.harness import interleaved, median_ms, median_ratios
from fqtrun.bench.models import MLPBlocks, fqt_model
from fqtrun.bench.settings import BenchSettings
from fqtrun.bench.suite import step_fn
from fqtrun.quant.convert import quant_layers


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench_numerics.json")
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--every", type=int, default=100, help="numerics.every the overhead is stated for")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--no-compile", action="store_true", help="eager quantizers (the bench compiles them)")
    p.add_argument("--backend", default="int8", choices=["int8", "simulate"], help="the FQT step's GEMMs")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    s = BenchSettings(compile=not args.no_compile)  # the bench's MLP, FQT recipe and sizes
    torch.manual_seed(0)
    model = fqt_model(MLPBlocks(s.width, s.hidden, s.blocks, s.classes), s, args.backend)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch_size, s.width, generator=g)
    y = torch.randint(0, s.classes, (args.batch_size,), generator=g)
    step = step_fn(model, x, y, autocast=False)
    probe = NumericsProbe(list(quant_layers(model)), every=1, log_every=1)

    def probed_step():
        probe.before_step(0)  # every=1: this step is a probe step
        step()
        return probe.after_step(1, {})

    load_before = os.getloadavg()
    times = interleaved({"plain step": step, "probe step": probed_step}, args.reps, args.warmup)
    ratio = median_ratios(times, "plain step")["probe step"]
    result = {
        "model": f"{s.blocks} x (Linear {s.width}->{s.hidden}, GELU, Linear {s.hidden}->{s.width}), batch "
                 f"{args.batch_size}, FQT {args.backend} ({s.grad} {s.bits}-bit, compiled quantizers: "
                 f"{s.compile})",
        "threads": args.threads, "reps": args.reps, "torch": torch.__version__,
        "load_before": load_before, "load_after": os.getloadavg(),
        "plain_step_ms": round(median_ms(times["plain step"]), 2),
        "probe_step_ms": round(median_ms(times["probe step"]), 2),
        "probe_step_x_plain": round(ratio, 3),
        "every": args.every,
        "overhead_at_every": round((ratio - 1) / args.every, 5),
    }
    overhead = 100 * result["overhead_at_every"]
    print(f"plain step {result['plain_step_ms']} ms, probe step {result['probe_step_ms']} ms "
          f"({ratio:.2f}x): overhead at numerics.every={args.every} = {overhead:.2f}% of a step "
          f"({args.threads} threads, load {load_before[0]:.1f} -> {result['load_after'][0]:.1f})")
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
