"""Compute backends of the quantized layers' three GEMMs (spec/fqt.md, spec/performance.md).

A quantized layer (quant/layers.py) calls `layer.backend.run(layer, x, layer.record)`; the
backend computes the forward, sets up the backward, and fills the layer's RunRecord (base.py).

simulate  fp32 GEMMs on dequantized (fake-quantized) operands (simulate.py).
int8      the three GEMMs as int8 GEMMs on the integer codes, fp32 per GEMM where a slot cannot,
          simulate for layers that cannot (int8.py).
auto      int8 for a layer whose four slots all hold quantizers of <= 8 bits, simulate otherwise.

A new backend subclasses Backend and is registered with `register_backend`; no layer code changes.
"""

from __future__ import annotations

import torch

from fqtrun.quant.backends.base import GEMMS, SLOTS, Backend, RunRecord
from fqtrun.quant.backends.int8 import Auto, Int8
from fqtrun.quant.backends.simulate import Simulate

__all__ = [
    "BACKENDS", "GEMMS", "SLOTS", "Auto", "Backend", "Int8", "RunRecord", "Simulate", "apply_backend",
    "backend_report", "make_backend", "register_backend",
]

BACKENDS: dict[str, type[Backend]] = {cls.name: cls for cls in (Simulate, Int8, Auto)}  # by quant.backend


def register_backend(cls: type[Backend]) -> type[Backend]:
    """Make a backend selectable by its name (quant.backend, apply_backend); usable as a class decorator."""
    BACKENDS[cls.name] = cls
    return cls


def make_backend(name: str, compile: bool = False) -> Backend:
    """A backend object by registry name; one-line ValueError naming the known ones otherwise."""
    if name not in BACKENDS:
        raise ValueError(f"quant.backend={name!r} is unknown: use one of {', '.join(BACKENDS)}")
    return BACKENDS[name](compile=compile)


def _quant_layers(model: torch.nn.Module):
    """(name, layer) of every module that runs through a backend (the quantized layers)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(getattr(m, "backend", None), Backend)]


def apply_backend(model: torch.nn.Module, backend: str, compile: bool = False) -> None:
    """Set the compute backend (a registered name: simulate | int8 | auto ...) of every quantized layer;
    compile=True asks the backend for torch.compile'd kernels (int8: forward quantization, GEMM epilogues)."""
    chosen = make_backend(backend, compile)
    for _, m in _quant_layers(model):
        m.backend = chosen


def backend_report(model: torch.nn.Module) -> dict[str, str]:
    """Layer name -> what its GEMMs ran in the last step ("int8", "simulate (...)", or per GEMM)."""
    return {name: m.backend.describe(m.record) for name, m in _quant_layers(model)}
