"""Precision schedules, eval precision and BitOPs wired into real (tiny) training runs.

Every expectation comes from outside the code under test: the bits are read back from the
quantized layers (not the schedule), the cyclic reference is the spec's formula evaluated here
with its own half-even tie handling, and the MACs come from torch's FlopCounterMode.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from torch.utils.flop_counter import FlopCounterMode

import fqtrun.commands.train as train_cmd
from conftest import CONF, TINY
from fqtrun.build import DEFAULT_HOOKS, assemble, build_model
from fqtrun.errors import CheckpointError, ConfigError
from fqtrun.precision.config import SCHEMAS
from fqtrun.precision.hooks import FULL_PRECISION_BITS, bitops_hook, build_plan, schedule_hook
from fqtrun.precision.trace_plot import read_bit_trace
from fqtrun.quant.convert import quant_layers
from fqtrun.runs.train import run_training
from fqtrun.training.hooks import Hook, HookSpec

STEPS, CYCLES, LO, HI, EVAL = 40, 4, 3, 8, 6  # TINY: 2 epochs x 20 steps of 200 samples
CYCLIC = ["+quant=per_sample", "schedule=cyclic", f"schedule.cycles={CYCLES}", f"schedule.min_bits={LO}",
          f"schedule.max_bits={HI}", f"schedule.eval_bits={EVAL}", "logger.log_every=1"]


def spec_cyclic(t: int, lo: int, hi: int, period: int) -> int:
    """spec/cpt.md: round_half_even(lo + 0.5 (hi - lo)(1 - cos(pi u))), u = (t mod T) / T."""
    v = lo + 0.5 * (hi - lo) * (1 - math.cos(math.pi * (t % period) / period))
    floor = math.floor(v)
    if abs(v - floor - 0.5) < 1e-9:  # a tie in exact arithmetic, blurred by float error
        return floor if floor % 2 == 0 else floor + 1
    return round(v)


class Recorder(Hook):
    """Reads back, from every quantized layer, the bits it used in each step and in evaluation."""

    def __init__(self, model):
        self.model, self.steps, self.evals = model, {}, []

    def _read(self) -> dict:
        return {name: layer.used_bits() for name, layer in quant_layers(self.model)}

    def after_step(self, step: int, batch: dict) -> dict:
        self.steps[step - 1] = self._read()  # after_step gets the 1-based count; bits_at takes 0-based
        return {}

    def after_eval(self) -> None:
        self.evals.append(self._read())


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def compose_cfg(cache: Path, *overrides: str):
    base = ["logger.wandb.mode=disabled", "logger.progress=none", f"dataset.cache_dir={cache}"]
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name="train", overrides=base + list(overrides))


@pytest.fixture(scope="module")
def cyclic_run(tmp_path_factory, data_cache):
    """One real cyclic run with a Recorder hook appended: (summary, run folder, recorder)."""
    out = tmp_path_factory.mktemp("cyclic")
    recorders = []

    def recorder(node, facts):
        recorders.append(Recorder(facts.model))
        return recorders[-1]

    specs = (*DEFAULT_HOOKS, HookSpec("recorder", None, recorder))  # the registry, extended: no monkeypatch
    summary = run_training(compose_cfg(data_cache, *TINY, *CYCLIC), out, hook_specs=specs)
    return summary, out, recorders[0]


def test_layers_use_the_schedules_bits_every_step(cyclic_run):
    summary, out, rec = cyclic_run
    period = STEPS // CYCLES
    assert summary["steps"] == STEPS and sorted(rec.steps) == list(range(STEPS))
    expected = [spec_cyclic(t, LO, HI, period) for t in range(STEPS)]
    assert expected[5] == 6  # u = 1/2: 5.5 is a tie, rounded half to even
    for t, layers in rec.steps.items():
        assert len(layers) == 4
        for used in layers.values():
            assert (used["w"], used["a"]) == (expected[t], expected[t])
            assert used["dw"] == 8 and used["dx"] in (8, None)  # gradients keep quant.bits_dx/bits_dw
        assert [u["dx"] for u in layers.values()] == [None, 8, 8, 8]  # layer 1 needs no input gradient
    train = [r for r in records(out) if r["split"] == "train"]  # the BitsProbe's record agrees
    assert [r["bits_w"] for r in train] == [r["bits_a"] for r in train] == expected


def test_evaluation_runs_at_eval_bits(cyclic_run):
    summary, _, rec = cyclic_run
    assert len(rec.evals) == 2 and summary["eval_bits"] == EVAL
    for layers in rec.evals:
        assert all((u["w"], u["a"]) == (EVAL, EVAL) for u in layers.values())


def test_summary_gbitops_matches_macs_and_schedule(cyclic_run, data_cache):
    summary, out, _ = cyclic_run
    cfg = compose_cfg(data_cache, *TINY)
    bundle = instantiate(cfg.dataset)
    model = build_model(cfg.model, bundle)
    x = torch.stack([bundle.train[i][0] for i in range(200)])
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    macs = counter.get_total_flops() / 2 / 200  # per sample; one MAC = 2 flops
    assert summary["macs_per_sample"] == macs
    g = 8
    costs = [spec_cyclic(t, LO, HI, STEPS // CYCLES) for t in range(STEPS)]
    costs = [q * q + 2 * q * g for q in costs]  # b_w b_a + b_w b_g + b_a b_g with b_w = b_a = q
    assert summary["gbitops"] == pytest.approx(macs * 200 * sum(costs) / 1e9, rel=1e-12)
    assert summary["bitops_savings"] == pytest.approx(1 - sum(costs) / (STEPS * (HI * HI + 2 * HI * g)), rel=1e-12)
    last = [r for r in records(out) if r["split"] == "train"][-1]
    assert last["cost/gbitops"] == summary["gbitops"]


def test_full_precision_operands_count_32_bits(compose_train):
    # QAT keeps dY in fp32 (b_g = 32); quant.keep_last leaves the head fully fp32.
    cfg = compose_train(*TINY, "+quant=qat", "bits=4", "quant.keep_last=true")
    run = assemble(cfg, torch.device("cpu"), cfg.seed, hook_specs=())
    counter, model = bitops_hook(cfg.schedule, run.facts), run.model
    x, y = run.bundle.train[:200]
    torch.nn.functional.cross_entropy(model(x), y).backward()
    fp = FULL_PRECISION_BITS
    per_sample = {"features.0": 2375, "features.2": 18750, "features.4": 9375, "head": 1250}  # by hand, L=40
    assert counter.after_step(1, {})["cost/gbitops"] == pytest.approx(
        200 * (sum(v for k, v in per_sample.items() if k != "head") * (16 + 2 * 4 * fp)
               + per_sample["head"] * 3 * fp * fp) / 1e9, rel=1e-12)
    assert counter.summary()["bitops_savings"] == 0.0  # static: the run is its own reference


def test_static_default_leaves_per_slot_bits_alone(compose_train, tmp_path):
    cfg = compose_train(*TINY, "epochs=1", "+quant=per_sample", "quant.bits_w=4", "quant.bits_a=6")
    assert cfg.schedule._target_.endswith("Static") and cfg.schedule.bits is None
    summary = run_training(cfg, tmp_path)
    train = [r for r in records(tmp_path) if r["split"] == "train"]
    assert {(r["bits_w"], r["bits_a"], r["bits_dx"], r["bits_dw"]) for r in train} == {(4, 6, 8, 8)}
    assert "schedule" not in summary and summary["bitops_savings"] == 0.0


def test_explicit_static_bits_and_gradient_schedule(compose_train):
    cfg = compose_train(*TINY, "+quant=per_sample", "quant.bits_w=4", "schedule.bits=5",
                        "schedule.grad_min_bits=6")
    run = assemble(cfg, torch.device("cpu"), cfg.seed, hook_specs=())
    hook = schedule_hook(cfg.schedule, run.facts)
    hook.before_step(0)
    for _, layer in quant_layers(run.model):
        assert [layer.slots[s].bits for s in ("w", "a", "dx", "dw")] == [5, 5, 6, 6]
    # a cycling gradient follows the forward's shape between its own bounds
    plan = build_plan(compose_train(*TINY, "+quant=per_sample", "schedule=cyclic", "schedule.cycles=1",
                                    "schedule.grad_min_bits=4", "schedule.grad_max_bits=8").schedule, STEPS)
    assert [plan.grad.bits_at(t) for t in range(STEPS)] == [spec_cyclic(t, 4, 8, STEPS) for t in range(STEPS)]


def test_resume_of_a_cyclic_run_reproduces_it(compose_train, tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    overrides = ["epochs=2", "batch_size=200", "checkpoint.keep_all=true", *CYCLIC]
    a = run_training(compose_train(*overrides), full)
    shutil.copytree(full, cut)
    shutil.copy(cut / "epoch_0001.pt", cut / "last.pt")  # as if the run had died after epoch 1
    (cut / "summary.json").unlink()
    b = run_training(compose_train(*overrides, "resume=true"), cut)
    strip = [{k: v for k, v in r.items() if "time" not in k} for r in records(full)]
    assert [{k: v for k, v in r.items() if "time" not in k} for r in records(cut)] == strip
    assert a["gbitops"] == b["gbitops"] and a["bitops_savings"] == b["bitops_savings"]
    with pytest.raises(CheckpointError, match="schedule"):  # another schedule cannot continue this run
        run_training(compose_train(*overrides, "schedule.min_bits=4", "resume=true"), cut)


def test_schedule_needs_quantizers(compose_train, tmp_path):
    with pytest.raises(ConfigError, match=r"\+quant=") as e:
        run_training(compose_train(*TINY, "schedule=cyclic"), tmp_path)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="quant=per_sample"):  # QAT has no gradient quantizers to drive
        run_training(compose_train(*TINY, "+quant=qat", "schedule.grad_min_bits=6"), tmp_path)


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_every_schedule_option_composes_and_builds(compose_train, name):
    cfg = compose_train(*TINY, "+quant=per_sample", f"schedule={name}")
    plan = build_plan(cfg.schedule, STEPS)
    assert plan.kind == name
    if name != "static":
        bits = [plan.forward.bits_at(t) for t in range(STEPS)]
        assert min(bits) >= plan.forward.min_bits and max(bits) <= plan.forward.max_bits
        assert plan.eval_bits == plan.forward.max_bits  # the stated default


def test_misspelt_schedule_key_fails_at_composition(compose_train):
    with pytest.raises(Exception, match="cycle"):
        compose_train("schedule=cyclic", "schedule.cycle=3")


def test_cli_run_writes_bit_trace_and_costs(tmp_path, data_cache, monkeypatch):
    # The real Hydra entry point, in-process (a subprocess would spend its time importing torch).
    argv = ["fqtrun train", "+quant=per_sample", "schedule=cyclic", "schedule.cycles=2", "epochs=1",
            "batch_size=200", "logger.log_every=1", "logger.wandb.mode=disabled", "logger.progress=none",
            f"dataset.cache_dir={data_cache}", f"hydra.run.dir={tmp_path}"]
    monkeypatch.setattr(sys, "argv", argv)
    train_cmd.main()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["bit_trace"] == str(tmp_path / "bit_trace.png")
    assert (tmp_path / "bit_trace.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert summary["gbitops"] > 0 and 0 < summary["bitops_savings"] < 1
    assert read_bit_trace(tmp_path / "metrics.jsonl")["w"][1] == [spec_cyclic(t, 3, 8, 10) for t in range(20)]
