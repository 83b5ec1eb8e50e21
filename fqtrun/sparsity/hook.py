"""Sparse training inside the trainer loop: the MaskPolicy as a trainer Hook (refresh masks, SR-STE decay,
log densities); `sparsity_hook` is its entry in build.DEFAULT_HOOKS."""

from __future__ import annotations

from hydra.utils import instantiate
from torch import nn

from fqtrun.sparsity.policy import MaskPolicy
from fqtrun.training.hooks import Hook, RunFacts


class SparseTraining(Hook):
    """Adapts a MaskPolicy (masks, refresh, SR-STE) to the trainer's Hook interface."""

    def __init__(self, masks: MaskPolicy, model: nn.Module):
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

    def after_step(self, step: int, batch: dict) -> dict:
        return {"sparsity/density": self._density}

    def summary(self) -> dict:
        m = self.masks
        return {"sparsity": {"kind": m.kind, "n": m.n, "m": m.m, "target_density": m.n / m.m,
                             "density": self.masks.densities(self.model)}}


def sparsity_hook(node, facts: RunFacts) -> SparseTraining | None:
    """The hook of a `+sparsity=...` run (its mask policy built from the node); None for dense runs."""
    return None if node is None else SparseTraining(instantiate(node), facts.model)
