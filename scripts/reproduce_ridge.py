"""README tables for spec/denoise_bn.md: STE vs ridge dequantization on MNIST-1D, and integer BatchNorm.

Table 1: MNIST-1D CNN test accuracy (mean +- std over seeds), quant.dequant=ste vs ridge at A1W1, A2W2,
A4W4 and A4W4 + 2:4 sparsity. Table 2: `fqtrun intbn` on a ResNet-20 trained on digits with
+quant=qat bits=8: per converted BN, shift bits of the optimal (A, B, T) vs naive rounding of a and b,
and the model-level accuracies (integer BN vs float BN + requantization).

    full:  .venv/bin/python scripts/reproduce_ridge.py --seeds 0 1 2 --epochs 150 --rn-epochs 30
    smoke: .venv/bin/python scripts/reproduce_ridge.py --seeds 0 --epochs 2 --rn-epochs 2
Writes <out>/results.json and <out>/tables.md and prints both tables.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fqtrun.commands import train as train_cmd  # noqa: E402
from fqtrun.commands.intbn import IntbnConfig, run_intbn  # noqa: E402
from fqtrun.config import register_configs  # noqa: E402

CONF = str(ROOT / "fqtrun" / "conf")
SPARSE = ["+sparsity=nm", "sparsity.n=2", "sparsity.m=4"]
SETTINGS = {  # label -> train overrides (all layers quantized, the recipe's defaults otherwise)
    "A1W1": ["+quant=qat", "bits=1"],
    "A2W2": ["+quant=qat", "bits=2"],
    "A4W4": ["+quant=qat", "bits=4"],
    "A4W4 + 2:4": ["+quant=qat", "bits=4", *SPARSE],
}
BASE = ["logger.wandb.mode=disabled", "logger.progress=none", "threads=1", "checkpoint.every=0"]


def compose_train(overrides: list[str]):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name="train", overrides=BASE + overrides)


def sparsity_wired() -> bool:
    """+sparsity=nm only prunes when the sparsity hook is registered in fqtrun train."""
    return any("sparsity" in spec for spec in train_cmd.HOOK_FACTORIES)


def ridge_table(seeds: list[int], epochs: int, out: Path) -> dict:
    results = {}
    for label, overrides in SETTINGS.items():
        if SPARSE[0] in overrides and not sparsity_wired():
            print(f"skip {label}: the sparsity hook is not registered in fqtrun/commands/train.py HOOK_FACTORIES")
            results[label] = None
            continue
        for dequant in ("ste", "ridge"):
            accs = []
            for seed in seeds:
                run = out / "mnist1d" / f"{label.replace(' ', '').replace(':', 'of').replace('+', '_')}_{dequant}_s{seed}"
                cfg = compose_train(overrides + [f"quant.dequant={dequant}", f"seed={seed}", f"epochs={epochs}"])
                summary = train_cmd.run_train(cfg, run)
                accs.append(summary["final_test_acc"])
            results.setdefault(label, {})[dequant] = accs
    return results


def intbn_report(epochs: int, out: Path) -> dict:
    run = out / "resnet20_digits"
    cfg = compose_train(["model=resnet20", "dataset=digits", "+quant=qat", "bits=8", f"epochs={epochs}",
                         "checkpoint.every=1"])
    train_cmd.run_train(cfg, run)
    (run / ".hydra").mkdir(exist_ok=True)
    OmegaConf.save(cfg, run / ".hydra" / "config.yaml", resolve=True)  # what `fqtrun train` leaves there
    return run_intbn(OmegaConf.structured(IntbnConfig(checkpoint=str(run / "last.pt"))), out / "intbn")


def _pm(v: list[float]) -> str:
    mean = statistics.fmean(v)
    return f"{100 * mean:.1f} ± {100 * statistics.stdev(v):.1f}" if len(v) > 1 else f"{100 * mean:.1f}"


def markdown(ridge: dict, intbn: dict, seeds: list[int], epochs: int, rn_epochs: int) -> str:
    lines = [f"MNIST-1D CNN, test accuracy % after {epochs} epochs, seeds {seeds} (quant.dequant=ste vs ridge)", "",
             "| setting | STE | ridge |", "| --- | --- | --- |"]
    for label, r in ridge.items():
        lines.append(f"| {label} | {_pm(r['ste'])} | {_pm(r['ridge'])} |" if r else f"| {label} | n/a | n/a |")
    lines += ["", f"ResNet-20 on digits, +quant=qat bits=8, {rn_epochs} epochs: integer BN (`fqtrun intbn`, "
              f"acc_range={intbn['acc_range']})", "",
              "| BN | channels | exact | shift ours mean / max | shift naive mean / max |", "| --- | --- | --- | --- | --- |"]
    for r in intbn["layers"]:
        naive = "-" if r["shift_naive_mean"] is None else f"{r['shift_naive_mean']:.1f} / {r['shift_naive_max']}"
        lines.append(f"| {r['bn']} | {r['channels']} | {'yes' if r['verified_exact'] else 'NO'} | "
                     f"{r['shift_mean']:.1f} / {r['shift_max']} | {naive} |")
    lines += ["", f"accuracy: float BN + requant {100 * intbn['acc_float_bn_requant']:.2f} %, integer BN "
              f"{100 * intbn['acc_integer_bn']:.2f} % (difference {100 * intbn['acc_difference']:+.2f}), "
              f"fake-quant with dynamic scales {100 * intbn['acc_fake_quant_dynamic']:.2f} %; "
              f"{len(intbn['kept_float'])} BNs stay float (their output feeds a residual add)."]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=150, help="MNIST-1D epochs per run")
    p.add_argument("--rn-epochs", type=int, default=30, help="ResNet-20 / digits epochs")
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "reproduce_ridge")
    args = p.parse_args()
    torch.set_num_threads(1)
    register_configs()
    t0 = time.time()
    ridge = ridge_table(args.seeds, args.epochs, args.out)
    intbn = intbn_report(args.rn_epochs, args.out)
    md = markdown(ridge, intbn, args.seeds, args.epochs, args.rn_epochs)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tables.md").write_text(md + "\n")
    (args.out / "results.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                       "ridge": ridge, "intbn": intbn}, indent=2, default=str))
    print(md)
    print(f"\n{time.time() - t0:.0f} s; written {args.out / 'tables.md'}")


if __name__ == "__main__":
    main()
