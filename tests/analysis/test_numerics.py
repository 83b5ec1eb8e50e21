"""The numerics-health probe (fqtrun/analysis/numerics.py): what it logs, when, and that it changes nothing.

Oracles: quant.health.measure applied by hand to the tensors the layer really quantized (captured with
module hooks; the gradient quantizer re-run with the layer's own seed); the same run without the probe
(every record and weight equal, bit for bit).
"""

from __future__ import annotations

import json
from collections import OrderedDict

import pytest
import torch
from torch import nn

from conftest import TINY
from fqtrun.analysis.numerics import NumericsProbe, metric_key
from fqtrun.errors import ConfigError
from fqtrun.quant.backends import apply_backend
from fqtrun.quant.convert import convert, quant_layers
from fqtrun.quant.health import STATS, measure, severity, stats
from fqtrun.quant.layers import NoiseContext
from fqtrun.quant.recipe import QuantConfig, slot_factory
from fqtrun.runs.train import run_training
from fqtrun.training.checkpoint import load_checkpoint


def model(backend: str) -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(OrderedDict(fc1=nn.Linear(48, 64), act=nn.ReLU(), fc2=nn.Linear(64, 10)))
    convert(m, slot_factory(QuantConfig(grad="per_sample", bits_w=4, bits_a=4, bits_dx=4, bits_dw=3)),
            NoiseContext(seed=5))
    apply_backend(m, backend)
    return m


@pytest.mark.parametrize("backend", ["simulate", "int8"])
def test_probe_step_measures_what_each_slot_quantized(backend):
    m = model(backend)
    probe = NumericsProbe(list(quant_layers(m)), every=2, log_every=1)
    seen = {}
    m.fc2.register_forward_pre_hook(lambda mod, args: seen.update(a=args[0].detach().clone()))
    m.fc2.register_full_backward_hook(lambda mod, gin, gout: seen.update(dy=gout[0].detach().clone()))
    x = torch.randn(16, 48, generator=torch.Generator().manual_seed(1))

    def step(n: int) -> dict:
        probe.before_step(n - 1)
        m(x).square().sum().backward()
        return probe.after_step(n, {})

    assert step(1) == {} and not m.fc2.record.probe and not m.fc2.record.health  # off steps pay nothing
    out = step(2)
    slots = m.fc2.slots
    expect = {"w": (m.fc2.weight, slots["w"](m.fc2.weight), slots["w"]),
              "a": (seen["a"], slots["a"](seen["a"]), slots["a"])}
    for s in ("dx", "dw"):
        expect[s] = (seen["dy"], slots[s](seen["dy"], m.fc2.grad_seed(s)), slots[s])
    for s, (t, t_hat, q) in expect.items():
        want = stats(measure(t, t_hat, q), q.bits)
        got = {k: out[metric_key("fc2", s, k)] for k in STATS}
        assert got == pytest.approx(want, rel=1e-9), s
    assert out["numerics/step"] == 2 and out[metric_key("fc2", "dw", "bits")] == 3
    assert not any(layer.record.probe for _, layer in quant_layers(m))  # read, then switched off
    summary = probe.summary()
    assert summary["numerics_step"] == 2 and summary["numerics"] == sorted(summary["numerics"], key=severity)
    # x needs no gradient: fc1 runs no dx GEMM
    assert {(r["layer"], r["slot"]) for r in summary["numerics"]} == {
        ("fc1", "w"), ("fc1", "a"), ("fc1", "dw"), ("fc2", "w"), ("fc2", "a"), ("fc2", "dx"), ("fc2", "dw")}


def records(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_run_logs_probes_held_to_the_next_record_and_is_otherwise_unchanged(compose_train, tmp_path):
    base = [*TINY, "+quant=per_sample", "bits=4", "trainer.max_steps=9", "logger.log_every=2"]
    plain = run_training(compose_train(*base), tmp_path / "plain")
    probed = run_training(compose_train(*base, "numerics.every=3"), tmp_path / "probed")
    recs = records(tmp_path / "probed")
    strip = [{k: v for k, v in r.items() if not k.startswith("numerics/") and "time" not in k} for r in recs]
    assert strip == [{k: v for k, v in r.items() if "time" not in k} for r in records(tmp_path / "plain")]
    a, b = (load_checkpoint(tmp_path / run / "last.pt")["model"] for run in ("plain", "probed"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # probes at steps 3, 6, 9; train records at 2, 4, 6, 8: step 3's probe rides on 4, step 6's on 6
    held = {r["step"]: r.get("numerics/step") for r in recs if r["split"] == "train"}
    assert held == {2: None, 4: 3, 6: 6, 8: None}
    assert recs[1][metric_key("features.0", "dw", "bits")] == 4
    assert metric_key("features.0", "dx", "bits") not in recs[1]  # the first layer computes no input gradient
    assert probed["numerics_step"] == 9 and len(probed["numerics"]) == 3 * 4 + 3
    assert "numerics" not in plain


@pytest.mark.parametrize("overrides,match", [
    (["+quant=qat", "numerics.every=-1"], "numerics.every=-1 must be >= 0"),
    (["numerics.every=10"], "numerics.every=10 measures quantizers but the run has none"),
])
def test_bad_settings(compose_train, tmp_path, overrides, match):
    with pytest.raises(ConfigError, match=match):
        run_training(compose_train(*TINY, *overrides), tmp_path)
