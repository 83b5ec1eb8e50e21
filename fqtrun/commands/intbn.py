"""fqtrun intbn: swap BatchNorm + requantization for the integer form clip((A x + B) >> T, 0, L).

spec/denoise_bn.md part B. In a fake-quantized model a conv/linear layer's input codes and weight
codes are integers; their product-sum is the integer accumulator x, with real value x * s_in,
s_in = s_act * s_w (per output channel). A block conv -> BN [-> ReLU] -> the next layer's activation
quantizer computes codes clip(round(BN(x s_in) / s_out) + z_out, 0, L): with a static output grid that
is clip(floor(a x + b), 0, L) (bn_int.bn_affine) and converts exactly to integers (A, B, T).

Activation scales of the trained model are dynamic (min-max of each batch); deployment needs static
ones, so every activation quantizer is frozen to the min-max range seen on `calib_samples` training
samples. On that static model, every converted block computes its integer accumulator once and feeds
it either to the exact float reference (ExactBNRequant: the rational a, b) or to the integer op
(IntegerBNRequant); everything else is shared, so the two model-level accuracies must be equal.
BNs whose output is not only requantized by one quantized layer (e.g. it feeds a residual add) stay float.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import hydra
import torch
import torch.fx as fx
import torch.nn.functional as F
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from rich.table import Table
from torch import nn

from fqtrun.bn_int import ExactBNRequant, bn_affine, convert_bn_requant, verify
from fqtrun.build import load_train_run
from fqtrun.commands.common import run_reporting_errors
from fqtrun.config import register_configs
from fqtrun.errors import ConfigError
from fqtrun.files import write_json
from fqtrun.quant import grid
from fqtrun.quant.convert import quant_layers
from fqtrun.quant.layers import QuantLayerMixin
from fqtrun.quant.quantizers import MinMaxQuantizer, QuantCodes
from fqtrun.training.loggers import make_console, summary_table

register_configs()
BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d)
RELUS = (F.relu, torch.relu)


@dataclass
class IntbnConfig:
    checkpoint: str = MISSING  # last.pt inside a `fqtrun train` run folder (its .hydra/config.yaml is read)
    bits: Optional[int] = None  # activation (requantization output) bits; null = as trained (quant.bits_a)
    acc_bits: int = 32  # signed accumulator width (int32 hardware)
    # where (A, B, T) must be exact: reachable = every accumulator the layer can produce from its weight codes
    # and input grid (smallest shifts); full = every acc_bits integer
    acc_range: str = "reachable"
    max_shift: int = 40  # largest shift T searched
    calib_samples: int = 1024  # training samples whose min-max range freezes each activation scale
    batch_size: int = 500  # calibration and evaluation batch size
    threads: int = 0  # torch CPU threads (0 = torch's default)


ConfigStore.instance().store(name="intbn_schema", node=IntbnConfig)


# ----- the static model --------------------------------------------------------------------------
class StaticQuantizer:
    """Min-max grid frozen from a calibrated range [lo, hi]: same codes rule as MinMaxQuantizer."""

    def __init__(self, bits: int, lo: float, hi: float):
        self.bits = bits
        self.scale, self.zero = grid.minmax_grid(torch.tensor([lo, hi]), bits)

    def codes(self, x: torch.Tensor) -> QuantCodes:
        return QuantCodes(grid.quantize_nearest(x.detach(), self.scale, self.zero, self.bits), self.scale, self.zero)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.codes(x).dequantize()

    def __repr__(self) -> str:
        return f"StaticQuantizer(bits={self.bits}, scale={float(self.scale):.4g}, zero={int(self.zero)})"


class Accumulator(nn.Module):
    """The integer accumulator of a quantized conv/linear: (codes_x - z_x) (*) (codes_w - z_w), int64.

    float64 products and sums of integers are exact here (|x| < 2^53, checked by the caller).
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

    def __init__(self, ref: ExactBNRequant, integer: nn.Module, s_out: torch.Tensor, z_out: torch.Tensor):
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


# ----- finding conv -> BN [-> ReLU] -> quantizer blocks --------------------------------------------
class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, QuantLayerMixin) or super().is_leaf_module(m, qualname)


def _is_relu(node: fx.Node, modules: dict) -> bool:
    return ((node.op == "call_function" and node.target in RELUS)
            or (node.op == "call_method" and node.target == "relu")
            or (node.op == "call_module" and isinstance(modules.get(node.target), nn.ReLU)))


def find_blocks(model: nn.Module) -> tuple[list[tuple[str, str, str, bool]], dict[str, str]]:
    """([(layer, bn, consumer, relu)], {bn: why it stays float}) from the traced graph of `model`."""
    try:
        graph = _Tracer().trace(model)
    except Exception as e:  # fx cannot trace data-dependent control flow
        raise ConfigError(f"intbn cannot trace this model's graph ({type(e).__name__}): use a CIFAR ResNet "
                          "(model=resnet20)") from None
    modules = dict(model.named_modules())
    blocks, kept = [], {}
    calls = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], BN_TYPES):
            continue
        name, bn = node.target, modules[node.target]
        src = node.args[0] if node.args else None
        layer = modules.get(src.target) if isinstance(src, fx.Node) and src.op == "call_module" else None
        reason = None
        if not isinstance(layer, QuantLayerMixin):
            reason = "input is not a quantized conv/linear"
        elif len(src.users) != 1 or calls[src.target] != 1 or calls[name] != 1:
            reason = "its conv output is used elsewhere or a module is called twice"
        elif not bn.track_running_stats or bn.running_var is None:
            reason = "BN without running statistics"
        elif layer.slots["w"] is None or layer.slots["a"] is None or not isinstance(layer.slots["w"], MinMaxQuantizer):
            reason = "its conv/linear is not quantized with min-max codes (quant.dequant=ste)"
        out, relu = node, False
        if reason is None and len(node.users) == 1 and _is_relu(next(iter(node.users)), modules):
            out, relu = next(iter(node.users)), True
        users = list(out.users)
        consumer = modules.get(users[0].target) if len(users) == 1 and users[0].op == "call_module" else None
        if reason is None and not (isinstance(consumer, QuantLayerMixin) and consumer.slots["a"] is not None
                                   and users[0].args[0] is out and calls[users[0].target] == 1):
            reason = "output is not only requantized by one quantized layer (feeds " + \
                     ", ".join(getattr(u.target, "__name__", str(u.target)) for u in users) + ")"
        if reason:
            kept[name] = reason
        else:
            blocks.append((src.target, name, users[0].target, relu))
    return blocks, kept


# ----- loading, calibration, evaluation ------------------------------------------------------------
def load_run(checkpoint: str) -> tuple[DictConfig, dict, nn.Module, object, str]:
    """Rebuild the trained quantized model from its run folder; (run cfg, checkpoint, model, data, model name).

    On top of load_train_run: the run must be quantized with plain min-max codes and have BN.
    """
    run = load_train_run(checkpoint, "intbn", require=_convertible)
    return run.cfg, run.checkpoint, run.model, run.bundle, run.name


def _convertible(cfg: DictConfig, model: nn.Module, name: str) -> None:
    """Refuse runs intbn cannot convert, in one line each."""
    if cfg.quant is None:
        raise ConfigError("the run is not quantized: intbn needs a quantized model (train with +quant=qat bits=8)")
    if cfg.quant.dequant != "ste":
        raise ConfigError(f"the run used quant.dequant={cfg.quant.dequant}: intbn needs integer accumulators of "
                          "min-max codes (quant.dequant=ste); ridge adds a per-block offset")
    if not any(isinstance(m, BN_TYPES) for m in model.modules()):
        raise ConfigError(f"model={name} has no BatchNorm layer, so there is nothing to convert: use a model "
                          "with conv + BN blocks (train model=resnet20 dataset=digits +quant=qat bits=8)")


def _batches(dataset, batch_size: int, limit: int | None = None):
    n = len(dataset) if limit is None else min(limit, len(dataset))
    for i in range(0, n, batch_size):
        items = [dataset[j] for j in range(i, min(n, i + batch_size))]
        yield torch.stack([x for x, _ in items]), torch.as_tensor([int(y) for _, y in items])


@torch.no_grad()
def calibrate(model: nn.Module, dataset, samples: int, batch_size: int) -> dict[str, tuple[float, float]]:
    """Min and max of every quantized layer's input over the first `samples` training samples."""
    ranges: dict[str, list[float]] = {}
    handles = []
    for name, layer in quant_layers(model):
        def hook(_m, args, name=name):
            lo, hi = float(args[0].min()), float(args[0].max())
            old = ranges.get(name, [lo, hi])
            ranges[name] = [min(old[0], lo), max(old[1], hi)]
        handles.append(layer.register_forward_pre_hook(hook))
    for x, _ in _batches(dataset, batch_size, samples):
        model(x)
    for h in handles:
        h.remove()
    return {k: (v[0], v[1]) for k, v in ranges.items()}


@torch.no_grad()
def predict(model: nn.Module, dataset, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    preds, labels = [], []
    for x, y in _batches(dataset, batch_size):
        preds.append(model(x).argmax(-1))
        labels.append(y)
    return torch.cat(preds), torch.cat(labels)


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


def convert_model(model: nn.Module, blocks, cfg: IntbnConfig) -> list[dict]:
    """Swap each block's layer for its Accumulator and its BN for a BNRequant; per-layer report rows."""
    rows = []
    half = 1 << (cfg.acc_bits - 1)
    for layer_name, bn_name, consumer_name, relu in blocks:
        layer, bn = model.get_submodule(layer_name), model.get_submodule(bn_name)
        out_q = model.get_submodule(consumer_name).slots["a"]
        acc = Accumulator(layer)
        lo, hi = _acc_range(acc, layer.slots["a"])
        if max(-lo, hi) >= min(half, 1 << 53):
            raise ConfigError(f"layer {layer_name} reaches accumulators of {math.log2(max(-lo, hi)):.1f} bits: "
                              f"raise acc_bits={cfg.acc_bits} (at most 48)")
        if relu and int(out_q.zero) != 0:
            raise ConfigError(f"{consumer_name}'s input grid after a ReLU has zero point {int(out_q.zero)}, not 0")
        p = _bn_params(bn, layer)
        s_in = float(layer.slots["a"].scale) * acc.s_w  # float64: exact product of two float32 values
        s_out, z_out = float(out_q.scale), int(out_q.zero)
        x_range = (lo, hi) if cfg.acc_range == "reachable" else (-half, half - 1)
        integer, rep = convert_bn_requant(**p, s_in=s_in, s_out=s_out, bits=out_q.bits, acc_bits=cfg.acc_bits,
                                          max_shift=cfg.max_shift, zero_out=z_out, x_range=x_range)
        a_list, b_list = bn_affine(**p, s_in=s_in, s_out=s_out, nearest=True, zero_out=z_out)
        L = (1 << out_q.bits) - 1
        exact = all(verify(A, B, T, a, b, L, x_range)
                    for A, B, T, a, b in zip(rep["A"], rep["B"], rep["T"], a_list, b_list))
        model.set_submodule(layer_name, acc)
        model.set_submodule(bn_name, BNRequant(ExactBNRequant(a_list, b_list, L), integer,
                                               out_q.scale.reshape(()), out_q.zero.reshape(())))
        naive = [s for s in rep["shift_naive"] if s is not None]
        rows.append({
            "layer": layer_name, "bn": bn_name, "requant_by": consumer_name, "relu": relu,
            "channels": len(a_list), "bits_out": out_q.bits, "acc_reachable": [lo, hi], "verified_range": list(x_range),
            "verified_exact": exact, "shift_mean": rep["mean_shift"], "shift_max": rep["max_shift"],
            "shift_naive_mean": rep["mean_shift_naive"], "shift_naive_max": rep["max_shift_naive"],
            "naive_never_exact": len(rep["shift_naive"]) - len(naive),
            "shift": rep["shift"], "shift_naive": rep["shift_naive"],
        })
    return rows


def run_intbn(cfg: DictConfig, out_dir: Path) -> dict:
    """Convert, verify and evaluate; writes intbn.json into out_dir and returns its content."""
    checks = [(cfg.bits is None or 1 <= cfg.bits <= 10, f"bits={cfg.bits} must be in 1..10 (or null: as trained)"),
              (2 <= cfg.acc_bits <= 48, f"acc_bits={cfg.acc_bits} must be in 2..48"),
              (cfg.acc_range in ("reachable", "full"), f"acc_range={cfg.acc_range!r} is unknown: use reachable or full"),
              (cfg.calib_samples >= 1, f"calib_samples={cfg.calib_samples} must be >= 1"),
              (cfg.batch_size >= 1, f"batch_size={cfg.batch_size} must be >= 1")]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(msg)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    out_dir.mkdir(parents=True, exist_ok=True)
    run_cfg, _, model, bundle, name = load_run(cfg.checkpoint)
    blocks, kept = find_blocks(model)
    if not blocks:
        raise ConfigError(f"model={name} has no conv/linear -> BN [-> ReLU] -> quantized layer block to convert "
                          f"({'; '.join(f'{k}: {v}' for k, v in kept.items())})")

    pred_dyn, labels = predict(model, bundle.test, cfg.batch_size)  # as trained: per-batch min-max scales
    ranges = calibrate(model, bundle.train, cfg.calib_samples, cfg.batch_size)
    for lname, layer in quant_layers(model):
        q = layer.slots["a"]
        if q is not None:
            layer.slots["a"] = StaticQuantizer(cfg.bits or q.bits, *ranges[lname])
    pred_static, _ = predict(model, bundle.test, cfg.batch_size)  # static scales, float32 BN
    rows = convert_model(model, blocks, cfg)
    requants = [m for m in model.modules() if isinstance(m, BNRequant)]
    results = {}
    for use in ("ref", "int"):
        for m in requants:
            m.use, m.mismatches, m.codes_seen = use, 0, 0
        results[use] = predict(model, bundle.test, cfg.batch_size)[0]
    for row, m in zip(rows, requants):
        row["codes_compared"], row["code_mismatches"] = m.codes_seen, m.mismatches

    def acc(p: torch.Tensor) -> float:
        return float((p == labels).float().mean())

    summary = {
        "checkpoint": str(cfg.checkpoint), "model": name, "quant": OmegaConf.to_container(run_cfg.quant),
        "bits": cfg.bits, "acc_bits": cfg.acc_bits, "acc_range": cfg.acc_range, "calib_samples": cfg.calib_samples, "test_samples": len(labels),
        "acc_fake_quant_dynamic": acc(pred_dyn), "acc_static_float32_bn": acc(pred_static),
        "acc_float_bn_requant": acc(results["ref"]), "acc_integer_bn": acc(results["int"]),
        "predictions_equal": bool(torch.equal(results["ref"], results["int"])),
        "all_layers_exact": all(r["verified_exact"] for r in rows),
        "converted": len(rows), "kept_float": kept, "layers": rows,
    }
    summary["acc_difference"] = summary["acc_integer_bn"] - summary["acc_float_bn_requant"]
    write_json(out_dir / "intbn.json", summary)
    _print(summary, out_dir)
    return summary


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.1f}" if isinstance(v, float) else str(v)


def _print(s: dict, out_dir: Path) -> None:
    console = make_console()
    table = Table(title=f"fqtrun intbn: {s['model']}, per converted BN (shift bits T)", title_justify="left")
    for col in ("layer", "ch", "bits", "exact", "T ours mean/max", "T naive mean/max", "code mismatches"):
        table.add_column(col, justify="left" if col == "layer" else "right")
    for r in s["layers"]:
        naive = f"{_fmt(r['shift_naive_mean'])}/{_fmt(r['shift_naive_max'])}"
        if r["naive_never_exact"]:
            naive += f" ({r['naive_never_exact']} never)"
        table.add_row(r["bn"], str(r["channels"]), str(r["bits_out"]), "yes" if r["verified_exact"] else "NO",
                      f"{r['shift_mean']:.1f}/{r['shift_max']}", naive, f"{r['code_mismatches']}/{r['codes_compared']}")
    console.print(table)
    console.print(summary_table("accuracy on the test split", [
        ("fake-quant, dynamic scales (as trained)", f"{s['acc_fake_quant_dynamic']:.4f}"),
        ("static scales, float32 BN", f"{s['acc_static_float32_bn']:.4f}"),
        ("float BN + requant (exact reference)", f"{s['acc_float_bn_requant']:.4f}"),
        ("integer BN (A, B, T)", f"{s['acc_integer_bn']:.4f}"),
        ("difference / predictions equal", f"{s['acc_difference']:+.4f} / {s['predictions_equal']}"),
        ("converted / kept float", f"{s['converted']} / {len(s['kept_float'])}"),
        ("outputs", str(out_dir / "intbn.json")),
    ]))


@hydra.main(version_base="1.3", config_path="../conf", config_name="intbn")
def main(cfg: DictConfig) -> None:
    run_reporting_errors(run_intbn, cfg)
