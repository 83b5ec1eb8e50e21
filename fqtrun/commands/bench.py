"""fqtrun bench: speed ratios measured side by side in one process (spec/performance.md).

1. Quantizers: SR quantize-dequantize of a bench.quant_elements gradient (PTQ, PSQ, BHQ) and
   the int8 forward quantization, each relative to tensor.clone() of the same tensor.
2. Train steps of one model (SGD, cross-entropy on fixed random data): fp32, bf16 autocast,
   FQT simulate, FQT int8 (and torchao's int8 mixed-precision training when importable), for
   the linear-heavy model (model=mlp: bench.blocks x (Linear width->hidden, GELU, Linear
   hidden->width); any other model choice is built from its model config) and for a CNN
   (cnn1d, bench.cnn_*).
Every figure is the median over interleaved repetitions of a per-repetition ratio, at each of
bench.threads CPU threads; the load average is recorded. Tests never assert on these timings.
"""

from __future__ import annotations

import copy
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.config_store import ConfigStore
from hydra.utils import instantiate
from omegaconf import MISSING, DictConfig, OmegaConf
from rich.table import Table
from torch import nn

from fqtrun.allocator import keep_freed_memory
from fqtrun.commands.common import run_reporting_errors
from fqtrun.config import register_configs
from fqtrun.errors import ConfigError
from fqtrun.files import write_json
from fqtrun.quant import fused, grid
from fqtrun.quant.backends import apply_backend, backend_report
from fqtrun.quant.convert import convert
from fqtrun.quant.gradient import make_gradient_quantizer
from fqtrun.quant.layers import NoiseContext
from fqtrun.quant.recipe import QuantConfig, slot_factory
from fqtrun.training.loggers import make_console


@dataclass
class BenchSettings:
    quick: bool = False  # tiny sizes, 2 repetitions, 1 thread, no compile (the test's mode)
    reps: int = 7  # interleaved repetitions per figure
    warmup: int = 2  # untimed steps per variant first (torch.compile happens here)
    threads: list[int] = field(default_factory=lambda: [2, 1])
    quant_elements: int = 4 * 1024 * 1024  # gradient size of the quantizer bench
    quant_rows: int = 1024  # its rows (samples)
    width: int = 1024  # model=mlp: block input/output width
    hidden: int = 4096  # model=mlp: block hidden width
    blocks: int = 4  # model=mlp: number of blocks
    features: int = 256  # input length for other model choices (1-D signal)
    classes: int = 10
    cnn_channels: int = 128
    cnn_in_channels: int = 16
    cnn_length: int = 256
    cnn_batch: int = 128
    grad: str = "per_sample"  # dX quantizer of the FQT steps (per_tensor | per_sample | householder)
    bits: int = 8  # every slot of the FQT steps
    compile: bool = True  # torch.compile the quantizers (FQT steps and the compiled quantizer rows)


@dataclass
class BenchConfig:
    model: Any = MISSING
    bench: BenchSettings = field(default_factory=BenchSettings)
    batch_size: int = 512
    seed: int = 0


ConfigStore.instance().store(name="bench_schema", node=BenchConfig)
register_configs()

QUICK = {"reps": 2, "warmup": 1, "threads": [1], "quant_elements": 1 << 16, "quant_rows": 64, "width": 64,
         "hidden": 128, "blocks": 1, "features": 64, "cnn_channels": 32, "cnn_in_channels": 4, "cnn_length": 32,
         "cnn_batch": 16, "compile": False}


class MLPBlocks(nn.Module):
    """blocks x (Linear width->hidden, GELU, Linear hidden->width), then a Linear classifier."""

    def __init__(self, width: int, hidden: int, blocks: int, classes: int):
        super().__init__()
        layers: list[nn.Module] = []
        for _ in range(blocks):
            layers += [nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width)]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def settings(cfg: DictConfig) -> BenchSettings:
    s = BenchSettings(**OmegaConf.to_container(cfg.bench, resolve=True))
    if s.quick:
        for k, v in QUICK.items():
            setattr(s, k, v)
    checks = [(s.reps >= 1, f"bench.reps={s.reps} must be >= 1"),
              (all(t >= 1 for t in s.threads) and s.threads, f"bench.threads={s.threads} must list thread counts >= 1"),
              (cfg.batch_size >= 1, f"batch_size={cfg.batch_size} must be >= 1"),
              (s.quant_elements >= s.quant_rows >= 1, "bench.quant_elements must be >= bench.quant_rows >= 1")]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(msg)
    return s


# ----------------------------------------------------------------------------------------------


def interleaved(fns: dict[str, Callable[[], object]], reps: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per call of every fn, repetitions interleaved (fn1, fn2, ..., fn1, fn2, ...)."""
    for f in fns.values():
        for _ in range(warmup):
            f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return times


def median_ratios(times: dict[str, list[float]], base: str) -> dict[str, float]:
    """Median over repetitions of time(k) / time(base) in the same repetition."""
    return {k: statistics.median(t / b for t, b in zip(v, times[base])) for k, v in times.items()}


def quantizer_bench(s: BenchSettings, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(s.quant_rows, s.quant_elements // s.quant_rows, generator=g)
    x.mul_(torch.exp(2 * torch.randn(x.shape[0], 1, generator=g)))  # rows of different scales, as gradients
    fns: dict[str, Callable[[], object]] = {"clone": x.clone}
    for name in ("per_tensor", "per_sample", "householder"):
        q = make_gradient_quantizer(name, 8)
        fns[f"{name} SR eager"] = lambda q=q: q(x, 1)
        if s.compile:
            qc = make_gradient_quantizer(name, 8, compile=True)
            fns[f"{name} SR compiled"] = lambda q=qc: q(x, 1)
    scale, zero = grid.minmax_grid(x, 8)
    fns["forward int8 codes eager"] = lambda: fused.nearest_int8(x, scale, zero, 8)
    if s.compile:
        fns["forward int8 codes compiled"] = lambda: fused.nearest_int8(x, scale, zero, 8, compile=True)
    times = interleaved(fns, s.reps, s.warmup)
    ratios = median_ratios(times, "clone")
    out = {k: {"x_clone": round(ratios[k], 3), "median_ms": round(1e3 * statistics.median(v), 3)}
           for k, v in times.items()}
    for mode in ("eager", "compiled"):
        if f"householder SR {mode}" in times:
            r = median_ratios(times, f"per_sample SR {mode}")[f"householder SR {mode}"]
            out[f"householder SR {mode}"]["x_psq"] = round(r, 3)
    return out


# ----------------------------------------------------------------------------------------------


def fqt_model(model: nn.Module, s: BenchSettings, backend: str) -> nn.Module:
    m = copy.deepcopy(model)
    q = OmegaConf.structured(QuantConfig(name=f"fqt-{backend}", grad=s.grad, bits_w=s.bits, bits_a=s.bits,
                                         bits_dx=s.bits, bits_dw=s.bits, backend=backend, compile=s.compile))
    convert(m, slot_factory(q), NoiseContext(seed=0))
    apply_backend(m, backend, compile=s.compile)
    return m


def torchao_model(model: nn.Module) -> nn.Module | str:
    """torchao's int8 mixed-precision training on a copy, or why not."""
    try:
        from torchao.prototype.quantized_training import int8_mixed_precision_training
        from torchao.quantization import quantize_
    except ImportError:
        return "not installed"
    m = copy.deepcopy(model)
    try:
        quantize_(m, int8_mixed_precision_training(), filter_fn=lambda mod, name: isinstance(mod, nn.Linear))
    except Exception as err:  # noqa: BLE001 (version mismatch: report, do not fail the bench)
        return f"failed: {err!r:.80}"
    return m


def step_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor, autocast: bool) -> Callable[[], float]:
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = nn.functional.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()
        return loss

    return step


def step_bench(name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, s: BenchSettings) -> dict:
    variants = {"fp32": (model, False), "bf16 autocast": (copy.deepcopy(model), True),
                "FQT simulate": (fqt_model(model, s, "simulate"), False),
                "FQT int8": (fqt_model(model, s, "int8"), False)}
    ao = torchao_model(model)
    fns = {k: step_fn(m, x, y, ac) for k, (m, ac) in variants.items()}
    if isinstance(ao, nn.Module):
        fns["torchao int8 mixed precision"] = step_fn(ao, x, y, False)
    times = interleaved(fns, s.reps, s.warmup)
    ratios = median_ratios(times, "fp32")
    rows = {k: {"x_fp32": round(ratios[k], 3), "speedup_vs_fp32": round(1 / ratios[k], 3),
                "median_ms": round(1e3 * statistics.median(v), 2)} for k, v in times.items()}
    if not isinstance(ao, nn.Module):
        rows["torchao int8 mixed precision"] = {"status": ao}
    bf16 = median_ratios(times, "bf16 autocast")
    rows["FQT int8"]["speedup_vs_bf16"] = round(1 / bf16["FQT int8"], 3)
    layers = backend_report(variants["FQT int8"][0])
    return {"model": name, "steps": rows, "int8_layers": layers,
            "int8_layers_ran_int8": sum(v == "int8" for v in layers.values()), "layers": len(layers)}


def linear_model(cfg: DictConfig, s: BenchSettings) -> tuple[str, nn.Module, tuple[int, ...]]:
    if str(cfg.model._target_).endswith("mlp.MLP"):
        name = f"mlp: {s.blocks} x (Linear {s.width}->{s.hidden}, GELU, Linear {s.hidden}->{s.width})"
        return name, MLPBlocks(s.width, s.hidden, s.blocks, s.classes), (s.width,)
    shape = (s.features,)
    model = instantiate(cfg.model, num_classes=s.classes, input_shape=shape)
    return str(cfg.model._target_).rsplit(".", 1)[-1], model, shape


def run_bench(cfg: DictConfig, out_dir: Path) -> dict:
    """Measure every figure at every thread count; write bench.json; print the table."""
    s = settings(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    name, lin, shape = linear_model(cfg, s)
    from fqtrun.models.cnn1d import CNN1D

    cnn = CNN1D(s.classes, (s.cnn_in_channels, s.cnn_length), channels=s.cnn_channels)
    g = torch.Generator().manual_seed(cfg.seed)
    data = {"linear": (torch.randn(cfg.batch_size, *shape, generator=g),
                       torch.randint(0, s.classes, (cfg.batch_size,), generator=g)),
            "cnn": (torch.randn(s.cnn_batch, s.cnn_in_channels, s.cnn_length, generator=g),
                    torch.randint(0, s.classes, (s.cnn_batch,), generator=g))}
    malloc = "kept (fqtrun.allocator)" if keep_freed_memory() else "system"  # idempotent; the CLI set it already
    result: dict = {"load_before": os.getloadavg(), "malloc": malloc,
                    "settings": OmegaConf.to_container(OmegaConf.structured(s)),
                    "batch_size": cfg.batch_size, "torch": torch.__version__, "runs": []}
    threads_before = torch.get_num_threads()
    try:
        for t in s.threads:
            torch.set_num_threads(t)
            result["runs"].append({
                "threads": t, "load": os.getloadavg(),
                "quantizers": quantizer_bench(s, cfg.seed),
                "linear": step_bench(name, lin, *data["linear"], s),
                "cnn": step_bench(f"cnn1d (channels {s.cnn_channels}, input {s.cnn_in_channels}x{s.cnn_length}, "
                                  f"batch {s.cnn_batch})", cnn, *data["cnn"], s),
            })
    finally:
        torch.set_num_threads(threads_before)
    result["load_after"] = os.getloadavg()
    write_json(out_dir / "bench.json", result)
    print_tables(result, out_dir)
    return result


def print_tables(result: dict, out_dir: Path) -> None:
    console = make_console()
    for run in result["runs"]:
        t = Table(title=f"quantizers, {run['threads']} thread(s), load {run['load'][0]:.1f}", title_justify="left")
        for col in ("operation", "x clone", "ms", "BHQ / PSQ"):
            t.add_column(col)
        for k, v in run["quantizers"].items():
            t.add_row(k, f"{v['x_clone']:.2f}", f"{v['median_ms']:.2f}", f"{v['x_psq']:.2f}" if "x_psq" in v else "")
        console.print(t)
        for part in ("linear", "cnn"):
            b = run[part]
            t = Table(title=f"train step, {b['model']}, {run['threads']} thread(s)", title_justify="left")
            for col in ("recipe", "time / fp32", "speedup vs fp32", "ms", "note"):
                t.add_column(col)
            for k, v in b["steps"].items():
                if "status" in v:
                    t.add_row(k, "", "", "", v["status"])
                    continue
                note = f"{v['speedup_vs_bf16']:.2f}x vs bf16" if "speedup_vs_bf16" in v else ""
                if k == "FQT int8":
                    note += f"; {b['int8_layers_ran_int8']}/{b['layers']} layers all-int8"
                t.add_row(k, f"{v['x_fp32']:.2f}", f"{v['speedup_vs_fp32']:.2f}x", f"{v['median_ms']:.1f}", note)
            console.print(t)
    console.print(f"load average before/after: {result['load_before'][0]:.2f} / {result['load_after'][0]:.2f}; "
                  f"written {out_dir / 'bench.json'}")


@hydra.main(version_base="1.3", config_path="../conf", config_name="bench")
def main(cfg: DictConfig) -> None:
    run_reporting_errors(run_bench, cfg)
