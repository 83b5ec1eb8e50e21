"""Format settings of the quant recipe: what each named recipe builds per slot, the layer-selection knobs,
and one-line refusals of settings that cannot apply or would do nothing."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate
from torch import nn

from fqtrun.build import build_recipe, quantize_model
from fqtrun.errors import ConfigError
from fqtrun.models.transformer import Transformer
from fqtrun.quant.formats.quantizer import FormatQuantizer
from fqtrun.quant.gradient import PerColumn, PerSample
from fqtrun.quant.layers import NoiseContext
from fqtrun.quant.quantizers import MinMaxQuantizer
from fqtrun.quant.recipe import QuantConfig, recipe_label, slot_factory
from fqtrun.quant.recipe import build_recipe as recipe_of


def slots_of(compose_train, *overrides):
    recipe = build_recipe(compose_train(*overrides).quant)
    make = slot_factory(recipe)
    return {s: make(s, nn.Linear(4, 4)) for s in ("w", "a", "dx", "dw")}


def describe(q):
    if q is None:
        return None
    if isinstance(q, FormatQuantizer):
        t = q.transform
        return (q.name, q.rounding, q.dim, None if t is None else (t.block, t.signs))
    return type(q).__name__


RECIPES = {
    "fp8_tensorwise": {"w": ("fp8_e4m3", "nearest", 1, None), "a": ("fp8_e4m3", "nearest", 1, None),
                       "dx": ("fp8_e5m2", "nearest", 1, None), "dw": ("fp8_e5m2", "nearest", 0, None)},
    "fp8_rowwise": {s: ("fp8_e4m3_row", "nearest", d, None) for s, d in (("w", 1), ("a", 1), ("dx", 1), ("dw", 0))},
    "deepseek_fp8": {"w": ("fp8_e4m3_b128+2d", "nearest", 1, None), "a": ("fp8_e4m3_b128", "nearest", 1, None),
                     "dx": ("fp8_e4m3_b128", "nearest", 1, None), "dw": ("fp8_e4m3_b128", "nearest", 0, None)},
    "mxfp8": {s: ("mxfp8_e4m3+rceil", "nearest", d, None) for s, d in (("w", 1), ("a", 1), ("dx", 1), ("dw", 0))},
    "mxfp6": {"w": ("mxfp6_e2m3", "nearest", 1, None), "a": ("mxfp6_e2m3", "nearest", 1, None),
              "dx": ("mxfp6_e3m2", "nearest", 1, None), "dw": ("mxfp6_e3m2", "nearest", 0, None)},
    "mxfp4": {s: ("mxfp4", "nearest", d, None) for s, d in (("w", 1), ("a", 1), ("dx", 1), ("dw", 0))},
    "mxfp4_sr": {"w": ("mxfp4", "nearest", 1, None), "a": ("mxfp4", "nearest", 1, None),
                 "dx": ("mxfp4", "stochastic", 1, None), "dw": ("mxfp4", "stochastic", 0, None)},
    "mxfp4_rht_sr": {"w": ("mxfp4", "nearest", 1, None), "a": ("mxfp4", "nearest", 1, None),
                     "dx": ("mxfp4", "stochastic", 1, (32, "step")), "dw": ("mxfp4", "stochastic", 0, (32, "step"))},
    "nvfp4": {"w": ("nvfp4+2d", "nearest", 1, None), "a": ("nvfp4", "nearest", 1, None),
              "dx": ("nvfp4", "stochastic", 1, None), "dw": ("nvfp4", "stochastic", 0, (16, "step"))},
}


@pytest.mark.parametrize("name", list(RECIPES))
def test_each_named_recipe_builds_its_slots(compose_train, name):
    got = {s: describe(q) for s, q in slots_of(compose_train, f"+quant={name}").items()}
    assert got == RECIPES[name]


def test_a_slot_takes_its_own_format_beside_integer_slots(compose_train):
    got = slots_of(compose_train, "+quant=per_sample", "bits=4", "quant.format_dw=mxfp4", "quant.grad_transform_dw=rht")
    assert isinstance(got["w"], MinMaxQuantizer) and isinstance(got["dx"], PerSample) and got["dx"].bits == 4
    assert describe(got["dw"]) == ("mxfp4", "stochastic", 0, (16, "step"))
    got = slots_of(compose_train, "+quant=mxfp4", "quant.format_dx=fp32", "quant.format_dw=int", "quant.grad=null",
                   "quant.grad_rounding=stochastic")  # the recipe's nearest would apply to no slot: refused
    assert got["dx"] is None and got["dw"] is None  # int with no gradient quantizer: QAT
    got = slots_of(compose_train, "+quant=nvfp4", "quant.grad_transform_dw=none", "quant.grad_rounding=nearest",
                   "quant.rht_signs=fixed")
    assert describe(got["dw"]) == ("nvfp4", "nearest", 0, None)
    got = slots_of(compose_train, "+quant=mxfp4_rht_sr", "quant.grad_transform_dx=none", "quant.rht_signs=fixed")
    assert describe(got["dx"])[3] is None and describe(got["dw"])[3] == (32, "fixed")
    assert isinstance(slots_of(compose_train, "+quant=per_sample")["dw"], PerColumn)


@pytest.mark.parametrize("overrides,match", [
    (["quant.format=mxfp5"], "quant.format='mxfp5' is unknown: use int, fp32 or one of"),
    (["quant.format_dw=nvfp5"], "quant.format_dw='nvfp5' is unknown"),
    (["quant.scale_rule=ceil", "quant.format=mxfp4"], "quant.scale_rule='ceil' is unknown"),
    (["quant.scale_rule=rceil", "quant.format=nvfp4"], "applies to MX formats, and no slot uses one"),
    (["quant.weight_blocks_2d=true"], "needs a block-scaled quant.format_w"),
    (["quant.weight_blocks_2d=true", "quant.format=fp8_e4m3"], "2-D blocks apply to block-scaled formats"),
    (["quant.rounding_w=stochastic"], "quant.rounding_w=stochastic needs a float quant.format_w"),
    (["quant.grad_rounding=nearest", "quant.grad=per_sample"], "quant.grad_rounding=nearest needs a float"),
    (["quant.rounding_dw=nearest", "quant.format_dx=mxfp4"], "quant.rounding_dw=nearest needs a float quant.format_dw"),
    (["quant.rounding_dx=often", "quant.format=mxfp4"], "quant.rounding_dx='often' is unknown"),
    (["quant.grad_transform=rht", "quant.grad=per_sample"], "quant.grad_transform=rht needs a float"),
    (["quant.grad_transform_dw=rht", "quant.format_dx=mxfp4"], "quant.grad_transform_dw=rht needs a float"),
    (["quant.grad_transform=dct", "quant.format=mxfp4"], "quant.grad_transform='dct' is unknown"),
    (["quant.format=mxfp4", "quant.grad_transform=rht", "quant.rht_block=24"], "quant.rht_block=24"),
    (["quant.format=mxfp4", "quant.grad=per_sample"], "quant.grad=per_sample picks the integer dx quantizer"),
    (["quant.format=mxfp4", "quant.weight_granularity=channel"], "quant.weight_granularity=channel"),
    (["quant.format=mxfp4", "quant.dequant=ridge"], "quant.dequant=ridge fits integer grids only"),
    (["quant.keep_last_blocks=-1"], "quant.keep_last_blocks=-1 must be >= 0"),
    (["quant.format=nvfp4", "quant.compile=true"], "quant.compile=true fuses the integer quantizers"),
    (["quant.format=mxfp8_e4m3", "quant.backend=int8"], "quant.backend=int8 runs integer grids only"),
])
def test_bad_format_settings_refuse_in_one_line(compose_train, overrides, match):
    with pytest.raises(ConfigError, match=match) as err:
        build_recipe(compose_train("+quant=qat", *overrides).quant)
    assert "\n" not in str(err.value)


def test_a_schedule_cannot_set_the_bits_of_a_format_slot():
    q = slot_factory(recipe_of(format="mxfp4", bits_w=8, bits_a=8, bits_dx=8, bits_dw=8))("w", nn.Linear(2, 2))
    q.bits = 4  # its own bits: fine
    with pytest.raises(ValueError, match="quant.format_w=mxfp4 has 4-bit elements"):
        q.bits = 3


def test_keep_first_and_last_blocks(compose_train):
    torch.manual_seed(0)
    model = Transformer(10, (40,), dim=32, depth=3, heads=2)
    recipe = build_recipe(compose_train("+quant=mxfp4", "quant.keep_first_blocks=1", "quant.keep_last_blocks=1").quant)
    report = quantize_model(recipe, False, model, NoiseContext())
    assert report.converted == ["embed", *(f"blocks.1.{n}" for n in ("attn.q", "attn.k", "attn.v", "attn.out",
                                                                      "fc1", "fc2")), "head"]
    assert report.kept["blocks.0.fc2"] == "first 1 block(s) (quant.keep_first_blocks)"
    assert report.kept["blocks.2.attn.q"] == "last 1 block(s) (quant.keep_last_blocks)"
    # a model without `blocks`: every quantizable layer is a block (here: the CNN's classifier)
    cnn = instantiate(compose_train("+quant=nvfp4").model, num_classes=10, input_shape=(40,))
    report = quantize_model(build_recipe(compose_train("+quant=nvfp4").quant), False, cnn, NoiseContext())
    assert list(report.kept) == ["head"] and len(report.converted) == 3


def test_grouped_convs_stay_full_precision_with_formats():
    model = nn.Sequential(nn.Conv1d(8, 8, 3, groups=2), nn.Conv1d(8, 8, 3))
    report = quantize_model(recipe_of(format="mxfp4", bits_w=8, bits_a=8, bits_dx=8, bits_dw=8), False, model,
                            NoiseContext())
    assert report.converted == ["1"] and "grouped conv" in report.kept["0"]
    assert QuantConfig().format == "int"  # the default: today's integer grids


@pytest.mark.parametrize("overrides, label", [
    (["+quant=nvfp4"], "nvfp4: w nvfp4 RTN, a nvfp4 RTN, dx nvfp4 SR / dw nvfp4 SR+RHT16"),
    (["+quant=fp8_tensorwise"], "fp8_tensorwise: w fp8_e4m3 RTN, a fp8_e4m3 RTN, dx fp8_e5m2 RTN / dw fp8_e5m2 RTN"),
    (["+quant=per_sample", "quant.format_dw=mxfp4", "quant.grad_transform_dw=rht"],
     "per_sample: w8 a8, per_sample dx8 / dw mxfp4 SR+RHT16"),
    (["+quant=householder", "bits=5"], "householder: w5 a5, householder dx5 / per_column dw5"),
    (["+quant=qat", "bits=4"], "qat: w4 a4, fp32 gradients (STE)"),
])
def test_summary_label_names_each_slots_format(compose_train, overrides, label):
    """summary.json's quant line says what each slot runs (a format recipe's gradients are not fp32)."""
    assert recipe_label(build_recipe(compose_train(*overrides).quant)) == label
