"""Turn a float model into one with quantized layers, and report what was converted.

`convert` swaps every nn.Linear / nn.Conv1d / nn.Conv2d (minus the filtered ones) for its
quantized twin sharing the same Parameter objects, so optimizers and checkpoints see the
same tensors. Layers that cannot run a slot are refused loudly and listed in the report.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from torch import nn

from fqtrun.quant.formats.quantizer import FormatQuantizer
from fqtrun.quant.layers import QUANT_CLASS, SLOTS, NoiseContext, QuantLayerMixin

SlotFactory = Callable[[str, nn.Module], object | None]  # (slot, float module) -> quantizer or None


@dataclass
class ConversionReport:
    converted: list[str] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)  # name -> reason kept in full precision

    def rows(self) -> list[tuple[str, str]]:
        return [(n, "quantized") for n in self.converted] + [(n, f"full precision ({r})") for n, r in self.kept.items()]


def quantizable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every Linear/Conv1d/Conv2d, in module order."""
    return [(n, m) for n, m in model.named_modules() if type(m) in QUANT_CLASS or isinstance(m, QuantLayerMixin)]


def quant_layers(model: nn.Module) -> Iterator[tuple[str, QuantLayerMixin]]:
    for name, m in model.named_modules():
        if isinstance(m, QuantLayerMixin):
            yield name, m


def _swap(module: nn.Module) -> QuantLayerMixin:
    cls = QUANT_CLASS[type(module)]
    if isinstance(module, nn.Linear):
        new = cls(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
    else:
        new = cls(
            module.in_channels, module.out_channels, module.kernel_size, stride=module.stride,
            padding=module.padding, dilation=module.dilation, groups=module.groups,
            bias=module.bias is not None, padding_mode=module.padding_mode, device="meta",
        )
    new.weight = module.weight
    new.bias = module.bias
    new.train(module.training)
    return new


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _refusal(module: nn.Module, slots: dict) -> str | None:
    """Why this layer cannot run the requested slots, or None."""
    fqt = slots.get("dx") is not None or slots.get("dw") is not None
    formats = any(isinstance(q, FormatQuantizer) for q in slots.values())
    if (fqt or formats) and isinstance(module, (nn.Conv1d, nn.Conv2d)):
        if isinstance(module.padding, str) or module.padding_mode != "zeros":
            return "quantized conv backward needs numeric zero padding"
        if formats and module.groups != 1:
            return "grouped conv: a format's blocks and transforms would cross the groups"
    return None


def block_layers(model: nn.Module, layers: list[tuple[str, nn.Module]]) -> list[list[str]]:
    """The quantizable layer names of each block: the entries of the model's `blocks` (an nn.Sequential or
    nn.ModuleList of repeated blocks, e.g. a transformer's), else one block per layer."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, (nn.Sequential, nn.ModuleList)) or len(blocks) == 0:
        return [[name] for name, _ in layers]
    out = []
    for block in blocks:
        inside = {id(m) for m in block.modules()}
        out.append([name for name, m in layers if id(m) in inside])
    return out


def kept_blocks(model: nn.Module, layers: list[tuple[str, nn.Module]], first: int, last: int) -> dict[str, str]:
    """Layer name -> why it is kept in full precision, for the first `first` and last `last` blocks."""
    blocks = block_layers(model, layers)
    kept = {}
    for i, names in enumerate(blocks):
        if i < first or i >= len(blocks) - last:
            where = f"first {first}" if i < first else f"last {last}"
            key = "keep_first_blocks" if i < first else "keep_last_blocks"
            kept.update({n: f"{where} block(s) (quant.{key})" for n in names})
    return kept


def convert(
    model: nn.Module,
    make_slot: SlotFactory,
    noise: NoiseContext,
    keep_first: bool = False,
    keep_last: bool = False,
    exclude: tuple[str, ...] | list[str] = (),
    module_filter: Callable[[nn.Module, str], bool] | None = None,
    keep_first_blocks: int = 0,
    keep_last_blocks: int = 0,
) -> ConversionReport:
    """Replace quantizable layers in place; `make_slot(slot, module)` builds each slot's quantizer."""
    layers = quantizable_layers(model)
    if not layers:
        raise ValueError("the model has no Linear/Conv1d/Conv2d layer to quantize")
    report = ConversionReport()
    last = len(layers) - 1
    in_kept_blocks = kept_blocks(model, layers, keep_first_blocks, keep_last_blocks)
    for i, (name, module) in enumerate(layers):
        reason = None
        if isinstance(module, QuantLayerMixin):
            reason = "already converted"
        elif keep_first and i == 0:
            reason = "first layer (quant.keep_first)"
        elif keep_last and i == last:
            reason = "last layer (quant.keep_last)"
        elif name in in_kept_blocks:
            reason = in_kept_blocks[name]
        elif any(fnmatch.fnmatch(name, p) for p in exclude):
            reason = "matches quant.exclude"
        elif module_filter is not None and not module_filter(module, name):
            reason = "module_filter"
        slots = {} if reason else {s: make_slot(s, module) for s in SLOTS}
        reason = reason or _refusal(module, slots)
        if reason:
            report.kept[name] = reason
            continue
        new = _swap(module)
        new.setup_quant(slots, noise, index=i, name=name)  # simulate; backends.apply_backend picks another
        _set_submodule(model, name, new)
        report.converted.append(name)
    return report


def set_bits(model: nn.Module, slots: tuple[str, ...], bits: int) -> None:
    """Set the bit-width of the given slots in every quantized layer (schedules call this)."""
    for _, layer in quant_layers(model):
        for s in slots:
            q = layer.slots[s]
            if q is not None:
                q.bits = bits


def used_bits(model: nn.Module) -> dict[str, int | None]:
    """Bits per slot that the layers used in the last step (the max over layers; None = fp)."""
    out: dict[str, int | None] = {s: None for s in SLOTS}
    for _, layer in quant_layers(model):
        for s, b in layer.used_bits().items():
            if b is not None:
                out[s] = b if out[s] is None else max(out[s], b)
    return out
