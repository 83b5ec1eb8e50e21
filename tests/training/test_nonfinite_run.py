"""nan_policy on non-finite values that the quantizers meet inside a run (not only a NaN loss).

A hook puts NaN or inf into one layer's input, dY or weight during one chosen step. stop: the run ends with
one TrainingError line naming the step, the layer, the slot and the last good checkpoint, and what was
written before (last.pt, metrics.jsonl up to that step) is intact. skip: the step is skipped and counted,
and the run finishes. Each policy meets every place (input, dY, weight), Linear (mlp) and Conv (cnn1d
with 32 channels, so its second conv runs int8 too), simulate and int8 (the full cross of place x layer
x backend x NaN/inf is tests/quant/backends/test_nonfinite.py, at the layer).
"""

from __future__ import annotations

import json

import pytest
import torch

from fqtrun.build import DEFAULT_HOOKS
from fqtrun.errors import TrainingError
from fqtrun.runs.train import run_training
from fqtrun.training.checkpoint import load_checkpoint
from fqtrun.training.hooks import Hook, HookSpec

AT = 7  # the poisoned step (1-based, as metrics.jsonl counts); checkpoints after steps 4 and 8
RUN = ["trainer.max_steps=8", "trainer.eval_every=4", "logger.log_every=2", "batch_size=100",
       "+quant=per_sample", "bits=8"]
MODELS = {"linear": (["model=mlp"], "net.3"), "conv": (["model.channels=32"], "features.2")}
SLOT = {"input": "a", "weight": "w", "dY": "dx"}


class Poison(Hook):
    """Writes `value` into one element of a layer's input, dY or weight during step `at` only (a weight
    stays poisoned when `restore` is false)."""

    def __init__(self, layer: torch.nn.Module, where: str, value: float, at: int = AT, restore: bool = True):
        self.layer, self.where, self.value, self.on = layer, where, value, False
        self.at, self.restore = at, restore
        self.saved = None
        layer.register_forward_pre_hook(self.input_hook)
        layer.register_forward_hook(self.grad_hook)

    def bad(self, t: torch.Tensor) -> torch.Tensor:
        t = t.detach().clone()
        t.view(-1)[0] = self.value
        return t

    def input_hook(self, module, args):
        return (self.bad(args[0]),) if self.on and self.where == "input" else None

    def grad_hook(self, module, args, out):
        if self.on and self.where == "dY" and out.requires_grad:
            out.register_hook(self.bad)

    def before_step(self, step: int) -> None:
        self.on = step + 1 == self.at
        if self.on and self.where == "weight":
            self.saved = self.layer.weight.detach().clone() if self.restore else None
            with torch.no_grad():
                self.layer.weight.view(-1)[0] = self.value

    def after_step(self, step: int, batch: dict) -> dict:
        if self.saved is not None:  # skipped: the weight is put back, the run goes on
            with torch.no_grad():
                self.layer.weight.copy_(self.saved)
            self.saved = None
        self.on = False
        return {}


def poison_specs(name: str, where: str, value: float, **kw) -> tuple[HookSpec, ...]:
    return (*DEFAULT_HOOKS, HookSpec("poison", None, lambda node, facts: Poison(
        facts.model.get_submodule(name), where, value, **kw)))


def records(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("where,value,model,backend", [
    ("input", float("nan"), "linear", "int8"), ("dY", float("nan"), "conv", "int8"),
    ("weight", float("inf"), "conv", "simulate")])
def test_stop_names_step_layer_slot_and_checkpoint_and_keeps_what_was_written(compose_train, tmp_path, model,
                                                                              backend, where, value):
    overrides, name = MODELS[model]
    cfg = compose_train(*RUN, *overrides, f"quant.backend={backend}")
    with pytest.raises(TrainingError) as err:
        run_training(cfg, tmp_path, hook_specs=poison_specs(name, where, value))
    line = str(err.value)
    assert "\n" not in line
    assert f"of layer {name}, slot {SLOT[where]} at step {AT} " in line
    assert f"last good checkpoint: {tmp_path / 'last.pt'};" in line
    assert load_checkpoint(tmp_path / "last.pt")["train_state"]["step"] == 4
    assert [(r["split"], r["step"]) for r in records(tmp_path)] == [("train", 2), ("train", 4), ("test", 4),
                                                                    ("train", 6)]


@pytest.mark.parametrize("where,value,model,backend", [
    ("input", float("inf"), "conv", "simulate"), ("dY", float("nan"), "linear", "simulate"),
    ("weight", float("nan"), "linear", "int8")])
def test_skip_skips_and_counts_the_step(compose_train, tmp_path, model, backend, where, value):
    overrides, name = MODELS[model]
    cfg = compose_train(*RUN, *overrides, f"quant.backend={backend}", "nan_policy=skip",
                        f"numerics.every={AT}")
    summary = run_training(cfg, tmp_path, hook_specs=poison_specs(name, where, value))
    assert summary["skipped_steps"] == 1 and summary["steps"] == 8
    assert all(torch.isfinite(v).all() for v in load_checkpoint(tmp_path / "last.pt")["model"].values()
               if v.is_floating_point())
    # the probe of the skipped step counted the non-finite values where the quantizer refused them
    skipped = next(r for r in records(tmp_path) if r.get("numerics/step") == AT)
    assert skipped[f"numerics/{name}/{SLOT[where]}/nonfinite"] == 1


def test_evaluation_meeting_nan_stops_under_either_policy(compose_train, tmp_path):
    """Weights left non-finite (no step to skip): the evaluation after step 4 stops the run, naming it."""
    cfg = compose_train(*RUN, "nan_policy=skip")
    with pytest.raises(TrainingError, match=r"in the weights of layer features.2, slot w while evaluating "
                                            r"after step 4; last good checkpoint: none written yet"):
        run_training(cfg, tmp_path, hook_specs=poison_specs("features.2", "weight", float("nan"), at=3,
                                                            restore=False))
