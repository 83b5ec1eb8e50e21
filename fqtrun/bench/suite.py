"""The whole benchmark: quantizer, number-format, train-step (both models), numerics-probe and mask-search
figures at every thread count.

run_suite returns the result dict that `fqtrun bench` writes as bench.json (the README quotes it).
"""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Callable

import torch
from omegaconf import DictConfig
from torch import nn

from fqtrun.allocator import keep_freed_memory
from fqtrun.bench.formats import format_bench
from fqtrun.bench.harness import interleaved, median_ms, median_ratios
from fqtrun.bench.masks import mask_bench
from fqtrun.bench.models import cnn_model, format_model, fqt_model, linear_model, torchao_model
from fqtrun.bench.numerics import numerics_bench
from fqtrun.bench.settings import BenchSettings, resolve_settings
from fqtrun.errors import NumericsError
from fqtrun.quant import fused, grid
from fqtrun.quant.backends import backend_report, int_gemm
from fqtrun.quant.gradient import make_gradient_quantizer, quantize_pair
from fqtrun.quant.native import library as native_library
from fqtrun.quant.numerics import NonFiniteError
from fqtrun.tasks import TASKS, Task
from fqtrun.training.compiled import compiled_model


def quantizer_bench(s: BenchSettings, seed: int) -> dict:
    """SR quantize-dequantize and SR codes of one gradient (PTQ, PSQ, BHQ, per-column; PSQ's and the per-column
    codes of the int8 backend's dX and dW in one pass) and its int8 forward codes, relative to its clone().

    The quantizers run as a training step runs them: the C kernels where they run (the bench.json key
    native_kernels), else the torch forms (torch.compile'd with bench.compile).
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(s.quant_rows, s.quant_elements // s.quant_rows, generator=g)
    x.mul_(torch.exp(2 * torch.randn(x.shape[0], 1, generator=g)))  # rows of different scales, as gradients
    fns: dict[str, Callable[[], object]] = {"clone": x.clone}
    for name in ("per_tensor", "per_sample", "householder", "per_column"):
        q = make_gradient_quantizer(name, 8, compile=s.compile)
        fns[f"{name} SR"] = lambda q=q: q(x, 1)
        fns[f"{name} SR codes"] = lambda q=q: q.quantize(x, 1)
    pair = (make_gradient_quantizer("per_sample", 8, compile=s.compile),
            make_gradient_quantizer("per_column", 8, compile=s.compile))
    fns["per_sample + per_column codes, one pass"] = lambda: quantize_pair(*pair, x, 1, 2)
    scale, zero = grid.minmax_grid(x, 8)
    fns["forward int8 codes"] = lambda: fused.nearest_int8(x, scale, zero, 8, compile=s.compile)
    times = interleaved(fns, s.reps, s.warmup)
    ratios = median_ratios(times, "clone")
    out = {k: {"x_clone": round(ratios[k], 3), "median_ms": round(median_ms(v), 3)} for k, v in times.items()}
    for kind in ("SR", "SR codes"):
        r = median_ratios(times, f"per_sample {kind}")[f"householder {kind}"]
        out[f"householder {kind}"]["x_psq"] = round(r, 3)
    return out


def step_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor, autocast: bool,
            task: Task, compiled: bool = False) -> Callable[[], torch.Tensor]:
    """One SGD train step of `model` on the fixed batch (x, y) with the task's loss (cross-entropy over
    the labels or every next token), optionally under bf16 autocast, or with the model's forward and
    backward compiled as trainer.compile does (the first, untimed warm-up steps compile)."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    forward = compiled_model(model) if compiled else model

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = task.loss(forward(x).float(), y)
        loss.backward()
        opt.step()
        return loss

    return step


def model_task(model: nn.Module) -> Task:
    """The task the model is built for (a language model's class says so; the others classify)."""
    return TASKS[getattr(model, "task", "classification")]()


def step_bench(name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, s: BenchSettings,
               probe: bool = False) -> dict:
    """Train steps fp32 / bf16 autocast / FQT simulate / FQT int8 (/ torchao) of one model, relative to fp32;
    `probe`: also the numerics-health probe's cost on the FQT int8 step (bench/numerics.py)."""
    variants = {"fp32": (model, False), "bf16 autocast": (copy.deepcopy(model), True),
                "FQT simulate": (fqt_model(model, s, "simulate"), False),
                "FQT int8": (fqt_model(model, s, "int8"), False),
                f"{s.step_format} recipe": (format_model(model, s), False)}
    ao = torchao_model(model)
    task = model_task(model)
    fns = {k: step_fn(m, x, y, ac, task) for k, (m, ac) in variants.items()}
    if s.compiled_steps:  # the same models' forward and backward through torch.compile (trainer.compile)
        for k in ("fp32", "FQT simulate", f"{s.step_format} recipe"):
            fns[f"{k}, compiled"] = step_fn(variants[k][0], x, y, False, task, compiled=True)
    if isinstance(ao, nn.Module):
        fns["torchao int8 mixed precision"] = step_fn(ao, x, y, False, task)
    times = interleaved(fns, s.reps, s.warmup)
    ratios = median_ratios(times, "fp32")
    rows = {k: {"x_fp32": round(ratios[k], 3), "speedup_vs_fp32": round(1 / ratios[k], 3),
                "median_ms": round(median_ms(v), 2)} for k, v in times.items()}
    if not isinstance(ao, nn.Module):
        rows["torchao int8 mixed precision"] = {"status": ao}
    bf16 = median_ratios(times, "bf16 autocast")
    rows["FQT int8"]["speedup_vs_bf16"] = round(1 / bf16["FQT int8"], 3)
    layers = backend_report(variants["FQT int8"][0])
    return {"model": name, "steps": rows, "int8_layers": layers,
            "int8_layers_ran_int8": sum(v == "int8" for v in layers.values()), "layers": len(layers),
            **({"numerics_probe": numerics_bench(variants["FQT int8"][0], fns["FQT int8"], s)} if probe else {})}


def run_suite(asked: BenchSettings, model_cfg: DictConfig, batch_size: int, seed: int) -> dict:
    """Every figure at every bench.threads count, with the settings, load averages and versions.

    `asked` is the bench node as configured (quick mode and the ranges are resolved here, before
    anything is timed); `model_cfg` the model choice for the linear-heavy model.
    """
    s = resolve_settings(asked, batch_size)
    torch.manual_seed(seed)  # the weights of both models
    name, lin, shape, classes = linear_model(model_cfg, s)
    cnn_name, cnn = cnn_model(s)
    g = torch.Generator().manual_seed(seed)
    data = {"linear": model_task(lin).random_batch(batch_size, shape, classes, g),
            "cnn": model_task(cnn).random_batch(s.cnn_batch, (s.cnn_in_channels, s.cnn_length), s.classes, g)}
    malloc = "kept (fqtrun.allocator)" if keep_freed_memory() else "system"  # idempotent; the CLI set it already
    result: dict = {"load_before": os.getloadavg(), "malloc": malloc, "settings": dataclasses.asdict(s),
                    "batch_size": batch_size, "torch": torch.__version__,
                    # the int8 GEMM engine follows the CPU (torch._int_mm needs AVX-512 kernels to be fast)
                    "cpu_capability": torch.backends.cpu.get_cpu_capability(), "int8_gemm": int_gemm.engine(),
                    "native_kernels": native_library.load() is not None, "runs": []}
    threads_before = torch.get_num_threads()
    try:
        for t in s.threads:
            torch.set_num_threads(t)
            result["runs"].append({
                "threads": t, "load": os.getloadavg(),
                "quantizers": quantizer_bench(s, seed),
                "formats": format_bench(s, seed),
                "linear": step_bench(name, lin, *data["linear"], s, probe=s.numerics),
                "cnn": step_bench(cnn_name, cnn, *data["cnn"], s),
                **({"masks": mask_bench(s, seed)} if s.masks else {}),
            })
    except NonFiniteError as err:  # seeded random data and weights are finite: a quantizer or kernel made it
        raise NumericsError(f"{err} while benchmarking at {torch.get_num_threads()} thread(s): the bench's "
                            "data and weights are finite: a bug, FQTRUN_DEBUG=1 shows where") from err
    finally:
        torch.set_num_threads(threads_before)
    result["load_after"] = os.getloadavg()
    return result
