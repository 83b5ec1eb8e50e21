"""Quantized Linear / Conv1d / Conv2d with four pluggable quantizer slots.

Slots: `w` (forward weights), `a` (forward input activations), `dx` (gradient for the
input-gradient GEMM), `dw` (gradient for the weight-gradient GEMM). A slot holding None is
full precision. Every quantizer's `bits` can change between steps (precision schedules);
`used_bits()` reports what the last forward/backward actually used, so logs show what ran.

Sparsity contract (spec/sparsity.md): `weight_mask` (bool buffer or None). The forward uses
W * mask, the backward is straight-through to all dense weights; the mask is applied BEFORE
weight quantization, so the dX GEMM sees the masked, quantized W.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fqtrun.quant.backends import int8_forward
from fqtrun.quant.functional import FQTConv, FQTLinear
from fqtrun.quant.grid import mix_seed

Tensor = torch.Tensor
SLOTS = ("w", "a", "dx", "dw")
_SLOT_ID = {s: i for i, s in enumerate(SLOTS)}


@dataclass
class NoiseContext:
    """Where stochastic rounding draws its noise: a pure function of (seed, step, draw, layer, slot).

    The trainer advances `step`; analyses that repeat a backward pass on one batch bump `draw`.
    Resuming at step t therefore replays exactly the noise of the uninterrupted run.
    """

    seed: int = 0
    step: int = 0
    draw: int = 0


class QuantLayerMixin:
    """Slots, mask and bookkeeping shared by the quantized layers."""

    def setup_quant(self, slots: dict, noise: NoiseContext, index: int, backend: str = "simulate") -> None:
        self.slots = {s: slots.get(s) for s in SLOTS}
        self.noise = noise
        self.index = index
        self.backend = backend  # simulate | int8 | auto (fqtrun/quant/backends.py)
        self.compile = False  # int8 backend: fuse the forward quantization and GEMM epilogues with torch.compile
        self.backend_used: dict[str, str] = {}  # what each GEMM ran in the last step (backends.backend_report)
        self.register_buffer("weight_mask", None)
        self._used: dict[str, int | None] = {s: None for s in SLOTS}

    # -- forward helpers -------------------------------------------------------------------
    def masked_weight(self) -> Tensor:
        w = self.weight
        if self.weight_mask is None:
            return w
        return w + (w * self.weight_mask - w).detach()  # straight-through to dense weights

    def _forward_quant(self, slot: str, t: Tensor) -> Tensor:
        q = self.slots[slot]
        self._used[slot] = None if q is None else q.bits
        return t if q is None else q(t)

    def quantized_operands(self, x: Tensor) -> tuple[Tensor, Tensor]:
        qw = self.slots["w"]
        if self.weight_mask is not None and getattr(qw, "takes_mask", False):
            # a quantizer that fits against the dense W (ridge, spec/denoise_bn.md A) gets W and the mask
            self._used["w"] = qw.bits
            return self._forward_quant("a", x), qw(self.weight, mask=self.weight_mask)
        return self._forward_quant("a", x), self._forward_quant("w", self.masked_weight())

    @property
    def fully_quantized(self) -> bool:
        return self.slots["dx"] is not None or self.slots["dw"] is not None

    def forward(self, x: Tensor) -> Tensor:
        """int8 GEMMs where the backend allows; else the GEMM (self.gemm) on fake-quantized operands,
        through the FQT autograd Function (self._fqt_function) when a gradient slot is quantized."""
        if self.backend != "simulate":
            y = int8_forward(self, x)  # None: this layer cannot run int8 now, simulate below
            if y is not None:
                return y
        x_hat, w_hat = self.quantized_operands(x)
        if self.fully_quantized and torch.is_grad_enabled():
            return self._fqt_function.apply(x_hat, w_hat, self.bias, self)
        return self.gemm(x_hat, w_hat, self.bias)

    # -- backward helper -------------------------------------------------------------------
    def quantize_grad(self, slot: str, g: Tensor) -> Tensor:
        q = self.slots[slot]
        self._used[slot] = None if q is None else q.bits
        if q is None:
            return g
        return q(g, self.grad_seed(slot))

    def grad_codes(self, slot: str, g: Tensor):
        """Integer codes of g for an integer backend (gradient.GradCodes), the codes quantize_grad
        dequantizes (same quantizer, same seed); None when the slot is full precision."""
        q = self.slots[slot]
        self._used[slot] = None if q is None else q.bits
        return None if q is None else q.quantize(g, self.grad_seed(slot))

    def grad_seed(self, slot: str) -> int:
        """Stochastic-rounding seed of a gradient slot: a pure function of (seed, step, draw, layer, slot)."""
        n = self.noise
        return mix_seed(n.seed, n.step, n.draw, self.index, _SLOT_ID[slot])

    def used_bits(self) -> dict[str, int | None]:
        """Bits each slot used in the last forward/backward (None = full precision)."""
        return dict(self._used)

    def extra_repr(self) -> str:
        slots = ", ".join(f"{s}={q!r}" for s, q in self.slots.items() if q is not None)
        return f"{super().extra_repr()}, {slots or 'full precision'}"


class QuantLinear(QuantLayerMixin, nn.Linear):
    _fqt_function = FQTLinear

    def gemm(self, x: Tensor, w: Tensor, bias: Tensor | None) -> Tensor:
        return nn.functional.linear(x, w, bias)


class _QuantConvMixin(QuantLayerMixin):
    _fqt_function = FQTConv

    def gemm(self, x: Tensor, w: Tensor, bias: Tensor | None) -> Tensor:
        return self._conv_forward(x, w, bias)

    def conv_backward(self, gy: Tensor, x: Tensor, w: Tensor, input_grad: bool) -> Tensor:
        mask = [input_grad, not input_grad, False]
        out = torch.ops.aten.convolution_backward(
            gy, x, w, None, self.stride, self.padding, self.dilation, False,
            [0] * len(self.stride), self.groups, mask,
        )
        return out[0] if input_grad else out[1]


class QuantConv1d(_QuantConvMixin, nn.Conv1d):
    pass


class QuantConv2d(_QuantConvMixin, nn.Conv2d):
    pass


QUANT_CLASS = {nn.Linear: QuantLinear, nn.Conv1d: QuantConv1d, nn.Conv2d: QuantConv2d}
