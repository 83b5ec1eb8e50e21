"""Non-finite values met while quantizing: quantizers notice them in the range pass they already do.

A quantizer whose range (min/max, amax, row ranges) comes out NaN or inf raises NonFiniteError
instead of turning the NaN into a finite grid; the backend adds which layer and slot, and the
trainer acts on nan_policy (stop with one line, or skip the step).
"""

from __future__ import annotations

import numpy as np
import torch


class NonFiniteError(FloatingPointError):
    """NaN or inf in a tensor being quantized; `layer` and `slot` are filled in by the backend when known.

    intermediate=False: the tensor handed to the quantizer holds them; True: it was finite and a value the
    quantizer computed from it overflowed (a defect of the quantizer, reported as such)."""

    def __init__(self, what: str = "input", layer: str | None = None, slot: str | None = None,
                 intermediate: bool = False):
        self.what, self.layer, self.slot, self.intermediate = what, layer, slot, intermediate
        where = f"layer {layer}, slot {slot}" if layer is not None else (f"slot {slot}" if slot else "a quantizer")
        if intermediate:  # the input was finite: say so, or a user hunts for a NaN their model never made
            super().__init__(f"non-finite values (NaN or inf) computed from the finite {what} of {where}: an "
                             "overflow inside the quantizer (please report it)")
        else:
            super().__init__(f"non-finite values (NaN or inf) in the {what} of {where}")


def check_range(*ranges: torch.Tensor, what: str = "input", intermediate: bool = False) -> None:
    """Raise NonFiniteError when a computed range holds NaN or inf (one small reduction, one host sync).
    intermediate: the ranges are computed values (a grid's levels), not the input's own min and max."""
    for r in ranges:
        if not _finite(r):
            raise NonFiniteError(what, intermediate=intermediate)


def _finite(r: torch.Tensor) -> bool:
    """Whether r holds only finite values: on numpy for a plain CPU float32 tensor (a third of torch's launch
    cost on the small range tensors this sees), else torch."""
    if type(r) is torch.Tensor and r.device.type == "cpu" and r.dtype == torch.float32:
        return bool(np.isfinite(r.detach().numpy()).all())
    return bool(torch.isfinite(r).all())
