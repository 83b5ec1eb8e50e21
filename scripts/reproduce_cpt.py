"""Cyclic precision vs static precision on MNIST-1D (spec/cpt.md): accuracy and training BitOPs.

Four runs per seed, all FQT with per-sample gradient quantization (+quant=per_sample):
static 8/8 and 6/6 (forward/gradient bits), CPT 3-8/8 and CPT 3-6/6 (forward bits cycling
between 3 and q_max over 32 cosine cycles, gradients static at q_max, evaluation at q_max).
Prints and writes a markdown table (test accuracy mean +- sample std over seeds, GBitOPs,
BitOPs savings against the static run at the same q_max), results.json, and bit_trace.png
(bits per slot vs step, first seed of each configuration).

    python scripts/reproduce_cpt.py --epochs 60 --seeds 0 1 2 --out cpt_mnist1d
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

import fqtrun
from fqtrun.precision.trace_plot import plot_bit_trace, plot_bit_traces
from fqtrun.runs.train import run_training as run_train

CONF = str(Path(fqtrun.__file__).resolve().parent / "conf")
CONFIGS = {  # label -> (train overrides, label of the static run it is compared with)
    "static 8/8": (["bits=8"], "static 8/8"),
    "static 6/6": (["bits=6"], "static 6/6"),
    "CPT 3-8/8": (["bits=8", "schedule=cyclic", "schedule.min_bits=3", "schedule.max_bits=8"], "static 8/8"),
    "CPT 3-6/6": (["bits=6", "schedule=cyclic", "schedule.min_bits=3", "schedule.max_bits=6"], "static 6/6"),
}
COMMON = ["+quant=per_sample", "logger.wandb.mode=disabled", "logger.progress=none", "logger.log_every=1"]


def slug(label: str) -> str:
    return label.replace(" ", "_").replace("/", "g").replace("-", "to")


def run_one(label: str, seed: int, epochs: int, threads: int, out: Path) -> dict:
    overrides = [*COMMON, *CONFIGS[label][0], f"epochs={epochs}", f"seed={seed}", f"threads={threads}"]
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    run = out / slug(label) / f"seed{seed}"
    summary = run_train(cfg, run)
    plot_bit_trace(run / "metrics.jsonl", run / "bit_trace.png", title=f"{label}, seed {seed}")
    return {"label": label, "seed": seed, "run": str(run), "overrides": overrides,
            **{k: summary[k] for k in ("final_test_acc", "best_test_acc", "gbitops", "bitops_savings", "steps")}}


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def table(results: list[dict], seeds: list[int]) -> str:
    rows = ["| run | test acc (%) | GBitOPs | savings (accounting) | GBitOPs vs static |",
            "| --- | --- | --- | --- | --- |"]
    gbitops = {lab: statistics.fmean(r["gbitops"] for r in results if r["label"] == lab) for lab in CONFIGS}
    for label, (_, static) in CONFIGS.items():
        mine = [r for r in results if r["label"] == label]
        acc, std = mean_std([100 * r["final_test_acc"] for r in mine])
        save = statistics.fmean(r["bitops_savings"] for r in mine)
        ratio = gbitops[label] / gbitops[static]
        rows.append(f"| {label} | {acc:.2f} ± {std:.2f} | {gbitops[label]:.1f} | {100 * save:.2f}% | {ratio:.4f} |")
    note = (f"\nMNIST-1D, CNN1D, +quant=per_sample; {len(seeds)} seed(s) {seeds}; mean ± sample std of the final "
            "test accuracy; static-run savings are 0 by construction.")
    return "\n".join(rows) + note


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("cpt_mnist1d"))
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per run")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    results = [run_one(label, seed, args.epochs, args.threads, args.out) for seed in args.seeds for label in CONFIGS]
    md = table(results, args.seeds)
    print(md)
    (args.out / "results.md").write_text(md + "\n")
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    first = args.seeds[0]
    plot_bit_traces({lab: args.out / slug(lab) / f"seed{first}" / "metrics.jsonl" for lab in CONFIGS},
                    args.out / "bit_trace.png")
    print(f"wrote {args.out / 'results.md'}, {args.out / 'results.json'}, {args.out / 'bit_trace.png'}")


if __name__ == "__main__":
    main()
