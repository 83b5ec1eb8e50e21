"""Non-finite values met while quantizing: quantizers notice them in the range pass they already do.

A quantizer whose range (min/max, amax, row ranges) comes out NaN or inf raises NonFiniteError
instead of turning the NaN into a finite grid; the backend adds which layer and slot, and the
trainer acts on nan_policy (stop with one line, or skip the step).
"""

from __future__ import annotations

import torch


class NonFiniteError(FloatingPointError):
    """NaN or inf in a tensor being quantized; `layer` and `slot` are filled in by the backend when known."""

    def __init__(self, what: str = "input", layer: str | None = None, slot: str | None = None):
        self.what, self.layer, self.slot = what, layer, slot
        where = f"layer {layer}, slot {slot}" if layer is not None else (f"slot {slot}" if slot else "a quantizer")
        super().__init__(f"non-finite values (NaN or inf) in the {what} of {where}")


def check_range(*ranges: torch.Tensor, what: str = "input") -> None:
    """Raise NonFiniteError when a computed range holds NaN or inf (one small reduction, one host sync)."""
    for r in ranges:
        if not bool(torch.isfinite(r).all()):
            raise NonFiniteError(what)
