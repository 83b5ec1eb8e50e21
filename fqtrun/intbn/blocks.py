"""Finding the conv/linear -> BN [-> ReLU] -> quantized layer blocks integer BN can convert (torch.fx)."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from fqtrun.errors import ConfigError
from fqtrun.quant.layers import QuantLayerMixin
from fqtrun.quant.quantizers import MinMaxQuantizer

BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d)
RELUS = (F.relu, torch.relu)


class Block(NamedTuple):
    """Module names of one convertible block: its quantized layer, the BN, the layer that requantizes."""

    layer: str
    bn: str
    consumer: str
    relu: bool  # a ReLU sits between the BN and the consumer (folded into the clip at 0)


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, QuantLayerMixin) or super().is_leaf_module(m, qualname)


def _is_relu(node: fx.Node, modules: dict) -> bool:
    return ((node.op == "call_function" and node.target in RELUS)
            or (node.op == "call_method" and node.target == "relu")
            or (node.op == "call_module" and isinstance(modules.get(node.target), nn.ReLU)))


def find_blocks(model: nn.Module) -> tuple[list[Block], dict[str, str]]:
    """([Block], {bn: why it stays float}) from the traced graph of `model`."""
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
            blocks.append(Block(src.target, name, users[0].target, relu))
    return blocks, kept
