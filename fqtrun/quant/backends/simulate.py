"""The simulate backend: fp32 GEMMs on fake-quantized (dequantized) operands (spec/fqt.md, spec/formats.md).

Integer grids (every slot an integer quantizer or full precision, today's recipes): forward
Y = X_hat W_hat^T (the layer's own linear or convolution) on the slot-a and slot-w fake-quantized
operands. With a gradient slot quantized, the autograd Functions FQTLinear / FQTConv run the
backward, for the 2-D view dY (N, out):
    dX = Q_dx(dY) W_hat          (input-gradient GEMM, PTQ / PSQ / BHQ at bits_dx)
    dW = Q_dw(dY)^T X_hat        (weight-gradient GEMM, per-tensor / per-column at bits_dw)
Conv layers quantize dY for dX with one row per sample over C*H*W, and for dW with one
column per output channel (rows = batch x positions, the GEMM's reduction), so per-column
scales commute with the reduction. The bias gradient is the exact sum of dY. Without a
gradient quantizer (QAT) plain autograd differentiates the GEMM (straight-through operands).

Number formats (a slot holding a FormatQuantizer; `PerGemm`): every operand of each of the three
GEMMs is quantized along the dimension that GEMM reduces over, in the layer's GEMM view (Linear:
X as (tokens, in), dY as (tokens, out); Conv: (batch, channels, *spatial); W as (out, in, ...)):
    forward  Y  = Q_a(X; in)  Q_w(W; in)^T
    dX GEMM  dX = Q_dx(dY R; out) Q_w(R^T W; out)        R: the dx slot's transform (or I)
    dW GEMM  dW = Q_dw(R^T dY; tokens)^T Q_a(R^T X; tokens)
So W and X are requantized from full precision for their second GEMM (as TransformerEngine's
rowwise/columnwise copies), except where the orientation cannot matter (one tensor scale, 2-D
weight tiles: NVFP4's 16x16 blocks make W and W^T identical) and no transform intervenes: then
the forward's values are reused. An integer slot keeps its forward values in both of its GEMMs
(transformed when the GEMM has a transform). A gradient slot's transform (RHT) acts on both
operands of its GEMM along the reduction, with one key, so it cancels in the product. Conv layers
reduce over the batch in the dW GEMM's blocks and transform (positions shift under the kernel's
taps, the batch does not), over channels in the other two.
On a numerics probe step (RunRecord.probe) each slot's operand is measured in its own GEMM (w and a in
the forward, dY in the dX / dW GEMM); a gradient slot with a transform is measured on dY R, what its
quantizer meets, with dY's outlier figures beside it (quant/health.py).
"""

from __future__ import annotations

import torch
from torch import nn

from fqtrun.quant import ops
from fqtrun.quant.backends.base import Backend, RunRecord
from fqtrun.quant.formats.quantizer import FormatQuantizer
from fqtrun.quant.gradient import SRGradientQuantizer, fake_pair
from fqtrun.quant.health import named_slot
from fqtrun.quant.quantizers import MinMaxQuantizer

Tensor = torch.Tensor

GEMM_IDS = {"fwd": 0, "dx": 1, "dw": 2}


class Simulate(Backend):
    """fp32 GEMMs on dequantized values; records the bits (its GEMMs are reported as "simulate").

    per_gemm=True runs every layer through PerGemm (operands quantized per GEMM), also layers whose
    slots are all integer grids (the variance study does, to compare them with format slots).
    """

    name = "simulate"

    def __init__(self, compile: bool = False, per_gemm: bool = False):
        super().__init__(compile)
        self.per_gemm = per_gemm

    def run(self, layer, x: Tensor, record: RunRecord) -> Tensor:
        if ops.tracing() and torch.is_grad_enabled():  # a compiled backward cannot note them (_grad_slot)
            record.use("dx", layer.slots["dx"])
            record.use("dw", layer.slots["dw"])
        if self.per_gemm or has_formats(layer):
            return PerGemm.apply(x, layer.masked_weight(), layer.bias, layer, record)
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


def _grad_slot(layer, record: RunRecord, slot: str):
    """The quantizer of gradient slot `slot`, noted in the record, except while torch traces: a compiled
    backward cannot write Python objects, so Simulate.run noted it at the forward (the same quantizer)."""
    return layer.slots[slot] if ops.tracing() else record.use(slot, layer.slots[slot])


def quantize_grad(layer, record: RunRecord, slot: str, g: Tensor) -> Tensor:
    """Q(g) with the layer's gradient slot and its noise seed; g unchanged when the slot is full precision."""
    q = _grad_slot(layer, record, slot)
    if q is None:
        return g
    with named_slot(layer, record, slot, g):
        g_hat = q(g, layer.grad_seed(slot))
    record.measure(slot, q, g, lambda: g_hat)
    return g_hat


def grad_pair(layer, record: RunRecord, g: Tensor) -> tuple[Tensor, Tensor] | None:
    """Q_dx(g) and Q_dw(g) from one range pass and one SR pass (gradient.fake_pair, the same values as
    quantize_grad for each), in eager mode where both slots are quantized and the kernels run; else None."""
    qx, qw = _grad_slot(layer, record, "dx"), _grad_slot(layer, record, "dw")
    if ops.tracing() or record.probe or not (isinstance(qx, SRGradientQuantizer)
                                             and isinstance(qw, SRGradientQuantizer)):
        return None
    return fake_pair(qx, qw, g, layer.grad_seed("dx"), layer.grad_seed("dw"))


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
        pair = grad_pair(layer, record, g2) if ctx.needs_input_grad[0] and ctx.needs_input_grad[1] else None
        if ctx.needs_input_grad[0]:
            gx = ((quantize_grad(layer, record, "dx", g2) if pair is None else pair[0]) @ w).reshape(x.shape)
        if ctx.needs_input_grad[1]:
            g_dw = quantize_grad(layer, record, "dw", g2) if pair is None else pair[1]
            gw = g_dw.t() @ x.reshape(-1, x.shape[-1])
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
            gq = conv_grad_view(gy, "dx", lambda m: quantize_grad(layer, record, "dx", m))
            gx = conv_backward(layer, gq, x, w, input_grad=True)
        if ctx.needs_input_grad[1]:
            gq = conv_grad_view(gy, "dw", lambda m: quantize_grad(layer, record, "dw", m))
            gw = conv_backward(layer, gq, x, w, input_grad=False)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = gy.sum(dim=[d for d in range(gy.dim()) if d != 1])
        return gx, gw, gb, None, None


def conv_grad_view(gy: Tensor, slot: str, quantize) -> Tensor:
    """quantize(m) on the integer gradient quantizers' matrix m of a conv's dY, folded back to gy's shape:
    dx: one row per sample over C*H*W; dw: one column per output channel, rows = batch x positions."""
    if slot == "dx":
        return quantize(gy.reshape(gy.shape[0], -1)).reshape(gy.shape)
    cols = gy.movedim(1, -1)  # (B, *spatial, C_out)
    return quantize(cols.reshape(-1, gy.shape[1])).reshape(cols.shape).movedim(-1, 1)


# ----- number formats: operands quantized per GEMM ----------------------------------------------
def has_formats(layer) -> bool:
    """True when a slot holds a number format (then PerGemm runs the layer)."""
    return any(isinstance(q, FormatQuantizer) for q in layer.slots.values())


def _slot_seed(layer, slot: str, gemm: str) -> int:
    """SR seed of forward slot w or a in one of its two GEMMs (a pure function of the noise context)."""
    return ops.mix(layer.grad_seed(slot), GEMM_IDS[gemm])


def _forward_operand(layer, record: RunRecord, slot: str, t: Tensor) -> Tensor:
    """Slot w or a on t along dim 1 (the forward GEMM's in-features / channels)."""
    q = record.use(slot, layer.slots[slot])
    if q is None:
        return t
    if isinstance(q, FormatQuantizer):
        t_hat = q.fake(t, 1, _slot_seed(layer, slot, "fwd"))
    else:
        # an integer grid: one grid, both GEMMs (MinMaxQuantizer.fake: the op while torch traces)
        t_hat = q.fake(t) if isinstance(q, MinMaxQuantizer) else q.codes(t).dequantize()
    record.measure(slot, q, t, lambda: t_hat)
    return t_hat


def _backward_operand(layer, slot: str, fp: Tensor, fwd: Tensor, dim: int, gemm: str, transform,
                      key: int | None) -> Tensor:
    """W (dX GEMM, dim 0) or X (dW GEMM, dim 0) as that GEMM's operand (see the module docstring)."""
    q = layer.slots[slot]
    if isinstance(q, FormatQuantizer) and (transform is not None or not q.orientation_free):
        return q.fake(fp, dim, _slot_seed(layer, slot, gemm), transform, key)
    return fwd if transform is None else transform.forward(fwd, dim, key)


def _grad_operand(layer, record: RunRecord, slot: str, g: Tensor, dim: int, conv: bool):
    """(dY as the operand of slot's GEMM, the GEMM's transform or None, its key)."""
    q = _grad_slot(layer, record, slot)
    if q is None:
        return g, None, None
    if not isinstance(q, FormatQuantizer):  # an integer gradient quantizer, on its own matrix view
        def quantize(m: Tensor) -> Tensor:
            return quantize_grad(layer, record, slot, m)

        return (conv_grad_view(g, slot, quantize) if conv else quantize(g)), None, None
    t = q.transform
    key = None if t is None else layer.transform_key(GEMM_IDS[slot], t.fresh)
    g_hat = q.fake(g, dim, layer.grad_seed(slot), t, key)
    if t is None:
        record.measure(slot, q, g, lambda: g_hat)
    elif record.probe:  # the quantizer's input is g R: measured on probe steps only
        record.measure(slot, q, t.forward(g, dim, key), lambda: g_hat, source=g)
    return g_hat, t, key


class PerGemm(torch.autograd.Function):
    """Linear / Conv with every GEMM operand quantized along its GEMM's reduction (module docstring)."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, bias: Tensor | None, layer, record: RunRecord) -> Tensor:
        linear = isinstance(layer, nn.Linear)
        x2 = x.reshape(-1, x.shape[-1]) if linear else x  # (tokens, in) | (batch, channels, *spatial)
        a_hat = _forward_operand(layer, record, "a", x2)
        w_hat = _forward_operand(layer, record, "w", w)
        y = gemm(layer, a_hat, w_hat, bias)
        # a full-precision slot's operand is x (a view of it) or w: saved as the inputs themselves, since
        # torch.compile cannot save a view of an input made inside the Function
        ctx.a_fp, ctx.w_fp = a_hat is x2, w_hat is w
        ctx.save_for_backward(x, w, None if ctx.a_fp else a_hat, None if ctx.w_fp else w_hat)
        ctx.layer, ctx.record, ctx.linear = layer, record, linear
        ctx.has_bias = bias is not None
        return y.view(*x.shape[:-1], w.shape[0]) if linear else y

    @staticmethod
    def backward(ctx, gy: Tensor):
        x, w, a_hat, w_hat = ctx.saved_tensors
        layer, record, linear = ctx.layer, ctx.record, ctx.linear
        x2 = x.reshape(-1, x.shape[-1]) if linear else x
        a_hat = x2 if ctx.a_fp else a_hat
        w_hat = w if ctx.w_fp else w_hat
        g = gy.reshape(-1, gy.shape[-1]) if linear else gy
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            g_op, t, key = _grad_operand(layer, record, "dx", g, 1, not linear)
            w_op = _backward_operand(layer, "w", w, w_hat, 0, "dx", t, key)
            gx = (g_op @ w_op).reshape(x.shape) if linear else conv_backward(layer, g_op, x2, w_op, True)
        if ctx.needs_input_grad[1]:
            g_op, t, key = _grad_operand(layer, record, "dw", g, 0, not linear)
            a_op = _backward_operand(layer, "a", x2, a_hat, 0, "dw", t, key)
            gw = g_op.t() @ a_op if linear else conv_backward(layer, g_op, a_op, w, False)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = g.sum(0) if linear else gy.sum(dim=[d for d in range(gy.dim()) if d != 1])
        return gx, gw, gb, None, None
