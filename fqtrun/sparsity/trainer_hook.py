"""Sparse training inside the trainer loop: refresh masks, SR-STE decay, log densities."""

from __future__ import annotations

from torch import nn

from fqtrun.sparsity.training import SparsityHook
from fqtrun.training.hooks import Hook


class SparseTraining(Hook):
    """Adapts SparsityHook (masks, refresh, SR-STE) to the trainer's Hook interface."""

    def __init__(self, masks: SparsityHook, model: nn.Module):
        self.masks, self.model = masks, model
        self.layers = masks.attach(model)  # first masks now, so checkpoints carry the buffers
        self._density = self._mean_density()

    def _mean_density(self) -> float:
        d = self.masks.densities(self.model)
        return sum(d.values()) / len(d)

    def before_step(self, step: int) -> None:
        if self.masks.maybe_refresh(self.model, step):
            self._density = self._mean_density()

    def after_backward(self, step: int) -> None:
        self.masks.apply_srste(self.model)

    def after_step(self, step: int) -> dict:
        return {"sparsity/density": self._density}

    def summary(self) -> dict:
        m = self.masks
        return {"sparsity": {"kind": m.kind, "n": m.n, "m": m.m, "target_density": m.n / m.m,
                             "density": self.masks.densities(self.model)}}


def sparsity_hook(cfg, model: nn.Module, bundle) -> SparseTraining | None:
    """The hook for `+sparsity=...` runs; None for dense runs."""
    s = cfg.get("sparsity")
    if s is None:
        return None
    masks = SparsityHook(kind=s.kind, n=s.n, m=s.m, every=s.every, method=s.method,
                         srste_decay=s.srste_decay, exclude=list(s.exclude), keep_last=s.keep_last)
    return SparseTraining(masks, model)
