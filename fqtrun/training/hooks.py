"""The small interface through which techniques plug into the training loop, and how hooks are built.

The trainer knows none of the techniques: precision schedules, sparsity masks, BitOPs
accounting and the gradient-variance probe are hooks. Every method is optional. Each hook is
built by a HookSpec from its own config node plus the RunFacts it needs, never the whole tree;
the list of specs a run uses is explicit (fqtrun.build.DEFAULT_HOOKS) and can be extended.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn


class Hook:
    def before_step(self, step: int) -> None:
        """Before the forward pass of global step `step` (schedules set bits, masks refresh)."""

    def after_backward(self, step: int) -> None:
        """After loss.backward(), before optimizer.step() (e.g. SR-STE decay)."""

    def after_step(self, step: int, batch: dict) -> dict:
        """After step `step` (1-based count of steps taken); `batch` holds that batch's metrics
        (loss, acc, ...; empty when a non-finite loss was skipped). Returns metrics to log."""
        return {}

    def wants_stop(self) -> bool:
        """True to end training after this step (a stop rule, e.g. the precision range test)."""
        return False

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


class PeriodicProbe(Hook):
    """A measurement on steps every, 2 every, ... (`measure(step) -> metrics`, which also sets `last`, what
    the summary reports). The trainer adds hook metrics only to the records it logs (every log_every steps),
    so the metrics are held until the next logged step; a newer measurement replaces them."""

    def __init__(self, every: int, log_every: int):
        self.every, self.log_every = every, max(1, log_every)
        self.pending: dict = {}
        self.last: dict = {}

    def measure(self, step: int) -> dict:
        raise NotImplementedError

    def after_step(self, step: int, batch: dict) -> dict:
        if step % self.every == 0:
            self.pending = self.measure(step)
        out = self.pending
        if step % self.log_every == 0:
            self.pending = {}
        return out

    def state_dict(self) -> dict:
        return {"pending": dict(self.pending), "last": dict(self.last)}

    def load_state_dict(self, state: dict) -> None:
        self.pending = dict(state.get("pending", {}))
        self.last = dict(state.get("last", {}))


@dataclass(frozen=True)
class RunFacts:
    """What a hook may need to know about the run besides its own settings."""

    model: nn.Module  # already converted (quantized layers in place), on the CPU
    train_set: Any  # the training split (held batches, MAC counts)
    task: Any  # fqtrun.tasks.Task: the loss a probe differentiates
    noise: Any  # the run's NoiseContext (stochastic-rounding noise keys)
    total_steps: int
    steps_per_epoch: int
    batch_size: int
    seed: int
    log_every: int
    is_main: bool = True  # DDP: rank 0 alone runs probes that log


@dataclass(frozen=True)
class HookSpec:
    """How to build one hook: `build(cfg.<key>, facts) -> Hook | None` (None: the run does not use it)."""

    name: str
    key: str | None  # the run config's node the hook is built from; None: facts only
    build: Callable[[Any, RunFacts], Hook | None]


def build_hooks(cfg: Any, facts: RunFacts, specs: Sequence[HookSpec]) -> list[Hook]:
    """The run's hooks, in the order of `specs` (later hooks see what earlier ones set)."""
    hooks = []
    for spec in specs:
        node = cfg.get(spec.key) if spec.key is not None else None
        hook = spec.build(node, facts)
        if hook is not None:
            hooks.append(hook)
    return hooks


class NoiseStep(Hook):
    """Keeps the stochastic-rounding noise a function of the global step (exact resume)."""

    def __init__(self, noise):
        self.noise = noise

    def before_step(self, step: int) -> None:
        self.noise.step = step
