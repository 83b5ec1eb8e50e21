"""Autograd Functions of the fully quantized linear and convolution (spec/fqt.md).

Forward: Y = X_hat W_hat^T on already fake-quantized operands. Backward, for the 2-D view
dY (N, out):
    dX = Q_dx(dY) W_hat          (input-gradient GEMM, PTQ / PSQ / BHQ at bits_dx)
    dW = Q_dw(dY)^T X_hat        (weight-gradient GEMM, per-tensor / per-column at bits_dw)
Conv layers quantize dY for dX with one row per sample over C*H*W, and for dW with one
column per output channel (rows = batch x positions, the GEMM's reduction), so per-column
scales commute with the reduction. The bias gradient is the exact sum of dY.
`layer.quantize_grad(slot, g2d)` returns g2d unchanged when that slot is full precision.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor


class _FQTFunction(torch.autograd.Function):
    """Forward of both Functions: the layer's own GEMM (layer.gemm) on the fake-quantized operands."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, bias: Tensor | None, layer) -> Tensor:
        ctx.save_for_backward(x, w)
        ctx.layer = layer
        ctx.has_bias = bias is not None
        return layer.gemm(x, w, bias)


class FQTLinear(_FQTFunction):
    """Linear with quantized output gradients in the dX and dW GEMMs (2-D view of dY)."""

    @staticmethod
    def backward(ctx, gy: Tensor):
        x, w = ctx.saved_tensors
        layer = ctx.layer
        g2 = gy.reshape(-1, gy.shape[-1])  # (N, out), one row per sample (or token)
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = (layer.quantize_grad("dx", g2) @ w).reshape(x.shape)
        if ctx.needs_input_grad[1]:
            gw = layer.quantize_grad("dw", g2).t() @ x.reshape(-1, x.shape[-1])
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = g2.sum(0)
        return gx, gw, gb, None


class FQTConv(_FQTFunction):
    """Conv1d/Conv2d with quantized output gradients in both backward convolutions."""

    @staticmethod
    def backward(ctx, gy: Tensor):
        x, w = ctx.saved_tensors
        layer = ctx.layer
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gq = layer.quantize_grad("dx", gy.reshape(gy.shape[0], -1)).reshape(gy.shape)
            gx = layer.conv_backward(gq, x, w, input_grad=True)
        if ctx.needs_input_grad[1]:
            cols = gy.movedim(1, -1)  # (B, *spatial, C_out)
            gq = layer.quantize_grad("dw", cols.reshape(-1, gy.shape[1])).reshape(cols.shape).movedim(-1, 1)
            gw = layer.conv_backward(gq, x, w, input_grad=False)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = gy.sum(dim=[d for d in range(gy.dim()) if d != 1])
        return gx, gw, gb, None
