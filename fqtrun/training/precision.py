"""Precision hooks: the schedule that sets each step's bits, and BitOPs accounting.

Two hook factories for HOOK_FACTORIES in commands/train.py, each (cfg, model, bundle) -> Hook | None:
  precision_hook  sets slots w, a (and dx, dw if asked) from the schedule before every step's
                  forward, and the stated eval_bits around evaluation (spec/cpt.md).
  bitops_hook     every quantized run: cumulative GBitOPs from the bits the layers actually used.
"""

from __future__ import annotations

import warnings

import torch
from omegaconf import OmegaConf
from torch import nn

from fqtrun.analysis.bitops import measure_macs, step_bitops
from fqtrun.data.loader import make_loader
from fqtrun.errors import CheckpointError, ConfigError
from fqtrun.quant.convert import quant_layers, set_bits
from fqtrun.schedule_config import PrecisionPlan, build_plan
from fqtrun.training.hooks import Hook

FORWARD_SLOTS = ("w", "a")
GRAD_SLOTS = ("dx", "dw")
FULL_PRECISION_BITS = 32  # an operand left in fp32 (slot None, or a layer kept full precision)


def steps_per_epoch(cfg, bundle) -> int:
    """Optimizer steps per epoch, as the Trainer counts them (the last batch may be partial)."""
    return len(make_loader(bundle.train, cfg.batch_size, shuffle=False, seed=0))


def plan_from_config(cfg, bundle) -> PrecisionPlan:
    """The run's PrecisionPlan over epochs x steps_per_epoch steps; ConfigError on a bad setting."""
    node = cfg.get("schedule")
    node = None if node is None else OmegaConf.to_container(node, resolve=True)
    try:
        return build_plan(node, max(1, cfg.epochs * steps_per_epoch(cfg, bundle)))
    except ValueError as e:
        raise ConfigError(str(e)) from None


def describe(plan: PrecisionPlan) -> str:
    """One line: what drives w/a, what drives dx/dw, the eval precision."""

    def one(s) -> str:
        if s.min_bits == s.max_bits:
            return f"static {s.max_bits}"
        period = getattr(s, "period", None)
        if plan.kind == "staged":
            return "staged " + ",".join(f"{f:g}:{b}" for f, b in s.stages)
        cycles = f" ({s.cycles} cycles of {period} steps)" if period else ""
        return f"{plan.kind} {s.min_bits}..{s.max_bits}{cycles}"

    fwd = one(plan.forward) if plan.forward is not None else "quant.bits_w/bits_a"
    grad = one(plan.grad) if plan.grad is not None else "quant.bits_dx/bits_dw"
    ev = plan.eval_bits if plan.eval_bits is not None else "quant.bits_w/bits_a"
    return f"w/a: {fwd}; dx/dw: {grad}; eval at {ev}"


class PrecisionSchedule(Hook):
    """Sets the quantizers' bits from the plan before each step, and eval_bits around evaluation."""

    def __init__(self, model: nn.Module, plan: PrecisionPlan):
        self.model, self.plan = model, plan
        self.label = describe(plan)
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


def precision_hook(cfg, model: nn.Module, bundle) -> PrecisionSchedule | None:
    """The schedule hook, or None for the default static schedule (each slot keeps its quant bits)."""
    plan = plan_from_config(cfg, bundle)
    if not plan.changes_bits:
        return None
    if cfg.quant is None:
        raise ConfigError(f"schedule={plan.kind} sets quantizer bits but the run has no quantizers: "
                          "add +quant=<recipe> (e.g. +quant=per_sample), or drop the schedule overrides")
    if plan.grad is not None and cfg.quant.grad is None:
        raise ConfigError(f"schedule.grad_min_bits/grad_max_bits need quantized gradients but quant={cfg.quant.name} "
                          "keeps them in fp32: use +quant=per_sample (or per_tensor, householder)")
    period = getattr(plan.forward, "period", None)
    if period is not None and period < plan.forward.max_bits - plan.forward.min_bits + 1:
        warnings.warn(f"schedule.cycles={plan.forward.cycles} gives {period}-step cycles, too short to visit "
                      f"every precision in {plan.forward.min_bits}..{plan.forward.max_bits}: lower schedule.cycles "
                      "or train longer", stacklevel=1)
    return PrecisionSchedule(model, plan)


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

    def after_step(self, step: int) -> dict:
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


def bitops_hook(cfg, model: nn.Module, bundle) -> BitOpsCounter | None:
    """BitOPs accounting for every quantized run; MACs measured once on the first training batch."""
    if cfg.quant is None:
        return None
    plan = plan_from_config(cfg, bundle)
    x, _ = next(iter(make_loader(bundle.train, cfg.batch_size, shuffle=False, seed=0)))
    with torch.random.fork_rng(devices=[]):  # the measuring forward must not move the run's RNG
        macs = measure_macs(model, x)
    ref, label = _reference_bits(model, macs, plan)
    return BitOpsCounter(model, macs, len(x), len(bundle.train), cfg.batch_size, ref, label)
