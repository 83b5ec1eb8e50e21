"""The N:M mask policy: which layers are masked, how, when masks refresh, SR-STE decay
(spec sparsity.md, "Training with masks"). Sparse training (sparsity/hook.py) and one-shot
conversion (`fqtrun mask`) both mask through it, so both pick the same layers.

Contract with the layers (fqtrun/quant/layers.py): a sparse-capable module has a `weight`
Parameter and an attribute `weight_mask` (bool buffer of the weight's shape, or None =
dense); its forward uses w + (w * mask - w).detach(), i.e. masked values forward and
straight-through gradients to ALL dense weights. The policy only sets `module.weight_mask`.

Use:
    policy = MaskPolicy("transposable", 2, 4)
    names = policy.attach(model)            # masks set from the current weights
    each step: policy.maybe_refresh(model, step); loss.backward(); policy.apply_srste(model); opt.step()
"""

from __future__ import annotations

import fnmatch
from numbers import Real

import torch
from torch import nn

from fqtrun.errors import ConfigError
from fqtrun.sparsity.diversity import check_nm
from fqtrun.sparsity.masks import METHODS, nm_mask, transposable_mask

KINDS = ("nm", "transposable")
LAYER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d)  # the classifier is the last of these


class MaskPolicy:
    """Owns the N:M masks of a model: which layers, when to refresh, SR-STE decay."""

    def __init__(
        self,
        kind: str = "nm",
        n: int = 2,
        m: int = 4,
        every: int = 40,
        method: str = "exact",
        srste_decay: float = 0.0,
        exclude: list[str] | tuple[str, ...] = (),
        keep_last: bool = True,
    ):
        check_nm(n, m)
        if kind not in KINDS:
            raise ConfigError(f"sparsity.kind={kind!r} must be one of {KINDS}")
        if method not in METHODS:
            raise ConfigError(f"sparsity.method={method!r} must be one of {METHODS}")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ConfigError(f"sparsity.every={every!r} must be an int >= 1: steps between mask refreshes")
        if isinstance(srste_decay, bool) or not isinstance(srste_decay, Real) or srste_decay < 0:
            raise ConfigError(
                f"sparsity.srste_decay={srste_decay!r} must be a number >= 0 (0 turns SR-STE off)"
            )
        self.kind, self.n, self.m, self.every, self.method = kind, n, m, every, method
        self.srste_decay = float(srste_decay)
        self.exclude = list(exclude)
        self.keep_last = keep_last
        self.names: list[str] = []

    def mask_for(self, weight: torch.Tensor) -> torch.Tensor:
        """The mask of one weight under this policy's kind / n / m / method."""
        with torch.no_grad():
            if self.kind == "nm":
                return nm_mask(weight, self.n, self.m)
            return transposable_mask(weight, self.n, self.m, self.method)

    def attach(self, model: nn.Module) -> list[str]:
        """Choose the layers, set their first masks; returns their names. Raises if none qualify."""
        capable = [(name, mod) for name, mod in model.named_modules() if _capable(mod)]
        layers = [name for name, mod in model.named_modules() if isinstance(mod, LAYER_TYPES)]
        classifier = layers[-1] if (self.keep_last and layers) else None
        self.names = [
            name
            for name, _ in capable
            if name != classifier and not any(fnmatch.fnmatchcase(name, p) for p in self.exclude)
        ]
        if not self.names:
            raise ConfigError(
                f"sparsity: no layer can take a mask ({len(capable)} sparse-capable layers, classifier kept dense: "
                f"{classifier!r}, exclude={self.exclude}); convert the model to quantized layers or relax sparsity.exclude"
            )
        self.refresh(model)
        return list(self.names)

    def refresh(self, model: nn.Module) -> None:
        """Recompute every mask from the current dense weights."""
        for name in self.names:
            mod = model.get_submodule(name)
            mask = self.mask_for(_full(mod.weight.detach()))
            if "weight_mask" in mod._buffers:
                mod.weight_mask = mask
            else:  # a plain attribute: make it a buffer so checkpoints and .to() carry it
                if hasattr(mod, "weight_mask"):
                    delattr(mod, "weight_mask")
                mod.register_buffer("weight_mask", mask)

    def maybe_refresh(self, model: nn.Module, step: int) -> bool:
        """Refresh the masks when step % every == 0; returns whether it did."""
        if step % self.every:
            return False
        self.refresh(model)
        return True

    @torch.no_grad()
    def apply_srste(self, model: nn.Module) -> None:
        """SR-STE: add srste_decay * w to the gradient of the pruned weights (call after backward)."""
        if self.srste_decay == 0.0:
            return
        for name in self.names:
            mod = model.get_submodule(name)
            w, mask = mod.weight, mod.weight_mask
            if w.grad is None or mask is None:
                continue
            w.grad.add_(torch.where(_like(mask, w), 0.0, w.detach()), alpha=self.srste_decay)

    def densities(self, model: nn.Module) -> dict[str, float]:
        """Fraction of weights kept, per masked layer (1.0 where the mask is None)."""
        out = {}
        for name in self.names:
            mask = model.get_submodule(name).weight_mask
            out[name] = 1.0 if mask is None else float(mask.float().mean())
        return out


def _capable(mod: nn.Module) -> bool:
    return (
        isinstance(getattr(mod, "weight", None), nn.Parameter)
        and hasattr(mod, "weight_mask")
        and mod.weight.dim() >= 2
    )


# A sharded run (trainer.strategy=fsdp) holds each weight as a DTensor shard between steps; masks stay
# full-size buffers (the forward sees the full weight). DTensors are recognised by their methods: no import.
def _full(weight: torch.Tensor) -> torch.Tensor:
    """The whole weight: a shard gathered from every rank (all ranks call this together), else itself."""
    return weight.full_tensor() if hasattr(weight, "full_tensor") else weight


def _like(mask: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The mask laid out as `weight` is: this rank's part of it for a shard, else the mask itself."""
    if not hasattr(weight, "full_tensor"):
        return mask
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(mask, weight.device_mesh, weight.placements, src_data_rank=None)
