"""The small interface through which techniques plug into the training loop.

The trainer knows none of the techniques: precision schedules, sparsity masks, BitOPs
accounting and the gradient-variance probe are hooks. Every method is optional.
"""

from __future__ import annotations


class Hook:
    def before_step(self, step: int) -> None:
        """Before the forward pass of global step `step` (schedules set bits, masks refresh)."""

    def after_backward(self, step: int) -> None:
        """After loss.backward(), before optimizer.step() (e.g. SR-STE decay)."""

    def after_step(self, step: int) -> dict:
        """After optimizer.step(); returns metrics to add to the step's record."""
        return {}

    def before_eval(self) -> None:
        """Before evaluation (e.g. set the stated evaluation precision)."""

    def after_eval(self) -> None:
        """After evaluation (restore training state)."""

    def summary(self) -> dict:
        """Keys to add to summary.json at the end of the run."""
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
