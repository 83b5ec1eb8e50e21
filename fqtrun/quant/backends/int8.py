"""The int8 and auto backends: the quantized layers' three GEMMs on integer codes (spec/performance.md).

int8      the forward GEMM Y = X W^T, the input-gradient GEMM dX = Q(dY) W and the weight-gradient
          GEMM dW = Q(dY)^T X run as exact int8 GEMMs on the integer codes (int8 in, int32 accumulation;
          torch._int_mm or, on CPUs without fast int8 kernels, exact float32 chunks: int_gemm.py),
          scales applied outside. Convolutions run as the same GEMMs on im2col columns built from
          the int8 codes (and folded back per tap) when groups == 1 and the GEMM is big enough to
          win (MIN_CONV_GEMM), simulate otherwise. A GEMM whose operands are not both on an affine
          grid of <= 8 bits, or whose scales vary along its reduction (per-channel weights in dX),
          runs in fp32 on the dequantized codes. The layer's RunRecord says what each GEMM ran.
auto      int8 for a layer whose four slots all hold quantizers of <= 8 bits, simulate otherwise.

Zero points (the choice made here): the min-max and covering grids are asymmetric, codes c in
0..B with an integer zero z, and c - z spans up to -255..255 at 8 bits. The int8 operand is
q = c - 128 (always in -128..127) with alpha = 128 - z, so c - z = q + alpha, and
    (qa + alpha_a)(qb + alpha_b) = qa qb + alpha_a colsum(qb) + rowsum(qa) alpha_b + K alpha_a alpha_b,
the exact integer GEMM of (c - z), in int32 (K <= MAX_K). PSQ's and BHQ's span grids put code 0
at each row's minimum lo instead (value c * s + lo, zero 0): the left operand of the dX GEMM then
carries an offset, and
    Q(dY) W = diag(s) (C W) + lo colsum(W)
is the same exact integer GEMM on the codes plus a rank-1 term from W's column sums (already in
the zero-point correction). With the scales applied outside, the outputs equal the simulate
backend's whenever fp32 holds the simulate products exactly (integer sums below 2^24,
power-of-two scales, offsets on the grid); otherwise they differ by fp32 rounding only. BHQ's
transform stays outside the GEMM: T^-1 is applied to the dX GEMM's output (it acts on rows).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fqtrun.quant import fused, grid
from fqtrun.quant.backends.base import Backend, RunRecord
from fqtrun.quant.backends.int_gemm import gemm_input, int8_gemm
from fqtrun.quant.backends.simulate import Simulate
from fqtrun.quant.formats.quantizer import FormatQuantizer
from fqtrun.quant.gradient import quantize_pair
from fqtrun.quant.health import named_slot
from fqtrun.quant.quantizers import MinMaxQuantizer

Tensor = torch.Tensor

INT8_MAX_BITS = 8
MAX_K = (2**31 - 1) // (255 * 255)  # longest reduction whose int32 sum of 8-bit code products cannot overflow
MIN_CONV_GEMM = 32  # im2col int8 only when both C_in*k and C_out are at least this (smaller: fp32 wins)
_SIMULATE = Simulate()  # runs the layers that int8 and auto refuse


# ----------------------------------------------------------------------------------------------
# integer operands and the integer GEMM


@dataclass
class IntOperand:
    """A quantized matrix (R, C): value = (q + alpha) * scale + offset, q int8 = code - 128,
    alpha = 128 - zero, offset the value of code 0 on a span grid (None: 0).

    alpha (int32), scale and offset (float32) are (R, 1), (1, C) or (1, 1): constant along one dim at least.
    """

    q: Tensor
    alpha: Tensor
    scale: Tensor
    offset: Tensor | None = None
    rowsum: Tensor | None = None  # (R, 1) int32 sums of q over each row, when its quantizer made them
    colsum: Tensor | None = None  # (1, C) over each column
    gemm_q: Tensor | None = None  # q as the GEMM engine reads it, made once for an operand of two GEMMs (None: q)

    def t(self) -> IntOperand:
        tr = lambda v: None if v is None else v.t()
        return IntOperand(self.q.t(), self.alpha.t(), self.scale.t(), tr(self.offset), tr(self.colsum), tr(self.rowsum),
                          tr(self.gemm_q))

    def for_two_gemms(self) -> IntOperand:
        """This operand with q converted once for the GEMM engine (int_gemm.gemm_input), for the two GEMMs
        that read it (a layer's weights: forward and dX; its input: forward and dW)."""
        self.gemm_q = gemm_input(self.q)
        return self

    def dequantize(self) -> Tensor:
        """(code - zero) * scale + offset in float32, the simulate backend's operand."""
        v = (self.q.float() + self.alpha) * self.scale
        return v if self.offset is None else v.add_(self.offset)


def _alpha(zero: Tensor) -> Tensor:
    return (fused.OFFSET - zero).to(torch.int32)


def int_matmul(a: IntOperand, b: IntOperand, compile: bool = False, bias: Tensor | None = None) -> Tensor:
    """float32 (M, N) = a @ b (+ bias) via one int8 GEMM with int32 accumulation plus zero-point corrections.

    a's alpha/scale/offset must be constant along K (shape (M, 1) or (1, 1)), b's along K too ((1, N) or
    (1, 1)); only a may carry an offset (its rank-1 term uses b's column sums). The row sums of a and the
    column sums of b come with the operands when their quantizer made them, else from int8 GEMMs against
    ones. The corrections, scales and bias run as one pass over the output (fused.int_gemm_epilogue).
    """
    k = a.q.shape[1]
    if a.alpha.shape[-1] != 1 or b.alpha.shape[0] != 1:
        raise ValueError("int_matmul: the scales of an operand vary along the reduction: use the fp32 path")
    if b.offset is not None:
        raise ValueError("int_matmul: only the left operand may carry an offset (a span grid): use the fp32 path")
    acc = int8_gemm(a.q if a.gemm_q is None else a.gemm_q, b.q if b.gemm_q is None else b.gemm_q)  # int32, exact
    # row/column sums the quantizers did not make, as GEMMs against ones (~30x faster than .sum(dtype=int32))
    ones = torch.ones(8, k, dtype=torch.int8, device=a.q.device) if a.rowsum is None or b.colsum is None else None
    row_a = int8_gemm(a.q, ones.t())[:, :1] if a.rowsum is None else a.rowsum  # (M, 1)
    col_b = int8_gemm(ones, b.q)[:1] if b.colsum is None else b.colsum  # (1, N)
    # + alpha_a (colsum(qb) + K alpha_b) + rowsum(qa) alpha_b, then the scales, offset_a colsum(b), bias
    return fused.int_gemm_epilogue(acc, a.alpha, col_b + k * b.alpha, row_a, b.alpha, a.scale, b.scale,
                                   a.offset, bias, compile)


def _int_gemm_ok(a: IntOperand, b: IntOperand) -> str | None:
    """Why this product cannot run as an int8 GEMM here, or None."""
    if a.q.device.type != "cpu":
        return "int8 GEMM is wired for CPU only"  # GPU backends: not in this build
    if a.q.shape[1] > MAX_K:
        return f"reduction {a.q.shape[1]} > {MAX_K} could overflow int32"
    if b.offset is not None:
        return "right operand on a span grid"
    if a.alpha.shape[-1] != 1:
        return "left scales vary along the reduction"
    if b.alpha.shape[0] != 1:
        return "per-channel weight scales vary along the dX reduction"
    return None


def matmul(a: IntOperand, b: IntOperand, note: dict, gemm: str, compile: bool = False,
           bias: Tensor | None = None) -> Tensor:
    """a @ b (+ bias) as an int8 GEMM when possible, else fp32 on the dequantized values; records which in note."""
    why = _int_gemm_ok(a, b)
    note[gemm] = "int8" if why is None else f"fp32 ({why})"
    if why is None:
        return int_matmul(a, b, compile, bias)
    out = a.dequantize() @ b.dequantize()
    return out if bias is None else out.add_(bias)


# ----------------------------------------------------------------------------------------------
# operands from the layer's slots


def _int8_slot(q) -> str | None:
    """Why a forward slot cannot feed an int8 GEMM, or None."""
    if q is None:
        return "full precision"
    if type(q) is not MinMaxQuantizer:
        return f"{type(q).__name__} has no affine integer grid"
    if q.bits > INT8_MAX_BITS:
        return f"{q.bits} bits > {INT8_MAX_BITS}"
    return None


def forward_operand(q: MinMaxQuantizer, x2: Tensor, per_row: bool, compile: bool,
                    what: str = "weight") -> IntOperand:
    """int8 operand of a 2-D forward tensor with the same codes as q.codes(x2).

    per_row=True: one grid per row (weights per output channel); else one per tensor. NonFiniteError
    (naming `what`) when x2 holds NaN or inf.
    """
    scale, zero = grid.minmax_grid(x2, q.bits, keep_dim=0 if per_row else None, what=what)
    c = fused.nearest_int8(x2, scale, zero, q.bits, compile=compile)
    return IntOperand(c.q, _alpha(zero), scale.float(), rowsum=c.rowsum, colsum=c.colsum)


def grad_operand(gc) -> IntOperand | None:
    """int8 operand of gradient codes (gradient.GradCodes, uint8 codes), or None above 8 bits."""
    if gc.codes.dtype != torch.uint8:
        return None
    q = torch.bitwise_xor(gc.codes, fused.OFFSET).view(torch.int8)  # c ^ 0x80 read as int8 = c - 128
    return IntOperand(q, _alpha(gc.zero), gc.scale.float(), gc.lo, gc.rowsum, gc.colsum)


def fp_operand(t: Tensor) -> IntOperand:
    """A full-precision matrix posing as an operand (alpha 0, scale 1), for the fp32 fallbacks."""
    one = torch.ones(1, 1, device=t.device)
    return _FpOperand(t, torch.zeros(1, 1, dtype=torch.int32, device=t.device), one)


class _FpOperand(IntOperand):
    def t(self) -> IntOperand:
        return _FpOperand(self.q.t(), self.alpha, self.scale)

    def dequantize(self) -> Tensor:
        return self.q


def _grad_codes(layer, record: RunRecord, g2: Tensor, slots: tuple[str, ...]) -> dict:
    """slot -> the gradient codes of g2 for each of `slots` (None for a full-precision slot): the codes
    simulate.quantize_grad dequantizes (same quantizer, same seed). dX and dW codes of the same g2 come
    from one range pass and one SR pass where the quantizers allow (gradient.quantize_pair)."""
    qs = {s: record.use(s, layer.slots[s]) for s in slots}
    if len(slots) == 2 and all(q is not None for q in qs.values()):
        with named_slot(layer, record, "dx", g2):  # one dY for both: a NaN in it is named as dX's
            dx, dw = quantize_pair(qs["dx"], qs["dw"], g2, layer.grad_seed("dx"), layer.grad_seed("dw"))
        codes = {"dx": dx, "dw": dw}
    else:
        codes = {}
        for s, q in qs.items():
            with named_slot(layer, record, s, g2):
                codes[s] = None if q is None else q.quantize(g2, layer.grad_seed(s))
    for s, gc in codes.items():
        if gc is not None:
            record.measure(s, qs[s], g2, gc.dequantize)
    return codes


def _grad_matrix(gc, g2: Tensor, need_row_grid: bool) -> tuple[IntOperand, object | None, str | None]:
    """(operand of Q(g2), BHQ transform or None, why not int8 or None) for a backward GEMM, from the codes
    gc of g2 (None: a full-precision slot, fp32 g2)."""
    if gc is None:
        return fp_operand(g2), None, "dY full precision"
    op = grad_operand(gc)
    if op is None:
        return fp_operand(gc.dequantize().float()), None, f"{gc.bits} bits > {INT8_MAX_BITS}"
    grid_ok = op.alpha.shape[-1] == 1 if need_row_grid else op.alpha.shape[0] == 1
    if gc.transform is not None and not need_row_grid:
        return fp_operand(gc.dequantize().float()), None, "transform mixes rows along the dW reduction"
    if not grid_ok:
        return fp_operand(gc.dequantize().float()), None, "gradient scales vary along the reduction"
    return op, gc.transform, None


def _backward_gemm(record: RunRecord, slot: str, gc, g2: Tensor, other: IntOperand, compile: bool) -> Tensor:
    """dX = Q(g2) @ other (slot dx) or dW = Q(g2)^T @ other (slot dw), int8 where possible; gc: Q(g2)'s codes."""
    op, transform, why = _grad_matrix(gc, g2, need_row_grid=(slot == "dx"))
    left = op if slot == "dx" else op.t()
    if why is not None:
        record.gemms[slot] = f"fp32 ({why})"
        return left.dequantize() @ other.dequantize()
    out = matmul(left, other, record.gemms, slot, compile)
    return transform.inverse_(out) if transform is not None else out


# ----------------------------------------------------------------------------------------------
# the backends: which layers run int8


class Int8(Backend):
    """The three GEMMs on int8 codes where the layer allows (refusal), else the simulate backend.

    compile=True fuses the forward quantization and the GEMM epilogues with torch.compile (first use
    compiles, eager on failure).
    """

    name = "int8"

    def refusal(self, layer) -> str | None:
        """Why this layer's forward GEMM cannot run int8, or None."""
        return _operand_refusal(layer) or _conv_refusal(layer)

    def run(self, layer, x: Tensor, record: RunRecord) -> Tensor:
        why = self.refusal(layer)
        if why is not None:
            record.gemms = {"fwd": f"simulate ({why})"}
            return _SIMULATE.run(layer, x, record)
        w = layer.masked_weight()
        fn = Int8Linear if isinstance(layer, torch.nn.Linear) else Int8Conv
        return fn.apply(x, w, layer.bias, layer, record, self.compile)

    def describe(self, record: RunRecord) -> str:
        used = record.gemms
        if set(used) == {"fwd"} and used["fwd"].startswith("simulate"):
            return used["fwd"]
        if used and all(v == "int8" for v in used.values()):  # a GEMM not needed (no input grad) is absent
            return "int8"
        return super().describe(record)


class Auto(Int8):
    """int8 for a layer whose four slots all hold quantizers of <= 8 bits, simulate otherwise."""

    name = "auto"

    def refusal(self, layer) -> str | None:
        return _operand_refusal(layer) or _auto_refusal(layer) or _conv_refusal(layer)


def _operand_refusal(layer) -> str | None:
    """Why the forward operands (slots a, w) have no int8 codes (or a slot holds a number format), or None."""
    for s, q in layer.slots.items():
        if isinstance(q, FormatQuantizer):
            return f"slot {s}: {q.name} is a number format, not an integer grid"
    if getattr(layer.slots["w"], "takes_mask", False):
        return "weight quantizer fits against the dense weight"
    for s in ("a", "w"):
        why = _int8_slot(layer.slots[s])
        if why:
            return f"slot {s}: {why}"
    return None


def _auto_refusal(layer) -> str | None:
    """auto: why a gradient slot rules int8 out (full precision or more than 8 bits), or None."""
    for s in ("dx", "dw"):
        q = layer.slots[s]
        if q is None or q.bits > INT8_MAX_BITS:
            return f"auto: slot {s} is {'full precision' if q is None else f'{q.bits} bits'}"
    return None


def _conv_refusal(layer) -> str | None:
    """Why a convolution does not run as im2col int8 GEMMs (grouped, padding, too small), or None."""
    if isinstance(layer, torch.nn.modules.conv._ConvNd):
        if layer.groups != 1 or isinstance(layer.padding, str) or layer.padding_mode != "zeros":
            return "conv: grouped or non-numeric padding"
        k = layer.in_channels * int(torch.tensor(layer.kernel_size).prod())
        if min(k, layer.out_channels) < MIN_CONV_GEMM:
            return f"conv GEMM too small to win (C_in*k={k}, C_out={layer.out_channels} < {MIN_CONV_GEMM})"
    return None


def _activation_operand(layer, record: RunRecord, x: Tensor, compile: bool) -> IntOperand:
    """Slot a's per-tensor operand of x (any shape: the codes keep it)."""
    qa = record.use("a", layer.slots["a"])
    with named_slot(layer, record, "a", x):
        scale, zero = grid.minmax_grid(x, qa.bits, what="activation")
    c = fused.nearest_int8(x, scale, zero, qa.bits, compile=compile)
    op = IntOperand(c.q, _alpha(zero).view(1, 1), scale.float().view(1, 1), rowsum=c.rowsum, colsum=c.colsum)
    record.measure("a", qa, x, op.dequantize)
    return op


def _weight_operand(layer, record: RunRecord, w2: Tensor, compile: bool) -> IntOperand:
    qw = record.use("w", layer.slots["w"])
    with named_slot(layer, record, "w", w2):
        op = forward_operand(qw, w2, per_row=qw.granularity == "channel", compile=compile)
    record.measure("w", qw, w2, op.dequantize)
    return op


class Int8Linear(torch.autograd.Function):
    """Y = X W^T + b with all three GEMMs on int8 codes; straight-through to x and w (as simulate)."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, bias: Tensor | None, layer, record: RunRecord,
                compile: bool) -> Tensor:
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        xo, wo = _activation_operand(layer, record, x2, compile), _weight_operand(layer, record, w, compile)
        xo, wo = xo.for_two_gemms(), wo.for_two_gemms()
        record.gemms = {}
        y = matmul(xo, wo.t(), record.gemms, "fwd", compile, bias)  # (N, out)
        _save(ctx, (xo, wo), layer, record, compile, bias)
        ctx.x_shape = x.shape
        return y.view(*x.shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx, gy: Tensor):
        xo, wo = ctx.ops
        layer, record, compile = ctx.layer, ctx.record, ctx.compile
        g2 = gy.reshape(-1, gy.shape[-1]).float()  # (N, out), one row per sample (or token)
        gx = gw = gb = None
        slots = tuple(s for s, need in zip(("dx", "dw"), ctx.needs_input_grad[:2]) if need)
        codes = _grad_codes(layer, record, g2, slots)
        if "dx" in codes:
            gx = _backward_gemm(record, "dx", codes["dx"], g2, wo, compile).reshape(ctx.x_shape).to(gy.dtype)
        if "dw" in codes:
            gw = _backward_gemm(record, "dw", codes["dw"], g2, xo, compile).to(gy.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = g2.sum(0).to(gy.dtype)
        ctx.ops = None
        return gx, gw, gb, None, None, None


def _save(ctx, ops: tuple[IntOperand, IntOperand], layer, record: RunRecord, compile: bool,
          bias: Tensor | None) -> None:
    """What the backward of Int8Linear / Int8Conv reads: the operands (freed after one backward), the layer,
    its record and the compile flag."""
    ctx.ops, ctx.layer, ctx.record, ctx.compile, ctx.has_bias = ops, layer, record, compile, bias is not None


def _conv_geometry(layer, x: Tensor):
    """Conv1d as a 2-D conv of height 1: (x4, kernel, stride, padding, dilation)."""
    if x.dim() == 3:
        one = lambda t, fill: (fill, t[0])
        return (x.unsqueeze(2), one(layer.kernel_size, 1), one(layer.stride, 1), one(layer.padding, 0),
                one(layer.dilation, 1))
    return x, tuple(layer.kernel_size), tuple(layer.stride), tuple(layer.padding), tuple(layer.dilation)


def _int8_columns(xo: IntOperand, k, s, p, d) -> tuple[IntOperand, tuple[int, int]]:
    """im2col of the activation codes, in int8: (B*Ho*Wo, C*kh*kw) rows, columns in F.unfold's order.

    The codes of x (B, C, H, W) go channels-last into a buffer padded with the code of 0 (so the
    padding is exactly 0 on the grid), windows are strided views (Tensor.unfold), and one int8
    copy lays them out: a quarter of the bytes of an fp32 unfold, and x is quantized once, not
    kh*kw times.
    """
    b, c, h, w = xo.q.shape
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = k, s, p, d
    padded = torch.empty((b, h + 2 * ph, w + 2 * pw, c), dtype=torch.int8, device=xo.q.device)
    padded.copy_((-xo.alpha).to(torch.int8).view(1, 1, 1, 1).expand_as(padded))  # q of 0 = -alpha
    padded[:, ph:ph + h, pw:pw + w] = xo.q.permute(0, 2, 3, 1)
    win = padded.unfold(1, (kh - 1) * dh + 1, sh).unfold(2, (kw - 1) * dw + 1, sw)[..., ::dh, ::dw]
    ho, wo = win.shape[1], win.shape[2]  # win: (B, Ho, Wo, C, kh, kw)
    return IntOperand(win.reshape(b * ho * wo, c * kh * kw), xo.alpha, xo.scale), (ho, wo)


def _fold_columns(dcols: Tensor, in_shape, k, s, p, d, out_spatial) -> Tensor:
    """col2im of (B*Ho*Wo, C*kh*kw) column gradients into dX (B, C, H, W): one strided add per tap."""
    b, c, h, w = in_shape
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = k, s, p, d
    ho, wo = out_spatial
    taps = dcols.view(b, ho, wo, c, kh, kw)
    gpad = torch.zeros(b, h + 2 * ph, w + 2 * pw, c, dtype=dcols.dtype, device=dcols.device)
    for i in range(kh):
        for j in range(kw):
            gpad[:, i * dh: i * dh + sh * (ho - 1) + 1: sh, j * dw: j * dw + sw * (wo - 1) + 1: sw] += taps[..., i, j]
    return gpad[:, ph:ph + h, pw:pw + w].permute(0, 3, 1, 2).contiguous()


class Int8Conv(torch.autograd.Function):
    """Conv1d/Conv2d (groups 1) as im2col GEMMs on int8 codes; same quantized rows as FQTConv."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, bias: Tensor | None, layer, record: RunRecord,
                compile: bool) -> Tensor:
        x4, k, s, p, d = _conv_geometry(layer, x)
        b = x.shape[0]
        # the activation grid is the one of x (padding zeros sit on it: every grid holds 0 exactly)
        xo, out_spatial = _int8_columns(_activation_operand(layer, record, x4, compile), k, s, p, d)
        wo = _weight_operand(layer, record, w.reshape(w.shape[0], -1), compile).for_two_gemms()
        record.gemms = {}
        y = matmul(xo, wo.t(), record.gemms, "fwd", compile, bias)  # (B*Ho*Wo, C_out)
        y = y.view(b, *out_spatial, -1).movedim(-1, 1).reshape(b, -1, *(out_spatial if x.dim() == 4 else out_spatial[1:]))
        _save(ctx, (xo, wo), layer, record, compile, bias)
        ctx.geom = (x.shape, x4.shape, k, s, p, d, out_spatial)
        return y.contiguous()

    @staticmethod
    def backward(ctx, gy: Tensor):
        xo, wo = ctx.ops
        layer, record, compile = ctx.layer, ctx.record, ctx.compile
        x_shape, x4_shape, k, s, p, d, out_spatial = ctx.geom
        b, c_out = gy.shape[0], gy.shape[1]
        gy = gy.float()
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            # dX quantizer: one row per sample over C_out*positions (as FQTConv)
            g_rows = gy.reshape(b, -1)
            codes = _grad_codes(layer, record, g_rows, ("dx",))
            op, transform, why = _grad_matrix(codes["dx"], g_rows, need_row_grid=True)
            rows = _sample_rows_to_positions(op, b, c_out)  # (B*L, C_out)
            if why is not None:
                record.gemms["dx"] = f"fp32 ({why})"
                dcols = rows.dequantize() @ wo.dequantize()
            else:
                dcols = matmul(rows, wo, record.gemms, "dx", compile)  # (B*L, C*k)
            gx = _fold_columns(dcols, x4_shape, k, s, p, d, out_spatial).reshape(b, -1)
            if transform is not None:
                gx = transform.inverse_(gx)
            gx = gx.reshape(x_shape)
        if ctx.needs_input_grad[1]:
            cols = gy.movedim(1, -1).reshape(-1, c_out)  # (B*L, C_out): dW quantizer, one column per channel
            codes = _grad_codes(layer, record, cols, ("dw",))
            gw = _backward_gemm(record, "dw", codes["dw"], cols, xo, compile).reshape(layer.weight.shape)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = gy.sum(dim=[i for i in range(gy.dim()) if i != 1])
        ctx.ops = None
        return gx, gw, gb, None, None, None


def _sample_rows_to_positions(op: IntOperand, b: int, c_out: int) -> IntOperand:
    """(B, C_out*L) sample rows -> (B*L, C_out) position rows, each row keeping its sample's grid."""
    n_pos = op.q.shape[1] // c_out
    q = op.q.view(b, c_out, n_pos).transpose(1, 2).reshape(b * n_pos, c_out)

    def per_pos(t: Tensor) -> Tensor:
        return t.repeat_interleave(n_pos, dim=0) if t.shape[0] == b and b > 1 else t

    if isinstance(op, _FpOperand):
        return _FpOperand(q, op.alpha, op.scale)
    return IntOperand(q, per_pos(op.alpha), per_pos(op.scale), None if op.offset is None else per_pos(op.offset))
