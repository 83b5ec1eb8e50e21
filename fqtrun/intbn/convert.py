"""Converting a calibrated quantized model: each block's conv/linear becomes its integer accumulator and
its BN the requantization op (exact reference or integer (A, B, T)), spec/denoise_bn.md B.

A conv/linear's input codes and weight codes are integers; their product-sum is the accumulator x with
real value x * s_in, s_in = s_act * s_w. With the consumer's static grid (s_out, z_out), BN followed by
requantization is clip(floor(a x + b), 0, L) (derive.bn_affine), converted exactly to (A, B, T).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from fqtrun.errors import ConfigError
from fqtrun.intbn.blocks import BN_TYPES, Block
from fqtrun.intbn.calibrate import StaticQuantizer
from fqtrun.intbn.derive import bn_affine, derive_layer, verify
from fqtrun.intbn.requant import ExactBNRequant, IntegerBNRequant
from fqtrun.quant.layers import QuantLayerMixin

ACC_RANGES = ("reachable", "full")  # where (A, B, T) must be exact (see convert_model)


def check_convertible(cfg: DictConfig, model: nn.Module, name: str) -> None:
    """Refuse a trained run integer BN cannot convert, in one line each (load_train_run's `require`)."""
    if cfg.quant is None:
        raise ConfigError("the run is not quantized: intbn needs a quantized model (train with +quant=qat bits=8)")
    if cfg.quant.dequant != "ste":
        raise ConfigError(f"the run used quant.dequant={cfg.quant.dequant}: intbn needs integer accumulators of "
                          "min-max codes (quant.dequant=ste); ridge adds a per-block offset")
    if not any(isinstance(m, BN_TYPES) for m in model.modules()):
        raise ConfigError(f"model={name} has no BatchNorm layer, so there is nothing to convert: use a model "
                          "with conv + BN blocks (train model=resnet20 dataset=digits +quant=qat bits=8)")


class Accumulator(nn.Module):
    """The integer accumulator of a quantized conv/linear: (codes_x - z_x) (*) (codes_w - z_w), int64.

    float64 products and sums of integers are exact here (|x| < 2^53, checked by convert_model).
    """

    def __init__(self, layer: QuantLayerMixin):
        super().__init__()
        self.layer = layer
        wq = layer.slots["w"].codes(layer.masked_weight().detach())
        self.register_buffer("w_int", (wq.codes - wq.zero).double())
        self.s_w = wq.scale.reshape(-1).double()  # one value, or one per output channel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.layer.slots["a"].codes(x)
        xi = (c.codes - c.zero).double()
        if isinstance(self.layer, nn.Linear):
            acc = F.linear(xi, self.w_int)
        else:
            acc = self.layer._conv_forward(xi, self.w_int, None)
        return acc.round().long()


class BNRequant(nn.Module):
    """Replaces a BN: accumulator -> output codes by the reference or the integer op -> (y - z_out) s_out.

    The next layer's static quantizer (scale s_out, zero z_out) maps this back to exactly y. `mismatches`
    counts codes where the op in use and the other op disagree on the same accumulator.
    """

    def __init__(self, ref: ExactBNRequant, integer: IntegerBNRequant, s_out: torch.Tensor, z_out: torch.Tensor):
        super().__init__()
        self.ref, self.integer = ref, integer
        self.s_out, self.z_out = s_out, z_out
        self.use = "ref"
        self.mismatches = 0
        self.codes_seen = 0

    def forward(self, acc: torch.Tensor) -> torch.Tensor:
        y_ref, y_int = self.ref(acc), self.integer(acc)
        self.mismatches += int((y_ref != y_int).sum())
        self.codes_seen += y_ref.numel()
        y = y_ref if self.use == "ref" else y_int
        return (y - self.z_out).float() * self.s_out


def use_op(model: nn.Module, use: str) -> list[BNRequant]:
    """Every converted BN computes with `use` ("ref" or "int") from now on, its counters reset."""
    requants = [m for m in model.modules() if isinstance(m, BNRequant)]
    for m in requants:
        m.use, m.mismatches, m.codes_seen = use, 0, 0
    return requants


def _bn_params(bn: nn.Module, layer: nn.Module) -> dict:
    """BN parameters in float64 (exact copies of the float32 values); a conv bias is folded into the mean."""
    C = bn.running_mean.numel()
    mean = bn.running_mean.double() - (layer.bias.detach().double() if layer.bias is not None else 0.0)
    return dict(gamma=bn.weight.detach().double() if bn.weight is not None else torch.ones(C, dtype=torch.float64),
                beta=bn.bias.detach().double() if bn.bias is not None else torch.zeros(C, dtype=torch.float64),
                mean=mean, var=bn.running_var.double(), eps=bn.eps)


def _acc_range(acc: Accumulator, a_q: StaticQuantizer) -> tuple[int, int]:
    """The reachable accumulator range over all channels: sum of min/max of w * x_code per channel."""
    L = (1 << a_q.bits) - 1
    z = int(a_q.zero)
    w = acc.w_int.reshape(acc.w_int.shape[0], -1)
    lo = torch.minimum(w * -z, w * (L - z)).sum(1)
    hi = torch.maximum(w * -z, w * (L - z)).sum(1)
    return int(lo.min()), int(hi.max())


def convert_model(model: nn.Module, blocks: list[Block], acc_bits: int, acc_range: str, max_shift: int) -> list[dict]:
    """Swap each block's layer for its Accumulator and its BN for a BNRequant; per-layer report rows.

    The model's activation quantizers must be static (calibrate.freeze_activations). acc_range: where
    (A, B, T) must be exact: "reachable" = every accumulator the layer can produce from its weight codes
    and input grid (smallest shifts), "full" = every acc_bits integer. max_shift: largest shift searched.
    """
    rows = []
    half = 1 << (acc_bits - 1)
    for layer_name, bn_name, consumer_name, relu in blocks:
        layer, bn = model.get_submodule(layer_name), model.get_submodule(bn_name)
        out_q = model.get_submodule(consumer_name).slots["a"]
        acc = Accumulator(layer)
        lo, hi = _acc_range(acc, layer.slots["a"])
        if max(-lo, hi) >= min(half, 1 << 53):
            raise ConfigError(f"layer {layer_name} reaches accumulators of {math.log2(max(-lo, hi)):.1f} bits: "
                              f"raise acc_bits={acc_bits} (at most 48)")
        if relu and int(out_q.zero) != 0:
            raise ConfigError(f"{consumer_name}'s input grid after a ReLU has zero point {int(out_q.zero)}, not 0")
        s_in = float(layer.slots["a"].scale) * acc.s_w  # float64: exact product of two float32 values
        a_list, b_list = bn_affine(**_bn_params(bn, layer), s_in=s_in, s_out=float(out_q.scale),
                                   zero_out=int(out_q.zero))
        x_range = (lo, hi) if acc_range == "reachable" else (-half, half - 1)
        fp = derive_layer(a_list, b_list, out_q.bits, x_range, acc_bits, max_shift)
        L = (1 << out_q.bits) - 1
        exact = all(verify(A, B, T, a, b, L, x_range) for A, B, T, a, b in zip(fp.A, fp.B, fp.T, a_list, b_list))
        model.set_submodule(layer_name, acc)
        model.set_submodule(bn_name, BNRequant(ExactBNRequant(a_list, b_list, L), IntegerBNRequant(fp.A, fp.B, fp.T, L),
                                               out_q.scale.reshape(()), out_q.zero.reshape(())))
        naive = [s for s in fp.T_naive if s is not None]
        complete = len(naive) == len(fp.T_naive)
        rows.append({
            "layer": layer_name, "bn": bn_name, "requant_by": consumer_name, "relu": relu,
            "channels": len(a_list), "bits_out": out_q.bits, "acc_reachable": [lo, hi], "verified_range": list(x_range),
            "verified_exact": exact, "shift_mean": sum(fp.T) / len(fp.T), "shift_max": max(fp.T),
            "shift_naive_mean": sum(naive) / len(naive) if complete else None,
            "shift_naive_max": max(naive) if complete else None,
            "naive_never_exact": len(fp.T_naive) - len(naive),
            "shift": fp.T, "shift_naive": fp.T_naive,
        })
    return rows
