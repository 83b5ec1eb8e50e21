"""The cost of portable numerics: a train step with numerics.portable=true vs native, per model.

    .venv/bin/python scripts/bench_portable.py [--reps 15] [--steps 20] [--threads 1]

Portable and native kernels cannot live in one process (ATen and MKL pick theirs once), so each model gets
two worker processes, one pinned (fqtrun/numerics_mode.py ENV) and one native, that stay alive: every
repetition times `steps` optimizer steps (forward, backward, step; the real model, data and optimizer of
`fqtrun train <overrides>`) in each, in alternating order, and the figure is the median over repetitions of
portable time / native time, so slow phases of a shared machine hit both sides of a ratio alike.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from fqtrun.numerics_mode import ENV

MODELS = {"cnn1d (mnist1d)": [], "gpt (text)": ["model=gpt", "dataset=text"]}


def worker(overrides: list[str], steps: int, threads: int) -> None:
    """Build the run, then for every line on stdin time `steps` train steps and print the seconds."""
    import torch

    from fqtrun.build import assemble
    from fqtrun.config import compose_conf, register_configs
    from fqtrun.data.loader import make_loader
    from fqtrun.numerics_mode import numerics

    register_configs()
    cfg = compose_conf("train", [*overrides, "logger.wandb.mode=disabled", f"threads={threads}"])
    portable = os.environ.get("FQTRUN_PORTABLE") == "1"
    with numerics(portable, threads):
        torch.set_num_threads(threads)
        run = assemble(cfg, torch.device("cpu"), noise_seed=0)
        x, y = next(iter(make_loader(run.bundle.train, cfg.batch_size, shuffle=True, seed=0)))

        def step() -> None:
            run.optimizer.zero_grad(set_to_none=True)
            run.task.loss(run.model(x), y).backward()
            run.optimizer.step()

        for _ in range(3):  # warm-up: allocations, kernel builds
            step()
        print("ready", flush=True)
        for _ in sys.stdin:
            start = time.perf_counter()
            for _ in range(steps):
                step()
            print(time.perf_counter() - start, flush=True)


def start(overrides: list[str], portable: bool, steps: int, threads: int) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ENV}
    env |= ENV if portable else {}
    proc = subprocess.Popen([sys.executable, __file__, "--worker", json.dumps(overrides), "--steps", str(steps),
                             "--threads", str(threads)], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def timed(proc: subprocess.Popen) -> float:
    proc.stdin.write("go\n")
    proc.stdin.flush()
    return float(proc.stdout.readline())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--worker")
    args = p.parse_args()
    if args.worker is not None:
        worker(json.loads(args.worker), args.steps, args.threads)
        return
    print(f"{args.reps} interleaved repetitions of {args.steps} steps, {args.threads} thread(s), load average "
          f"{os.getloadavg()[0]:.2f}")
    print("| model | native step (ms, median) | portable step (ms, median) | portable / native (median, IQR) |")
    print("|---|---|---|---|")
    for name, overrides in MODELS.items():
        native, portable = (start(overrides, mode, args.steps, args.threads) for mode in (False, True))
        times = {"native": [], "portable": []}
        for rep in range(args.reps):
            order = [("native", native), ("portable", portable)][:: 1 if rep % 2 == 0 else -1]
            for label, proc in order:
                times[label].append(timed(proc) / args.steps)
        for proc in (native, portable):
            proc.stdin.close()
            proc.wait()
        ratios = sorted(b / a for a, b in zip(times["native"], times["portable"]))
        q = statistics.quantiles(ratios, n=4)
        print(f"| {name} | {1e3 * statistics.median(times['native']):.2f} | "
              f"{1e3 * statistics.median(times['portable']):.2f} | {statistics.median(ratios):.2f} "
              f"({q[0]:.2f}-{q[2]:.2f}) |", flush=True)


if __name__ == "__main__":
    main()
