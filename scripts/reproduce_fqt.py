"""Reproduce the FQT study (spec/fqt.md) on MNIST-1D with the paper's CNN: test accuracy of PTQ, PSQ
and BHQ gradient quantizers against the QAT 8/8 baseline, over seeds, plus the gradient-variance plot.

Protocols (forward weights and activations always 8 bits, per tensor, nearest):
  paper:  dX gradient at the studied bits, dW gradient at 8 bits (the reference code's protocol)
  strict: dX and dW gradients both at the studied bits
The variance plot comes from `fqtrun variance` on the trained QAT model (seed of --variance-seed),
once with dW at 8 bits and once with dW at the studied bits.

    python scripts/reproduce_fqt.py --out results/fqt --seeds 0 1 2 --epochs 50 --jobs 2

Runs land in <out>/runs/<variant>/seed<k>; a run whose summary.json exists is reused, so an
interrupted reproduction continues where it stopped.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

from fqtrun.experiments import compose_config, markdown_table, mean_std

QUANTIZERS = {"PTQ": "per_tensor", "PSQ": "per_sample", "BHQ": "householder"}


def variants(bits: list[int]) -> dict[str, list[str]]:
    """Name -> train overrides. At 8 bits the two protocols coincide: one run serves both."""
    out = {"qat8": ["+quant=qat", "bits=8"]}
    for label, q in QUANTIZERS.items():
        for b in bits:
            out[f"paper/{label}/dx{b}"] = [f"+quant={q}", "bits=8", f"quant.bits_dx={b}", "quant.bits_dw=8"]
            if b != 8:
                out[f"strict/{label}/dx{b}"] = [f"+quant={q}", "bits=8", f"quant.bits_dx={b}", f"quant.bits_dw={b}"]
    return out


def run_one(label: str, overrides: list[str], seed: int, run_dir: str) -> dict:
    """Train one variant at one seed in this process (a pool worker); reuse a finished run."""
    import torch

    from fqtrun.runs.train import run_training as run_train

    done = Path(run_dir) / "summary.json"
    if done.is_file():
        return json.loads(done.read_text())
    torch.set_num_threads(1)
    cfg = compose_config([*overrides, f"seed={seed}"])
    return run_train(cfg, Path(run_dir))


def train_all(grid: dict[str, list[str]], seeds: list[int], common: list[str], out: Path, jobs: int) -> dict:
    """{variant: {seed: summary}} for every variant and seed, `jobs` trainings at a time."""
    tasks = [(label, [*common, *ov], s, str(out / "runs" / label / f"seed{s}")) for label, ov in grid.items()
             for s in seeds]
    results: dict[str, dict[int, dict]] = {}

    def done(task, summary):
        results.setdefault(task[0], {})[task[2]] = summary
        print(f"{task[0]} seed {task[2]}: test acc {summary['final_test_acc']:.4f} "
              f"({summary['wall_time_s']:.0f} s)", flush=True)

    if jobs <= 1:
        for t in tasks:
            done(t, run_one(*t))
        return results
    with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
        futures = [(t, pool.submit(run_one, *t)) for t in tasks]
        for t, f in futures:
            done(t, f.result())
    return results


def accuracy(results: dict, label: str, seeds: list[int]) -> str:
    return mean_std([results[label][s]["final_test_acc"] for s in seeds], 100)


def tables(results: dict, seeds: list[int], bits: list[int]) -> str:
    head = ["gradient quantizer", *(f"dX {b} bits" for b in bits)]
    qat = accuracy(results, "qat8", seeds)
    text = [f"QAT 8/8 baseline (forward 8 bits, full-precision gradients): **{qat}** % test accuracy\n"]
    for proto, title in (("paper", "Paper protocol: dW gradient at 8 bits (per column)"),
                         ("strict", "Stricter protocol: dW gradient at the same bits as dX (per column)")):
        rows = []
        for label in QUANTIZERS:
            cells = []
            for b in bits:
                name = f"{'paper' if b == 8 else proto}/{label}/dx{b}"
                cells.append(accuracy(results, name, seeds))
            rows.append([label, *cells])
        text.append(f"### {title}\n\n{markdown_table(head, rows)}")
    return "\n".join(text)


def variance_study(out: Path, checkpoint: Path, bits: list[int], common_data: list[str]) -> str:
    """`fqtrun variance` on the trained QAT model, dW at 8 bits and at the studied bits."""
    from fqtrun.commands.variance import run_variance

    lines = []
    for name, dw in (("paper", "8"), ("strict", "null")):
        folder = out / f"variance_{name}"
        cfg = compose_config([*common_data, f"checkpoint={checkpoint}", f"variance.dw_bits={dw}",
                              f"variance.bits=[{','.join(map(str, sorted({3, *bits})))}]"],
                             config_name="variance")
        data = run_variance(cfg, folder)
        shutil.copy(folder / "variance.png", out / f"variance_{name}.png")
        bb = sorted(int(b) for b in next(iter(data["quantization"].values())))
        rows = [[q, *(f"{v[str(b)]['total']:.2e}" for b in bb)] for q, v in data["quantization"].items()]
        lines.append(f"### Gradient variance, dW at {'8 bits' if dw == '8' else 'the studied bits'} "
                     f"(trained QAT model; sampling variance {data['sampling']['total']:.2e})\n\n"
                     + markdown_table(["quantizer", *(f"{b} bits" for b in bb)], rows)
                     + f"\n![variance](variance_{name}.png)\n")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("results/fqt"))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=50, help="epochs per run (the train default is 150)")
    p.add_argument("--bits", nargs="+", type=int, default=[4, 5, 6, 8], help="dX gradient bits studied")
    p.add_argument("--jobs", type=int, default=1, help="trainings in parallel (one torch thread each)")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--data-cache", default=None, help="MNIST-1D cache folder (dataset.cache_dir)")
    p.add_argument("--variance-seed", type=int, default=None, help="QAT run the variance study loads "
                   "(default: the first seed)")
    args = p.parse_args()
    bits = sorted(set(args.bits))
    data = [f"dataset.cache_dir={args.data_cache}"] if args.data_cache else []
    common = ["logger.wandb.mode=disabled", "logger.progress=none", f"epochs={args.epochs}",
              f"batch_size={args.batch_size}", *data]
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    results = train_all(variants(bits), args.seeds, common, args.out, args.jobs)
    vseed = args.seeds[0] if args.variance_seed is None else args.variance_seed
    var_text = variance_study(args.out, args.out / "runs" / "qat8" / f"seed{vseed}" / "last.pt", bits, data)
    command = (f"python scripts/reproduce_fqt.py --out {args.out} --seeds {' '.join(map(str, args.seeds))} "
               f"--epochs {args.epochs} --bits {' '.join(map(str, bits))} --batch-size {args.batch_size}")
    report = (f"## FQT on MNIST-1D (cnn1d): test accuracy (%), mean ± std over {len(args.seeds)} seed(s), "
              f"{args.epochs} epochs\n\n{tables(results, args.seeds, bits)}\n{var_text}\n"
              f"Measured {datetime.date.today()} on {platform.machine()}, one torch thread per run, "
              f"{time.time() - t0:.0f} s in all; command: `{command}`\n")
    (args.out / "fqt.md").write_text(report)
    (args.out / "results.json").write_text(json.dumps(
        {label: {str(s): {k: r[k] for k in ("final_test_acc", "best_test_acc", "wall_time_s", "quant")}
                 for s, r in runs.items()} for label, runs in results.items()}, indent=2))
    print(report)


if __name__ == "__main__":
    main()
