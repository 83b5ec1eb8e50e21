"""The variance study with number formats: a recipe (or its slot settings) as a quantizer, measured on the
per-GEMM path against a slow reference, beside the integer quantizers whose figures it leaves unchanged:
SR vs RHT + SR vs BHQ vs PSQ at 4 bits in one table."""

from __future__ import annotations

import copy
import json

import pytest
from test_variance import SMALL, batches_of, compose_variance, qat_model, tiny_mlp
from torch import nn

from fqtrun.analysis.variance import fqt_slots, measure_variance
from fqtrun.commands.variance import variance as run_variance
from fqtrun.errors import ConfigError
from fqtrun.quant.backends import Simulate
from fqtrun.quant.convert import convert, quant_layers
from fqtrun.quant.formats import FORMATS
from fqtrun.quant.formats.quantizer import FormatQuantizer
from fqtrun.quant.layers import NoiseContext
from fqtrun.quant.recipe import QuantConfig, slot_factory
from fqtrun.quant.transforms import RandomHadamard


def mxfp4_slots(transform):
    return lambda slot, layer: FormatQuantizer(FORMATS["mxfp4"], "stochastic", transform, dim=int(slot == "dx"))


def test_format_setup_matches_a_slow_reference_and_leaves_integer_figures_as_they_were():
    model = tiny_mlp()
    batches = batches_of((10,), 3, 16)
    qat_model(model)
    plain = measure_variance(copy.deepcopy(model), batches, {"psq": fqt_slots("per_sample", 4)}, k=3)
    setups = {"psq": fqt_slots("per_sample", 4), "rht": mxfp4_slots(RandomHadamard(16))}
    res = measure_variance(model, batches, setups, k=3)
    assert res.quant["psq"] == plain.quant["psq"] and res.sampling == plain.sampling  # the same passes
    # slow reference: a separate model with the format slots, a fresh forward + backward per pass, against
    # the QAT gradient of the same per-GEMM path
    fqt = tiny_mlp()
    noise = NoiseContext(seed=0)
    convert(fqt, slot_factory(QuantConfig(grad=None, bits_w=8, bits_a=8, bits_dx=8, bits_dw=8)), noise)
    for _, layer in quant_layers(fqt):
        layer.backend = Simulate(per_gemm=True)

    def grads(x, y):
        fqt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(fqt(x), y).backward()
        return [p.grad.double().clone() for p in fqt.parameters()]

    total = 0.0
    for b, (x, y) in enumerate(batches):
        for _, layer in quant_layers(fqt):
            layer.slots.update(dx=None, dw=None)
        g_qat = grads(x, y)
        for _, layer in quant_layers(fqt):
            layer.slots.update(dx=mxfp4_slots(RandomHadamard(16))("dx", layer),
                               dw=mxfp4_slots(RandomHadamard(16))("dw", layer))
        for j in range(3):
            noise.draw = 1 + b * 3 + j
            total += sum(float(((g - q) ** 2).sum()) for g, q in zip(grads(x, y), g_qat)) / 9
    assert res.quant["rht"] == pytest.approx(total, rel=1e-5) and total > 0


def test_recipes_and_slot_settings_sit_beside_the_integer_quantizers(tmp_path, capsys):
    quantizers = 'variance.quantizers=[psq,householder,mxfp4_sr,mxfp4_rht_sr,nvfp4,"nvfp4:grad_transform_dw=none"]'
    data = run_variance(compose_variance(*SMALL[:-2], quantizers, "variance.bits=[4]", "model.channels=4"), tmp_path)
    q = json.loads((tmp_path / "variance.json").read_text())["quantization"]
    assert q == json.loads(json.dumps(data["quantization"]))
    assert set(q) == {"per_sample", "householder", "mxfp4_sr", "mxfp4_rht_sr", "nvfp4", "nvfp4:grad_transform_dw=none"}
    assert all(set(v) == {"4"} and v["4"]["total"] > 0 for v in q.values())
    assert q["nvfp4"]["4"]["total"] != q["nvfp4:grad_transform_dw=none"]["4"]["total"]
    assert "mxfp4_rht_sr" in capsys.readouterr().out


def test_a_format_column_of_its_own_bits(tmp_path):
    data = run_variance(compose_variance(*SMALL[:-2], "variance.quantizers=[psq,mxfp8]", "variance.bits=[2,4]",
                                         "model.channels=4"), tmp_path)
    assert set(data["quantization"]["per_sample"]) == {"2", "4"} and set(data["quantization"]["mxfp8"]) == {"8"}
    rows = (tmp_path / "variance.csv").read_text().splitlines()
    assert sum(r.startswith("quantization,mxfp8,8,") for r in rows) == 5


def test_a_recipe_entry_is_measured_at_each_studied_bits(tmp_path):
    """"per_sample:grad_grid=..." is measured at every variance.bits like the plain quantizer (PSQ's two grids
    side by side); with the default grid it is the plain per_sample measurement exactly; `:bits=` pins one
    column; dW follows the study's protocol (variance.dw_bits) unless the entry sets it."""
    quantizers = ('variance.quantizers=[per_sample,"per_sample:grad_grid=minmax","per_sample:grad_grid=zero_aligned",'
                  '"per_sample:bits=6"]')
    data = run_variance(compose_variance(*SMALL[:-2], quantizers, "variance.bits=[3,4]", "variance.dw_bits=8",
                                         "model.channels=4"), tmp_path)
    q = data["quantization"]
    assert set(q["per_sample:grad_grid=zero_aligned"]) == {"3", "4"} and set(q["per_sample:bits=6"]) == {"6"}
    assert q["per_sample:grad_grid=minmax"] == q["per_sample"]  # the same slots, noise and protocol
    assert q["per_sample:grad_grid=zero_aligned"]["4"]["total"] != q["per_sample"]["4"]["total"]


def test_a_recipe_entry_setting_that_does_not_exist_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"entry 'per_sample:grid=zero_aligned'.*quant.grid is not a setting.*did you mean quant.grad_grid"):
        run_variance(compose_variance(*SMALL[:-2], 'variance.quantizers=["per_sample:grid=zero_aligned"]',
                                      "model.channels=4"), tmp_path)
