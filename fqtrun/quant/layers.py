"""Quantized Linear / Conv1d / Conv2d with four pluggable quantizer slots and a compute backend.

Slots: `w` (forward weights), `a` (forward input activations), `dx` (gradient for the
input-gradient GEMM), `dw` (gradient for the weight-gradient GEMM). A slot holding None is
full precision. Every quantizer's `bits` can change between steps (precision schedules);
`used_bits()` reports what the last forward/backward actually used, so logs show what ran.
The layer holds state only; its backend (fqtrun/quant/backends/) runs the GEMMs and fills the
layer's RunRecord.

Sparsity contract (spec/sparsity.md): `weight_mask` (bool buffer or None). The forward uses
W * mask, the backward is straight-through to all dense weights; the mask is applied BEFORE
weight quantization, so the dX GEMM sees the masked, quantized W.
"""

from __future__ import annotations

import torch
from torch import nn

from fqtrun.quant import ops
from fqtrun.quant.backends import SLOTS, RunRecord, make_backend
from fqtrun.quant.grid import mix_seed

Tensor = torch.Tensor
_SLOT_ID = {s: i for i, s in enumerate(SLOTS)}


class NoiseContext:
    """Where stochastic rounding draws its noise: a pure function of (seed, step, draw, layer, slot).

    The trainer advances `step`; analyses that repeat a backward pass on one batch bump `draw`.
    Resuming at step t therefore replays exactly the noise of the uninterrupted run. The three live in
    `counter`, an int64 tensor [seed, step, draw]: a compiled step reads it as an input (quant/ops.py), so
    a new step does not recompile.
    """

    def __init__(self, seed: int = 0, step: int = 0, draw: int = 0):
        self.counter = torch.tensor([seed, step, draw], dtype=torch.int64)

    seed = property(lambda self: int(self.counter[0]), lambda self, v: self.counter.__setitem__(0, v))
    step = property(lambda self: int(self.counter[1]), lambda self, v: self.counter.__setitem__(1, v))
    draw = property(lambda self: int(self.counter[2]), lambda self, v: self.counter.__setitem__(2, v))

    def __repr__(self) -> str:
        return f"NoiseContext(seed={self.seed}, step={self.step}, draw={self.draw})"


class QuantLayerMixin:
    """Slots, mask, noise context, backend and the record of the last step, shared by the quantized layers."""

    def setup_quant(self, slots: dict, noise: NoiseContext, index: int, name: str | None = None) -> None:
        self.slots = {s: slots.get(s) for s in SLOTS}
        self.noise = noise
        self.index = index
        self.name = f"#{index}" if name is None else name  # qualified name: errors and logs say it
        self.backend = make_backend("simulate")  # apply_backend swaps it (backends.BACKENDS)
        self.record = RunRecord()  # what the last step ran, filled by the backend (backends.backend_report)
        self.register_buffer("weight_mask", None)

    def masked_weight(self) -> Tensor:
        w = self.weight
        if self.weight_mask is None:
            return w
        return w + (w * self.weight_mask - w).detach()  # straight-through to dense weights

    @property
    def fully_quantized(self) -> bool:
        return self.slots["dx"] is not None or self.slots["dw"] is not None

    def forward(self, x: Tensor) -> Tensor:
        """The backend runs the forward GEMM and sets up the backward ones, noting in self.record what ran."""
        return self.backend.run(self, x, self.record)

    def grad_seed(self, slot: str) -> int | Tensor:
        """Stochastic-rounding seed of a gradient slot: a pure function of (seed, step, draw, layer, slot);
        a 0-d int64 tensor while torch traces (quant/ops.py), an int otherwise."""
        return self._mix(True, self.index, _SLOT_ID[slot])

    def transform_key(self, gemm: int, fresh: bool) -> int | Tensor:
        """Key of a GEMM's transform signs: (seed, step, draw, layer, GEMM) when fresh every step, else
        (seed, layer, GEMM); a pure function of the noise context, so resuming replays it."""
        tag = len(SLOTS) + gemm  # apart from the slot ids of grad_seed
        return self._mix(fresh, self.index, tag)

    def _mix(self, with_step: bool, *parts: int) -> int | Tensor:
        """mix_seed(seed[, step, draw], *parts) of the noise counter, as grad_seed says."""
        counter = self.noise.counter if with_step else self.noise.counter[:1]
        if ops.tracing():
            return ops.mix_seed(counter, list(parts))
        return mix_seed(*counter.tolist(), *parts)

    def used_bits(self) -> dict[str, int | None]:
        """Bits each slot used in the last forward/backward (None = full precision)."""
        return dict(self.record.bits)

    def extra_repr(self) -> str:
        slots = ", ".join(f"{s}={q!r}" for s, q in self.slots.items() if q is not None)
        return f"{super().extra_repr()}, {slots or 'full precision'}"


class QuantLinear(QuantLayerMixin, nn.Linear):
    pass


class QuantConv1d(QuantLayerMixin, nn.Conv1d):
    pass


class QuantConv2d(QuantLayerMixin, nn.Conv2d):
    pass


QUANT_CLASS = {nn.Linear: QuantLinear, nn.Conv1d: QuantConv1d, nn.Conv2d: QuantConv2d}
