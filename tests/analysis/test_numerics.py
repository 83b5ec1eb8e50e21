"""The numerics-health probe (fqtrun/analysis/numerics.py): what it logs, when, and that it changes nothing.

Oracles: quant.health.measure applied by hand to the tensors the layer really quantized (captured with
module hooks; the gradient quantizer re-run with the layer's own seed); the same run without the probe
(every record and weight equal, bit for bit). For a number-format layer with RHT on its dW GEMM, the
outlier figures after the transform against an explicit Hadamard matrix and slow loops in float64, and
its SQNR against the error back in dY's own basis (the transform is orthogonal).
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict

import pytest
import torch
from torch import nn

from conftest import TINY
from fqtrun.analysis.numerics import NumericsProbe, metric_key
from fqtrun.errors import ConfigError
from fqtrun.quant.backends import apply_backend
from fqtrun.quant.backends.simulate import GEMM_IDS
from fqtrun.quant.convert import convert, quant_layers
from fqtrun.quant.formats import FORMATS
from fqtrun.quant.formats.quantizer import FormatQuantizer
from fqtrun.quant.health import STATS, measure, severity, stats
from fqtrun.quant.layers import NoiseContext
from fqtrun.quant.recipe import QuantConfig, slot_factory
from fqtrun.quant.transforms import RandomHadamard
from fqtrun.report.collect import load_run
from fqtrun.report.numerics import cells, columns, health_rows
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
        got = {k: out[metric_key("fc2", s, k)] for k in want}  # STATS, crest and kurtosis
        assert set(want) == {*STATS, "crest", "kurtosis"}
        assert got == pytest.approx(want, rel=1e-9), s
    assert out["numerics/step"] == 2 and out[metric_key("fc2", "dw", "bits")] == 3
    assert not any(layer.record.probe for _, layer in quant_layers(m))  # read, then switched off
    summary = probe.summary()
    assert summary["numerics_step"] == 2 and summary["numerics"] == sorted(summary["numerics"], key=severity)
    # x needs no gradient: fc1 runs no dx GEMM
    assert {(r["layer"], r["slot"]) for r in summary["numerics"]} == {
        ("fc1", "w"), ("fc1", "a"), ("fc1", "dw"), ("fc2", "w"), ("fc2", "a"), ("fc2", "dx"), ("fc2", "dw")}


def hadamard(g: int) -> list[list[float]]:
    """Sylvester's Hadamard matrix of order g, entry by entry: H[i][j] = (-1)^popcount(i & j)."""
    return [[(-1.0) ** bin(i & j).count("1") for j in range(g)] for i in range(g)]


def rht_by_matrix(dy: torch.Tensor, rht: RandomHadamard, key: int) -> list[list[float]]:
    """dY (N, C) transformed along its rows' dim 0 (tokens), written out: rows zero-padded to N' (a multiple
    of g), then every column v -> v R with R = blockdiag(H_g) diag(sigma) / sqrt(g), in float64."""
    g, n, c = rht.block, rht.padded(dy.shape[0]), dy.shape[1]
    rows = [[float(v) for v in r] for r in dy.double()] + [[0.0] * c for _ in range(n - dy.shape[0])]
    sigma = rht.sign_vector(n, key, "cpu").tolist()
    h = hadamard(g)
    out = [[0.0] * c for _ in range(n)]
    for j in range(c):
        for b in range(0, n, g):
            for k in range(g):  # (v R)_k = sum_i v_i H[i][k] sigma_k / sqrt(g) within the block
                out[b + k][j] = sum(rows[b + i][j] * h[i][k] for i in range(g)) * sigma[b + k] / math.sqrt(g)
    return out


def slow_figures(m: list[list[float]], block: int) -> dict:
    """crest, Pearson kurtosis and the mean crest of `block`-long runs down the columns, by loops."""
    flat = [v for r in m for v in r]
    n = len(flat)
    mean = sum(flat) / n
    var = sum((v - mean) ** 2 for v in flat) / n
    crests = []
    for j in range(len(m[0])):
        for b in range(0, len(m), block):
            v = [m[i][j] for i in range(b, min(b + block, len(m)))]
            ms = sum(t * t for t in v) / len(v)
            if ms > 0:
                crests.append(max(abs(t) for t in v) / math.sqrt(ms))
    return {"crest": max(abs(v) for v in flat) / math.sqrt(sum(v * v for v in flat) / n),
            "kurtosis": sum((v - mean) ** 4 for v in flat) / n / var**2,
            "crest_block": sum(crests) / len(crests)}


def test_rht_slot_reports_its_operand_before_and_after_the_transform():
    """NVFP4 with RHT (g = 16) on the dW GEMM and none on the dX GEMM, dY with one outlier token: the dw
    row holds dY's figures and dY R's (explicit Hadamard), the dx row dY's only; the probe changes nothing."""
    rht = RandomHadamard(16)
    slots = {"w": FormatQuantizer(FORMATS["nvfp4"].with_options(block_2d=True)),
             "a": FormatQuantizer(FORMATS["nvfp4"]), "dx": FormatQuantizer(FORMATS["nvfp4"], "stochastic"),
             "dw": FormatQuantizer(FORMATS["nvfp4"], "stochastic", rht, dim=0)}

    def run(probed: bool):
        torch.manual_seed(0)
        m = nn.Sequential(OrderedDict(fc=nn.Linear(32, 24)))
        convert(m, lambda slot, mod: slots.get(slot), NoiseContext(seed=5, step=2))
        probe = NumericsProbe(list(quant_layers(m)), every=1 if probed else 10**9, log_every=1)
        x = torch.randn(2, 19, 32, generator=torch.Generator().manual_seed(1), requires_grad=True)
        gy = torch.randn(2, 19, 24, generator=torch.Generator().manual_seed(2))
        gy[1, 4] *= 30  # an outlier token: dY's rows are tokens, the dW GEMM's reduction
        probe.before_step(0)
        m(x).backward(gy)
        return probe.after_step(1, {}), (x.grad, m.fc.weight.grad), m.fc, gy.reshape(38, 24)

    out, grads, layer, dy = run(True)
    _, plain, _, _ = run(False)
    assert all(torch.equal(a, b) for a, b in zip(grads, plain))  # observed, not changed
    key = layer.transform_key(GEMM_IDS["dw"], rht.fresh)
    after = slow_figures(rht_by_matrix(dy, rht, key), 16)
    before = slow_figures(dy.double().tolist(), 16)
    dw = {k: out[metric_key("fc", "dw", k)] for k in ("crest", "kurtosis", "crest_block")}
    assert dw == pytest.approx(before, rel=1e-6)  # the probe's passes run in float32 (eps 6e-8)
    rht_figures = {k: out[metric_key("fc", "dw", f"{k}_rht")] for k in after}
    assert rht_figures == pytest.approx(after, rel=1e-6)
    assert after["kurtosis"] < before["kurtosis"] / 4  # the outlier token spread over its block of 16
    # the dX GEMM reduces over out-features (dim 1): its blocks run along dY's rows, and no transform
    dx_blocks = slow_figures([list(c) for c in zip(*dy.double().tolist())], 16)["crest_block"]
    assert out[metric_key("fc", "dx", "crest_block")] == pytest.approx(dx_blocks, rel=1e-6)
    assert metric_key("fc", "dx", "crest_rht") not in out
    # SQNR of dY R and its quantization = SQNR of dY and R^T Q(dY R), back in dY's basis (R orthogonal; dY
    # zero-padded to 48 rows: the quantization's error lands on the padding too)
    back = rht.inverse(slots["dw"].fake(dy, 0, layer.grad_seed("dw"), rht, key), 0, key).double()
    padded = torch.cat([dy.double(), torch.zeros(10, 24, dtype=torch.float64)])
    sqnr = 10 * math.log10(padded.square().sum() / (padded - back).square().sum())
    assert out[metric_key("fc", "dw", "sqnr_db")] == pytest.approx(sqnr, abs=1e-3)


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


def test_a_format_run_logs_outliers_with_and_without_rht(compose_train, tmp_path):
    """+quant=nvfp4: RHT on the dW GEMM only; every probed slot has crest and kurtosis, the format's
    block figure, and the dw slots the figures after the transform; the weights are those of the run
    without the probe, bit for bit."""
    base = [*TINY, "+quant=nvfp4", "trainer.max_steps=4", "logger.log_every=2"]
    run, plain = tmp_path / "probed", tmp_path / "plain"
    run_training(compose_train(*base, "numerics.every=2"), run)
    run_training(compose_train(*base), plain)
    a, b = (load_checkpoint(p / "last.pt")["model"] for p in (run, plain))
    assert all(torch.equal(a[k], b[k]) for k in a)
    probes = [r for r in records(run) if "numerics/step" in r]
    assert [r["numerics/step"] for r in probes] == [2, 4]
    rec = probes[-1]
    layer = "features.2"
    for slot in ("w", "a", "dx", "dw"):
        for stat in ("crest", "kurtosis", "crest_block"):
            assert rec[metric_key(layer, slot, stat)] >= 1.0, (slot, stat)  # max >= RMS, E[z^4] >= E[z^2]^2
    for stat in ("crest_rht", "kurtosis_rht", "crest_block_rht"):
        assert rec[metric_key(layer, "dw", stat)] >= 1.0
        assert metric_key(layer, "dx", stat) not in rec
    # fqtrun report's table: three more columns, "before → after RHT" where the transform ran
    rows = {(r.stats["layer"], r.stats["slot"]): r for r in health_rows([("nvfp4", load_run(run))], 100)}
    assert columns(list(rows.values()))[-3:] == ["max/RMS", "block max/RMS", "kurtosis"]
    dw, dx = cells(rows[layer, "dw"], True), cells(rows[layer, "dx"], True)
    shown = [float(v) for v in dw[-3].split(" → ")]  # three significant figures
    assert shown == pytest.approx([rec[metric_key(layer, "dw", k)] for k in ("crest", "crest_rht")], rel=5e-3)
    assert float(dx[-3]) == pytest.approx(rec[metric_key(layer, "dx", "crest")], rel=5e-3)
    assert "→" not in "".join(dx)
