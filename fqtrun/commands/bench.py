"""fqtrun bench: speed ratios measured side by side in one process (spec/performance.md).

1. Quantizers: SR quantize-dequantize of a bench.quant_elements gradient (PTQ, PSQ, BHQ) and
   the int8 forward quantization, each relative to tensor.clone() of the same tensor.
2. Train steps of one model (SGD, cross-entropy on fixed random data): fp32, bf16 autocast,
   FQT simulate, FQT int8 (and torchao's int8 mixed-precision training when importable), for
   the linear-heavy model (model=mlp: bench.blocks x (Linear width->hidden, GELU, Linear
   hidden->width); any other model choice is built from its model config) and for a CNN
   (cnn1d, bench.cnn_*).
3. Mask search (bench.masks): row-wise and transposable N:M masks of a bench.mask_size square
   weight (spec/performance.md target 4), each relative to tensor.clone() of that weight.
Every figure is the median over interleaved repetitions of a per-repetition ratio, at each of
bench.threads CPU threads; the load average is recorded. Tests never assert on these timings.
The measuring lives in fqtrun.bench; this app composes the config, writes bench.json and prints.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from fqtrun.bench.settings import BenchSettings
from fqtrun.bench.suite import run_suite
from fqtrun.bench.tables import load_line, result_tables
from fqtrun.commands.common import run_reporting_errors
from fqtrun.config import register_configs
from fqtrun.files import write_json
from fqtrun.numerics_mode import NumericsModeConfig, portable_scope
from fqtrun.training.loggers import make_console


@dataclass
class BenchConfig:
    model: Any = MISSING
    bench: BenchSettings = field(default_factory=BenchSettings)
    batch_size: int = 512
    seed: int = 0
    numerics: NumericsModeConfig = field(default_factory=NumericsModeConfig)


ConfigStore.instance().store(name="bench_schema", node=BenchConfig)
register_configs()


@portable_scope
def run_bench(cfg: DictConfig, out_dir: Path) -> dict:
    """Measure every figure at every thread count; write bench.json; print the tables."""
    result = run_suite(OmegaConf.to_object(cfg.bench), cfg.model, cfg.batch_size, cfg.seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "bench.json", result)
    console = make_console()
    for table in result_tables(result):
        console.print(table)
    console.print(f"{load_line(result)}; written {out_dir / 'bench.json'}")
    return result


@hydra.main(version_base="1.3", config_path="../conf", config_name="bench")
def main(cfg: DictConfig) -> None:
    run_reporting_errors(run_bench, cfg)
