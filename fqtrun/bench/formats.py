"""Speed of fake quantization in every number format (quant/formats), against clone() of the same tensor."""

from __future__ import annotations

from collections.abc import Callable

import torch

from fqtrun.bench.harness import interleaved, median_ms, median_ratios
from fqtrun.bench.settings import BenchSettings
from fqtrun.quant.formats import FORMATS
from fqtrun.quant.transforms import RandomHadamard


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
