"""The whole benchmark: quantizer and number-format figures and train-step figures of both models at every
thread count.

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
from fqtrun.bench.harness import interleaved, median_ms, median_ratios
from fqtrun.bench.models import cnn_model, fqt_model, linear_model, torchao_model
from fqtrun.bench.settings import BenchSettings, resolve_settings
from fqtrun.quant import fused, grid
from fqtrun.quant.backends import backend_report
from fqtrun.quant.formats import FORMATS
from fqtrun.quant.gradient import make_gradient_quantizer
from fqtrun.quant.transforms import RandomHadamard


def quantizer_bench(s: BenchSettings, seed: int) -> dict:
    """SR quantize-dequantize (PTQ, PSQ, BHQ) and int8 forward codes of one gradient, relative to its clone()."""
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
    out = {k: {"x_clone": round(ratios[k], 3), "median_ms": round(median_ms(v), 3)} for k, v in times.items()}
    for mode in ("eager", "compiled"):
        if f"householder SR {mode}" in times:
            r = median_ratios(times, f"per_sample SR {mode}")[f"householder SR {mode}"]
            out[f"householder SR {mode}"]["x_psq"] = round(r, 3)
    return out


def format_bench(s: BenchSettings, seed: int) -> dict:
    """Fake quantization of one gradient-shaped tensor in every number format (quant/formats), blocks along
    its rows: nearest, stochastic, and stochastic after a 16-point random Hadamard transform, vs clone()."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(s.quant_rows, s.quant_elements // s.quant_rows, generator=g)
    x.mul_(torch.exp(2 * torch.randn(x.shape[0], 1, generator=g)))
    rht = RandomHadamard(16)
    fns: dict[str, Callable[[], object]] = {"clone": x.clone}
    for name, fmt in FORMATS.items():
        fns[f"{name} RTN"] = lambda f=fmt: f.fake(x, -1, "nearest", 1)
        fns[f"{name} SR"] = lambda f=fmt: f.fake(x, -1, "stochastic", 1)
        fns[f"{name} SR+RHT16"] = lambda f=fmt: f.fake(x, -1, "stochastic", 1, rht, 2)
    times = interleaved(fns, s.reps, s.warmup)
    ratios = median_ratios(times, "clone")
    return {k: {"x_clone": round(ratios[k], 3), "median_ms": round(median_ms(v), 3)} for k, v in times.items()}


def step_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor, autocast: bool) -> Callable[[], torch.Tensor]:
    """One SGD train step of `model` on the fixed batch (x, y), cross-entropy, optionally under bf16 autocast."""
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
    """Train steps fp32 / bf16 autocast / FQT simulate / FQT int8 (/ torchao) of one model, relative to fp32."""
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
                "median_ms": round(median_ms(v), 2)} for k, v in times.items()}
    if not isinstance(ao, nn.Module):
        rows["torchao int8 mixed precision"] = {"status": ao}
    bf16 = median_ratios(times, "bf16 autocast")
    rows["FQT int8"]["speedup_vs_bf16"] = round(1 / bf16["FQT int8"], 3)
    layers = backend_report(variants["FQT int8"][0])
    return {"model": name, "steps": rows, "int8_layers": layers,
            "int8_layers_ran_int8": sum(v == "int8" for v in layers.values()), "layers": len(layers)}


def run_suite(asked: BenchSettings, model_cfg: DictConfig, batch_size: int, seed: int) -> dict:
    """Every figure at every bench.threads count, with the settings, load averages and versions.

    `asked` is the bench node as configured (quick mode and the ranges are resolved here, before
    anything is timed); `model_cfg` the model choice for the linear-heavy model.
    """
    s = resolve_settings(asked, batch_size)
    torch.manual_seed(seed)  # the weights of both models
    name, lin, shape = linear_model(model_cfg, s)
    cnn_name, cnn = cnn_model(s)
    g = torch.Generator().manual_seed(seed)
    data = {"linear": (torch.randn(batch_size, *shape, generator=g),
                       torch.randint(0, s.classes, (batch_size,), generator=g)),
            "cnn": (torch.randn(s.cnn_batch, s.cnn_in_channels, s.cnn_length, generator=g),
                    torch.randint(0, s.classes, (s.cnn_batch,), generator=g))}
    malloc = "kept (fqtrun.allocator)" if keep_freed_memory() else "system"  # idempotent; the CLI set it already
    result: dict = {"load_before": os.getloadavg(), "malloc": malloc, "settings": dataclasses.asdict(s),
                    "batch_size": batch_size, "torch": torch.__version__, "runs": []}
    threads_before = torch.get_num_threads()
    try:
        for t in s.threads:
            torch.set_num_threads(t)
            result["runs"].append({
                "threads": t, "load": os.getloadavg(),
                "quantizers": quantizer_bench(s, seed),
                "formats": format_bench(s, seed),
                "linear": step_bench(name, lin, *data["linear"], s),
                "cnn": step_bench(cnn_name, cnn, *data["cnn"], s),
            })
    finally:
        torch.set_num_threads(threads_before)
    result["load_after"] = os.getloadavg()
    return result
