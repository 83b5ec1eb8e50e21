"""One-shot dense -> N:M conversion of a trained model (spec sparsity.md, "Training with masks", last point).

The model starts dense (`fold_masks`: a sparse run's masks multiplied into its weights) and takes
magnitude masks from a MaskPolicy; `convert_to_sparse` then refits the kept weights layer by layer
on a few calibration batches and re-estimates the BatchNorm statistics (reconstruct.py), measuring
what each step recovers.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable

import torch
from torch import nn

from fqtrun.data.loader import make_loader
from fqtrun.quant.convert import quant_layers
from fqtrun.sparsity.reconstruct import BN_TYPES, reconstruct, reestimate_bn


def fold_masks(model: nn.Module) -> int:
    """Multiply every layer's mask into its weights and drop the mask, so the dense model is the one run;
    returns how many layers had one."""
    folded = 0
    for _, layer in quant_layers(model):
        if layer.weight_mask is not None:
            layer.weight.data.mul_(layer.weight_mask)
            layer.weight_mask = None
            folded += 1
    return folded


def calibration_batches(dataset, count: int, batch_size: int, seed: int, device: torch.device) -> list[torch.Tensor]:
    """The first `count` batches of a seeded shuffle of the training split (inputs only)."""
    out = []
    for x, _ in make_loader(dataset, batch_size, shuffle=True, seed=seed):
        if len(out) == count:
            break
        out.append(x.to(device))
    return out


def convert_to_sparse(model: nn.Module, names: list[str], batches: list[torch.Tensor], damping: float, bn: bool,
                      accuracy: Callable[[nn.Module], float]) -> dict:
    """Refit the masked layers `names` on the batches, then (bn) re-estimate BN; the model changes in place.

    Returns accuracy {magnitude_bn (BN re-estimation alone, when the model has BN and bn), reconstructed},
    errors {layer: reconstruct's output errors}, timing_s {reconstruction, bn_reestimation} and the
    calibration facts; `accuracy(model)` is the caller's test accuracy.
    """
    acc = {}
    if bn and any(isinstance(mod, BN_TYPES) for mod in model.modules()):
        # BN re-estimation alone, to tell its share of the recovery from the reconstruction's
        only_bn = copy.deepcopy(model)
        reestimate_bn(only_bn, batches)
        acc["magnitude_bn"] = accuracy(only_bn)
        del only_bn
    t0 = time.perf_counter()
    errors = {r.pop("layer"): r for r in reconstruct(model, names, batches, damping)}
    t1 = time.perf_counter()
    bn_count = reestimate_bn(model, batches) if bn else 0
    t2 = time.perf_counter()
    acc["reconstructed"] = accuracy(model)
    return {"accuracy": acc, "errors": errors, "timing_s": {"reconstruction": t1 - t0, "bn_reestimation": t2 - t1},
            "calibration": {"batches": len(batches), "samples": sum(len(x) for x in batches), "damping": damping,
                            "bn_layers_reestimated": bn_count}}
