"""The backend interface: a quantized layer hands its input and its RunRecord to its backend.

A backend runs the layer's forward GEMM and sets up the two backward GEMMs (autograd), and
notes in the record what ran: the bits of each slot and, per GEMM, int8 or fp32 and why. It
reads the layer (slots, weight, bias, weight_mask, masked_weight(), fully_quantized,
grad_seed(slot), the Linear/Conv geometry) and never assigns the layer's attributes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from fqtrun.quant import health

Tensor = torch.Tensor

SLOTS = ("w", "a", "dx", "dw")
GEMMS = ("fwd", "dx", "dw")


@dataclass
class RunRecord:
    """What a layer's last step ran: bits per slot (None = full precision), and per GEMM what ran.

    One record per layer, filled in place: the forward sets w and a, the backward dx and dw, so an
    evaluation forward leaves the last training backward's gradient bits in place.
    """

    bits: dict[str, int | None] = field(default_factory=lambda: {s: None for s in SLOTS})
    gemms: dict[str, str] = field(default_factory=dict)  # "fwd" | "dx" | "dw" -> "int8", "fp32 (why)", ...
    probe: bool = False  # the numerics-health hook's probe step: the backend measures every slot
    health: dict[str, Tensor] = field(default_factory=dict)  # slot -> quant.health.measure sums

    def measure(self, slot: str, q, x: Tensor, x_hat: Callable[[], Tensor], source: Tensor | None = None) -> None:
        """On a probe step, the health sums of `slot`'s quantization of x (x_hat() gives the quantized x;
        source: the operand before a transform, x = source R)."""
        if self.probe:
            self.health[slot] = health.measure(x, x_hat(), q, source)

    def use(self, slot: str, q):
        """Note that `slot` runs with quantizer q (None: full precision) at its current bits; returns q."""
        self.bits[slot] = None if q is None else q.bits
        return q


class Backend(ABC):
    """How a quantized layer computes its GEMMs; `compile` asks for torch.compile'd kernels if it has any."""

    name = "backend"  # the quant.backend setting that selects it (BACKENDS)

    def __init__(self, compile: bool = False):
        self.compile = bool(compile)

    @abstractmethod
    def run(self, layer, x: Tensor, record: RunRecord) -> Tensor:
        """The layer's output for x, differentiable (the backward GEMMs run in autograd); fills `record`."""

    def describe(self, record: RunRecord) -> str:
        """One line of what the layer's GEMMs ran in its last step (backend_report)."""
        if not record.gemms:
            return f"{self.name} (not run yet)"
        return ", ".join(f"{g}={record.gemms[g]}" for g in GEMMS if g in record.gemms)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(compile={self.compile})"
