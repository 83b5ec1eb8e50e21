"""README table: fp32 vs QAT 8/6/4-bit test accuracy and wall time, MNIST-1D CNN and MLP.

    python scripts/compare_qat.py --seeds 0 1 2 --out results/qat
"""

from __future__ import annotations

import argparse
import datetime
import platform
from pathlib import Path

from fqtrun.experiments import markdown_table, mean_std, run_grid

VARIANTS = {
    "fp32": [],
    "QAT 8-bit": ["+quant=qat", "bits=8"],
    "QAT 6-bit": ["+quant=qat", "bits=6"],
    "QAT 4-bit": ["+quant=qat", "bits=4"],
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["cnn1d", "mlp"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=None, help="override the default epochs")
    p.add_argument("--out", type=Path, default=Path("results/qat"))
    args = p.parse_args()
    common = ["logger.wandb.mode=disabled", "logger.progress=none", "threads=1"]
    if args.epochs is not None:
        common.append(f"epochs={args.epochs}")
    rows = []
    for model in args.models:
        variants = {f"{model}/{k}": [f"model={model}", *v] for k, v in VARIANTS.items()}
        results = run_grid(variants, args.seeds, common, args.out,
                           on_done=lambda lab, s, r: print(f"{lab} seed {s}: {r['final_test_acc']:.4f}", flush=True))
        for label, runs in results.items():
            rows.append([model, label.split("/", 1)[1], mean_std([r["final_test_acc"] for r in runs], 100),
                         mean_std([r["wall_time_s"] for r in runs], 1, 1), str(len(runs))])
    table = markdown_table(["model", "precision", "test acc (%)", "train wall time (s)", "seeds"], rows)
    note = (f"\nMeasured {datetime.date.today()} on {platform.machine()} ({platform.processor() or 'cpu'}), "
            f"1 torch thread; command: python scripts/compare_qat.py --seeds {' '.join(map(str, args.seeds))}"
            + (f" --epochs {args.epochs}" if args.epochs else "") + "\n")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.md").write_text(table + note)
    print(table + note)


if __name__ == "__main__":
    main()
