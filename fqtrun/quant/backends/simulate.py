"""The simulate backend: fp32 GEMMs on fake-quantized (dequantized) operands (spec/fqt.md).

Forward: Y = X_hat W_hat^T (the layer's own linear or convolution) on the slot-a and slot-w
fake-quantized operands. With a gradient slot quantized, the autograd Functions below run the
backward, for the 2-D view dY (N, out):
    dX = Q_dx(dY) W_hat          (input-gradient GEMM, PTQ / PSQ / BHQ at bits_dx)
    dW = Q_dw(dY)^T X_hat        (weight-gradient GEMM, per-tensor / per-column at bits_dw)
Conv layers quantize dY for dX with one row per sample over C*H*W, and for dW with one
column per output channel (rows = batch x positions, the GEMM's reduction), so per-column
scales commute with the reduction. The bias gradient is the exact sum of dY. Without a
gradient quantizer (QAT) plain autograd differentiates the GEMM (straight-through operands).
"""

from __future__ import annotations

import torch
from torch import nn

from fqtrun.quant.backends.base import Backend, RunRecord
from fqtrun.quant.health import named_slot

Tensor = torch.Tensor


class Simulate(Backend):
    """fp32 GEMMs on dequantized values; records the bits (its GEMMs are reported as "simulate")."""

    name = "simulate"

    def run(self, layer, x: Tensor, record: RunRecord) -> Tensor:
        x_hat, w_hat = quantized_operands(layer, x, record)
        if layer.fully_quantized and torch.is_grad_enabled():
            fqt = FQTLinear if isinstance(layer, nn.Linear) else FQTConv
            return fqt.apply(x_hat, w_hat, layer.bias, layer, record)
        return gemm(layer, x_hat, w_hat, layer.bias)

    def describe(self, record: RunRecord) -> str:
        return "simulate"


def _fake_quant(layer, record: RunRecord, slot: str, t: Tensor, mask: Tensor | None = None) -> Tensor:
    """Slot `slot` quantizes t; a mask goes to a quantizer that fits against the dense t (ridge)."""
    q = record.use(slot, layer.slots[slot])
    if q is None:
        return t
    with named_slot(layer, record, slot, t):
        t_hat = q(t) if mask is None else q(t, mask=mask)
    record.measure(slot, q, t if mask is None else t * mask, lambda: t_hat)
    return t_hat


def quantized_operands(layer, x: Tensor, record: RunRecord) -> tuple[Tensor, Tensor]:
    """(X_hat, W_hat): slot a on x, slot w on the masked weight (straight-through to dense weights)."""
    qw = layer.slots["w"]
    if layer.weight_mask is not None and getattr(qw, "takes_mask", False):
        # a quantizer that fits against the dense W (ridge, spec/denoise_bn.md A) gets W and the mask
        x_hat = _fake_quant(layer, record, "a", x)
        return x_hat, _fake_quant(layer, record, "w", layer.weight, mask=layer.weight_mask)
    return _fake_quant(layer, record, "a", x), _fake_quant(layer, record, "w", layer.masked_weight())


def quantize_grad(layer, record: RunRecord, slot: str, g: Tensor) -> Tensor:
    """Q(g) with the layer's gradient slot and its noise seed; g unchanged when the slot is full precision."""
    q = record.use(slot, layer.slots[slot])
    if q is None:
        return g
    with named_slot(layer, record, slot, g):
        g_hat = q(g, layer.grad_seed(slot))
    record.measure(slot, q, g, lambda: g_hat)
    return g_hat


def gemm(layer, x: Tensor, w: Tensor, bias: Tensor | None) -> Tensor:
    """The layer's own forward op (linear or convolution) on the given operands."""
    if isinstance(layer, nn.Linear):
        return nn.functional.linear(x, w, bias)
    return layer._conv_forward(x, w, bias)


def conv_backward(layer, gy: Tensor, x: Tensor, w: Tensor, input_grad: bool) -> Tensor:
    """dX (input_grad) or dW of the layer's convolution for the output gradient gy."""
    mask = [input_grad, not input_grad, False]
    out = torch.ops.aten.convolution_backward(
        gy, x, w, None, layer.stride, layer.padding, layer.dilation, False,
        [0] * len(layer.stride), layer.groups, mask,
    )
    return out[0] if input_grad else out[1]


class _FQTFunction(torch.autograd.Function):
    """Forward of both Functions: the layer's GEMM on the fake-quantized operands."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, bias: Tensor | None, layer, record: RunRecord) -> Tensor:
        ctx.save_for_backward(x, w)
        ctx.layer, ctx.record = layer, record
        ctx.has_bias = bias is not None
        return gemm(layer, x, w, bias)


class FQTLinear(_FQTFunction):
    """Linear with quantized output gradients in the dX and dW GEMMs (2-D view of dY)."""

    @staticmethod
    def backward(ctx, gy: Tensor):
        x, w = ctx.saved_tensors
        layer, record = ctx.layer, ctx.record
        g2 = gy.reshape(-1, gy.shape[-1])  # (N, out), one row per sample (or token)
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = (quantize_grad(layer, record, "dx", g2) @ w).reshape(x.shape)
        if ctx.needs_input_grad[1]:
            gw = quantize_grad(layer, record, "dw", g2).t() @ x.reshape(-1, x.shape[-1])
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = g2.sum(0)
        return gx, gw, gb, None, None


class FQTConv(_FQTFunction):
    """Conv1d/Conv2d with quantized output gradients in both backward convolutions."""

    @staticmethod
    def backward(ctx, gy: Tensor):
        x, w = ctx.saved_tensors
        layer, record = ctx.layer, ctx.record
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gq = quantize_grad(layer, record, "dx", gy.reshape(gy.shape[0], -1)).reshape(gy.shape)
            gx = conv_backward(layer, gq, x, w, input_grad=True)
        if ctx.needs_input_grad[1]:
            cols = gy.movedim(1, -1)  # (B, *spatial, C_out)
            gq = quantize_grad(layer, record, "dw", cols.reshape(-1, gy.shape[1]))
            gq = gq.reshape(cols.shape).movedim(-1, 1)
            gw = conv_backward(layer, gq, x, w, input_grad=False)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = gy.sum(dim=[d for d in range(gy.dim()) if d != 1])
        return gx, gw, gb, None, None
