"""Precision hooks: the schedule that sets each step's bits, the bits probe, and BitOPs accounting.

Each is built by a HookSpec (fqtrun.build.DEFAULT_HOOKS) from the run's `schedule` node and the
RunFacts:
  schedule_hook  sets slots w, a (and dx, dw if asked) from the schedule before every step's
                 forward, and the stated eval_bits around evaluation (spec/cpt.md).
  bits_probe     adds the bits each slot used (read back from the layers) to every record.
  bitops_hook    cumulative GBitOPs from the bits the layers actually used (spec/cpt.md).
"""

from __future__ import annotations

import warnings

import torch
from hydra.utils import instantiate
from torch import nn

from fqtrun.data.loader import make_loader
from fqtrun.errors import CheckpointError, ConfigError
from fqtrun.precision.bitops import measure_macs, step_bitops
from fqtrun.precision.plan import PrecisionPlan, plan_of
from fqtrun.quant.convert import quant_layers, set_bits, used_bits
from fqtrun.training.hooks import Hook, RunFacts

FORWARD_SLOTS = ("w", "a")
GRAD_SLOTS = ("dx", "dw")
FULL_PRECISION_BITS = 32  # an operand left in fp32 (slot None, or a layer kept full precision)


def quantized(model: nn.Module, slots: tuple[str, ...] = FORWARD_SLOTS + GRAD_SLOTS) -> bool:
    """Whether any layer of the model holds a quantizer in one of `slots`."""
    return any(layer.slots[s] is not None for _, layer in quant_layers(model) for s in slots)


def build_plan(node, total_steps: int) -> PrecisionPlan:
    """The plan of a `schedule` config node over total_steps; ConfigError on a bad setting."""
    try:
        return plan_of(instantiate(node)(total_steps=max(1, total_steps)))
    except ValueError as e:
        raise ConfigError(str(e)) from None


class PrecisionSchedule(Hook):
    """Sets the quantizers' bits from the plan before each step, and eval_bits around evaluation."""

    def __init__(self, model: nn.Module, plan: PrecisionPlan):
        self.model, self.plan = model, plan
        self.label = plan.describe()
        self._saved: list[tuple[object, int]] = []

    def before_step(self, step: int) -> None:
        if self.plan.forward is not None:
            set_bits(self.model, FORWARD_SLOTS, self.plan.forward.bits_at(step))
        if self.plan.grad is not None:
            set_bits(self.model, GRAD_SLOTS, self.plan.grad.bits_at(step))

    def before_eval(self) -> None:
        if self.plan.eval_bits is None:
            return
        self._saved = [(q, q.bits) for _, layer in quant_layers(self.model)
                       for s in FORWARD_SLOTS if (q := layer.slots[s]) is not None]
        set_bits(self.model, FORWARD_SLOTS, self.plan.eval_bits)

    def after_eval(self) -> None:
        for q, bits in self._saved:  # back to the training bits (the next step sets them anyway)
            q.bits = bits
        self._saved = []

    def summary(self) -> dict:
        return {"schedule": self.label, "eval_bits": self.plan.eval_bits}

    def state_dict(self) -> dict:
        # The bits are a pure function of the step; the label guards against resuming with another schedule.
        return {"schedule": self.label}

    def load_state_dict(self, state: dict) -> None:
        if state.get("schedule", self.label) != self.label:
            raise CheckpointError(f"the checkpoint was trained with schedule '{state['schedule']}' but this run "
                                  f"asks for '{self.label}': resume with the same schedule overrides")


def schedule_hook(node, facts: RunFacts) -> PrecisionSchedule | None:
    """The schedule hook, or None for the default static schedule (each slot keeps its quant bits)."""
    plan = build_plan(node, facts.total_steps)
    if not plan.changes_bits:
        return None
    if not quantized(facts.model):
        raise ConfigError(f"schedule={plan.kind} sets quantizer bits but the run has no quantizers: "
                          "add +quant=<recipe> (e.g. +quant=per_sample), or drop the schedule overrides")
    if plan.grad is not None and not quantized(facts.model, GRAD_SLOTS):
        raise ConfigError("schedule.grad_min_bits/grad_max_bits need quantized gradients but the run's recipe "
                          "keeps them in fp32: use +quant=per_sample (or per_tensor, householder)")
    period = getattr(plan.forward, "period", None)
    if period is not None and period < plan.forward.max_bits - plan.forward.min_bits + 1:
        warnings.warn(f"schedule.cycles={plan.forward.cycles} gives {period}-step cycles, too short to visit "
                      f"every precision in {plan.forward.min_bits}..{plan.forward.max_bits}: lower schedule.cycles "
                      "or train longer", stacklevel=1)
    return PrecisionSchedule(facts.model, plan)


class BitsProbe(Hook):
    """Adds the bits each slot actually used (read back from the layers) to every record."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.last: dict[str, int] = {}

    def after_step(self, step: int, batch: dict) -> dict:
        self.last = {k: v for k, v in used_bits(self.model).items() if v is not None}
        return {f"bits_{k}": v for k, v in self.last.items()}

    def summary(self) -> dict:
        return {"bits_used": self.last}  # the last training step's, not the evaluation's


def bits_probe(node, facts: RunFacts) -> BitsProbe | None:
    """For every quantized run; registered last, so it reads the bits the other hooks set."""
    return BitsProbe(facts.model) if quantized(facts.model) else None


# ----- BitOPs --------------------------------------------------------------------------------
def layer_bits(model: nn.Module, names) -> dict[str, tuple[int, int, int]]:
    """(b_w, b_a, b_g) each layer used in the last step, read back from the layers; fp32 counts 32.

    b_g is dY's bits as the dx slot used them; the first layer computes no input gradient (its
    input needs none), so it reports its dw slot's bits instead. Layers kept fp count 32 for all.
    """
    fp = FULL_PRECISION_BITS
    out = {name: (fp, fp, fp) for name in names}
    for name, layer in quant_layers(model):
        used = layer.used_bits()
        grad = used["dx"] if used["dx"] is not None else used["dw"]
        out[name] = tuple(fp if b is None else b for b in (used["w"], used["a"], grad))
    return out


class BitOpsCounter(Hook):
    """Cumulative BitOPs: per step, sum over layers of MACs x (b_w b_a + b_w b_g + b_a b_g) (spec/cpt.md).

    MACs come from one sample batch of `sample_size`; a step of n samples costs n / sample_size
    of that. `reference` holds each layer's bits in the static run at max_bits the savings compare to.
    """

    def __init__(self, model: nn.Module, macs: dict[str, int], sample_size: int, n_train: int, batch_size: int,
                 reference: dict[str, tuple[int, int, int]], reference_label: str):
        self.model, self.macs, self.sample_size = model, macs, sample_size
        self.n_train, self.batch_size = n_train, batch_size
        self.per_epoch = -(-n_train // batch_size)
        self.reference, self.reference_label = reference, reference_label
        self.total = 0.0  # BitOPs so far
        self.samples = 0  # training samples so far

    def batch_at(self, step: int) -> int:
        """Samples in global step `step` (1-based): full batches, then the epoch's remainder."""
        index = (step - 1) % self.per_epoch
        return min(self.batch_size, self.n_train - index * self.batch_size)

    def after_step(self, step: int, batch: dict) -> dict:
        n = self.batch_at(step)
        self.total += step_bitops(self.macs, layer_bits(self.model, self.macs)) * n / self.sample_size
        self.samples += n
        return {"cost/gbitops": self.total / 1e9}

    def summary(self) -> dict:
        static = step_bitops(self.macs, self.reference) * self.samples / self.sample_size
        return {"gbitops": self.total / 1e9,
                "bitops_savings": 1.0 - self.total / static if static else 0.0,
                "bitops_reference": self.reference_label,
                "macs_per_sample": sum(self.macs.values()) / self.sample_size}

    def state_dict(self) -> dict:
        return {"total": self.total, "samples": self.samples}

    def load_state_dict(self, state: dict) -> None:
        self.total, self.samples = float(state.get("total", 0.0)), int(state.get("samples", 0))


def _reference_bits(model: nn.Module, names, plan: PrecisionPlan) -> tuple[dict, str]:
    """Per-layer (b_w, b_a, b_g) of the static run at max_bits, and a label for it."""
    fp = FULL_PRECISION_BITS
    ref = {name: (fp, fp, fp) for name in names}
    for name, layer in quant_layers(model):
        own = {s: (fp if (q := layer.slots[s]) is None else q.bits) for s in ("w", "a", "dx")}
        w = plan.forward.max_bits if plan.forward is not None else own["w"]
        a = plan.forward.max_bits if plan.forward is not None else own["a"]
        g = plan.grad.max_bits if plan.grad is not None else own["dx"]
        ref[name] = (w, a, g)
    kinds = sorted(set(ref.values()))
    label = "; ".join(f"w{w} a{a} g{g}" for w, a, g in kinds)
    return ref, f"static {label} (fp32 operands count as {fp} bits)"


def bitops_hook(node, facts: RunFacts) -> BitOpsCounter | None:
    """BitOPs accounting for every quantized run; MACs measured once on the first training batch."""
    if not quantized(facts.model):
        return None
    plan = build_plan(node, facts.total_steps)
    x, _ = next(iter(make_loader(facts.train_set, facts.batch_size, shuffle=False, seed=0)))
    with torch.random.fork_rng(devices=[]):  # the measuring forward must not move the run's RNG
        macs = measure_macs(facts.model, x)
    ref, label = _reference_bits(facts.model, macs, plan)
    return BitOpsCounter(facts.model, macs, len(x), len(facts.train_set), facts.batch_size, ref, label)
