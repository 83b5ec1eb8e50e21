"""The quantization recipe: a typed config and the factory that builds each slot's quantizer.

One setting per operand of the three GEMMs (spec/fqt.md): forward weights (bits_w), forward
activations (bits_a), the input-gradient GEMM's dY (bits_dx, quantizer `grad`) and the
weight-gradient GEMM's dY (bits_dw, quantizer `grad_dw`). Every bits_* defaults to the
top-level `bits`. `grad=None` is QAT: straight-through, full-precision gradient GEMMs.
conf/quant/<recipe>.yaml fills a QuantConfig; `instantiate(cfg.quant)` calls `build_recipe`,
which returns the validated QuantConfig the run converts the model with.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from omegaconf import II
from torch import nn

from fqtrun.quant import backends
from fqtrun.quant.bits import check_bits
from fqtrun.quant.formats import FORMATS, SCALE_RULES, Format
from fqtrun.quant.formats.elements import ROUNDINGS
from fqtrun.quant.formats.quantizer import SLOT_DIMS, FormatQuantizer
from fqtrun.quant.gradient import GRAD_GRIDS, GRADIENT_QUANTIZERS, PerSample, make_gradient_quantizer
from fqtrun.quant.quantizers import RIDGE_FORMS, MinMaxQuantizer, RidgeQuantizer
from fqtrun.quant.transforms import RandomHadamard, make_transform

DW_QUANTIZERS = ("per_tensor", "per_column")
BACKENDS = backends.BACKENDS  # simulate | int8 | auto
SLOTS = backends.SLOTS


@dataclass
class QuantConfig:
    _target_: str = "fqtrun.quant.recipe.build_recipe"
    name: str = "qat"  # label shown in summaries and reports
    grad: Optional[str] = None  # None (QAT) | per_tensor | per_sample | householder (ptq, psq, bhq)
    grad_dw: str = "per_column"  # quantizer of dY in the weight-gradient GEMM
    # PSQ's row grid: minmax = each row's [min, max] (the spec's and the paper's); zero_aligned = widened to
    # hold 0 on a grid point (exact zeros stay exact, more variance); per_sample only
    grad_grid: str = "minmax"
    bits_w: int = II("bits")
    bits_a: int = II("bits")
    bits_dx: int = II("bits")
    bits_dw: int = II("bits")
    weight_granularity: str = "tensor"  # tensor | channel (per output channel)
    # simulate: fp32 GEMMs on dequantized values; int8: the three GEMMs as int8 GEMMs on the codes (CPU),
    # fp32 per GEMM where a slot cannot; auto: int8 for layers whose four slots all have <= 8 bits
    backend: str = "simulate"
    compile: bool = False  # fuse the quantizers with torch.compile (first use ~15-30 s, cached on disk)
    # keep the first / last quantizable layer (the last is usually the classifier) in full precision;
    # null: the model's choice (model=gpt keeps its output head, the others keep nothing)
    keep_first: Optional[bool] = None
    keep_last: Optional[bool] = None
    exclude: list[str] = field(default_factory=list)  # fnmatch patterns of layer names kept fp
    # forward dequantization of slots w and a (spec/denoise_bn.md A): ste = min-max grid, straight-through;
    # ridge = ridge fit of x on the codes, gradient through the fit
    dequant: str = "ste"  # ste | ridge
    ridge_form: str = "affine"  # affine: y = s (q - mean q) + mean x | linear: y = s q (zero-mean data only)
    ridge_lambda: float = 0.01  # ridge penalty (the paper's 0.01; 0 is guarded against NaN)
    # ridge blocks: null = weights per weight_granularity, activations per tensor; an int = sub-channel
    # blocks of that many elements along each weight row (output channel) and each sample's activations
    block: Optional[int] = None
    ternary: bool = False  # ridge only: weight codes -1, 0, 1 (threshold 0.7 mean|w|) instead of bits_w
    # number formats (spec/formats.md): `format` feeds every slot, format_<slot> sets one. int = the integer
    # grids above at bits_* (grad/grad_dw pick the gradient quantizers); fp32 = full precision; or one of
    # fqtrun.quant.formats.FORMATS: fp8_e4m3, fp8_e5m2 (tensorwise), fp8_e4m3_row, fp8_e5m2_row, fp8_e4m3_b128
    # (DeepSeek tiles), mxfp8_e4m3, mxfp8_e5m2, mxfp6_e3m2, mxfp6_e2m3, mxfp4, nvfp4. A format slot quantizes
    # each operand along the reduction dimension of the GEMM it feeds (quant/backends/simulate.py).
    format: str = "int"
    format_w: Optional[str] = None
    format_a: Optional[str] = None
    format_dx: Optional[str] = None
    format_dw: Optional[str] = None
    scale_rule: str = "floor"  # E8M0 scales of the MX formats: floor (OCP v1.0) | rceil (nothing saturates)
    weight_blocks_2d: bool = False  # format_w in 2-D tiles (nvfp4 16x16, fp8_e4m3_b128 128x128): W, W^T alike
    rounding_w: str = "nearest"  # nearest | stochastic, for a format slot (integer forward grids: nearest)
    rounding_a: str = "nearest"
    grad_rounding: str = "stochastic"  # format gradient slots; rounding_dx / rounding_dw set one
    rounding_dx: Optional[str] = None
    rounding_dw: Optional[str] = None
    # random Hadamard transform (rht) on both operands of a backward GEMM, along its reduction, before a
    # format gradient slot quantizes: grad_transform feeds both GEMMs, grad_transform_dx/dw one (none: off)
    grad_transform: Optional[str] = None
    grad_transform_dx: Optional[str] = None
    grad_transform_dw: Optional[str] = None
    rht_block: int = 16  # 16 | 32 | 64 | 128
    rht_signs: str = "step"  # step: fresh signs every step | fixed: one set per layer and GEMM
    # layer selection: the first / last N blocks in full precision (a block: an entry of the model's
    # `blocks`, e.g. a transformer block; models without `blocks`: one quantizable layer each)
    keep_first_blocks: int = 0
    keep_last_blocks: int = 0


def build_recipe(**settings) -> QuantConfig:
    """The validated recipe (what `instantiate(cfg.quant)` returns); ValueError names the setting."""
    settings["exclude"] = list(settings.get("exclude", []))
    recipe = QuantConfig(**settings)
    validate(recipe)
    return recipe


def validate(cfg: QuantConfig) -> None:
    """Fail early, one line per problem, before any data or model is built."""
    validate_dequant(cfg)
    validate_formats(cfg)
    if cfg.dequant == "ste":
        for slot in ("bits_w", "bits_a"):
            check_bits(getattr(cfg, slot), f"quant.{slot}")
    if cfg.backend not in BACKENDS:
        raise ValueError(f"quant.backend={cfg.backend!r} is unknown: use one of {', '.join(BACKENDS)}")
    validate_backend(cfg)
    if cfg.grad is not None:
        check_bits(cfg.bits_dx, "quant.bits_dx", "gradient")
        check_bits(cfg.bits_dw, "quant.bits_dw", "gradient")
        if cfg.grad_dw not in DW_QUANTIZERS:
            raise ValueError(f"quant.grad_dw={cfg.grad_dw!r} is unknown: use one of {', '.join(DW_QUANTIZERS)}")
        _grad_quantizer(cfg.grad, cfg.bits_dx, "quant.bits_dx")
        _grad_quantizer(cfg.grad_dw, cfg.bits_dw, "quant.bits_dw")
    validate_grad_grid(cfg)


def validate_grad_grid(cfg: QuantConfig) -> None:
    """quant.grad_grid: a known grid, and zero_aligned only where it changes something (PSQ)."""
    if cfg.grad_grid not in GRAD_GRIDS:
        raise ValueError(f"quant.grad_grid={cfg.grad_grid!r} is unknown: use one of {', '.join(GRAD_GRIDS)}")
    if cfg.grad_grid != "minmax" and GRADIENT_QUANTIZERS.get(cfg.grad) is not PerSample:
        raise ValueError(f"quant.grad_grid={cfg.grad_grid} applies to quant.grad=per_sample only (quant.grad="
                         f"{cfg.grad} has one grid): drop quant.grad_grid or use quant.grad=per_sample")


def validate_backend(cfg: QuantConfig) -> None:
    """quant.backend=int8 refuses settings no int8 GEMM can run (auto falls back per layer instead)."""
    if cfg.backend != "int8":
        return
    if cfg.dequant != "ste":
        raise ValueError(f"quant.backend=int8 needs quant.dequant=ste (the {cfg.dequant} dequantizer has no integer "
                         "grid): use quant.backend=auto or simulate")
    floats = [s for s in SLOTS if slot_format(cfg, s) not in ("int", "fp32")]
    if floats:
        raise ValueError(f"quant.backend=int8 runs integer grids only, and quant.format_{floats[0]}="
                         f"{slot_format(cfg, floats[0])}: use quant.backend=simulate, or auto (int8 where a layer "
                         "allows, simulate elsewhere)")
    slots = ("bits_w", "bits_a") + (("bits_dx", "bits_dw") if cfg.grad is not None else ())
    for slot in slots:
        if getattr(cfg, slot) > 8:
            raise ValueError(f"quant.{slot}={getattr(cfg, slot)} does not fit int8 codes with quant.backend=int8: "
                             "use <= 8 bits, or quant.backend=auto (int8 only where every slot has <= 8 bits)")


def _grad_quantizer(name: str, bits: int, setting: str):
    try:
        return make_gradient_quantizer(name, bits)
    except ValueError as e:
        raise ValueError(f"{setting}={bits}, quant.grad={name}: {e}") from None


# ----- number formats per slot --------------------------------------------------------------------
def slot_format(cfg: QuantConfig, slot: str) -> str:
    """The format name a slot uses: its format_<slot>, else quant.format."""
    own = getattr(cfg, f"format_{slot}")
    return cfg.format if own is None else own


def slot_rounding(cfg: QuantConfig, slot: str) -> str:
    if slot in ("w", "a"):
        return getattr(cfg, f"rounding_{slot}")
    own = getattr(cfg, f"rounding_{slot}")
    return cfg.grad_rounding if own is None else own


def slot_transform(cfg: QuantConfig, slot: str) -> RandomHadamard | None:
    """The transform of gradient slot dx / dw's GEMM (None for w, a and without one; quant.grad_transform
    applies to the float-format gradient slots)."""
    if slot in ("w", "a"):
        return None
    own = getattr(cfg, f"grad_transform_{slot}")
    setting = f"quant.grad_transform_{slot}" if own is not None else "quant.grad_transform"
    return make_transform(cfg.grad_transform if own is None else own, cfg.rht_block, cfg.rht_signs, setting)


def slot_number_format(cfg: QuantConfig, slot: str) -> Format | None:
    """The Format of a float-format slot, None for int / fp32 (one-line ValueError for a bad name)."""
    name = slot_format(cfg, slot)
    if name in ("int", "fp32"):
        return None
    if name not in FORMATS:
        key = f"quant.format_{slot}" if getattr(cfg, f"format_{slot}") is not None else "quant.format"
        raise ValueError(f"{key}={name!r} is unknown: use int, fp32 or one of {', '.join(FORMATS)}")
    fmt = FORMATS[name]
    try:
        return fmt.with_options(scale_rule=cfg.scale_rule if fmt.scale == "e8m0" else None,
                                block_2d=slot == "w" and cfg.weight_blocks_2d)
    except ValueError as e:
        raise ValueError(f"quant.format_{slot}={name}: {e} (quant.weight_blocks_2d)") from None


def recipe_label(recipe: QuantConfig | None) -> str:
    """The one-line description of a recipe in summary.json: bits and gradient quantizers of integer
    slots, each float-format slot's format, rounding (RTN / SR) and transform."""
    if recipe is None:
        return "none (fp32)"
    w, a, dx, dw = (_slot_label(recipe, slot) for slot in SLOTS)
    forward = f"{w} {a}" if slot_format(recipe, "w") == slot_format(recipe, "a") == "int" else f"{w}, {a}"
    if recipe.grad is None and slot_format(recipe, "dx") == slot_format(recipe, "dw") == "int":
        return f"{recipe.name}: {forward}, fp32 gradients (STE)"
    return f"{recipe.name}: {forward}, {dx} / {dw}"


def _slot_label(recipe: QuantConfig, slot: str) -> str:
    name, bits = slot_format(recipe, slot), getattr(recipe, f"bits_{slot}")
    if name == "int" and slot in ("w", "a"):
        return f"{slot}{bits}"
    if name == "int" and recipe.grad is not None:
        return f"{recipe.grad if slot == 'dx' else recipe.grad_dw} {slot}{bits}"
    if name in ("int", "fp32"):
        return f"{slot} fp32"
    transform = slot_transform(recipe, slot)
    rounding = "SR" if slot_rounding(recipe, slot) == "stochastic" else "RTN"
    return f"{slot} {name} {rounding}" + ("" if transform is None else f"+RHT{recipe.rht_block}")


def validate_formats(cfg: QuantConfig) -> None:
    """Checks of the format, rounding, transform and layer-selection settings (one line each)."""
    if cfg.scale_rule not in SCALE_RULES:
        raise ValueError(f"quant.scale_rule={cfg.scale_rule!r} is unknown: use one of {', '.join(SCALE_RULES)}")
    fmts = {s: slot_number_format(cfg, s) for s in SLOTS}
    if cfg.scale_rule != "floor" and not any(f is not None and f.scale == "e8m0" for f in fmts.values()):
        raise ValueError(f"quant.scale_rule={cfg.scale_rule} applies to MX formats, and no slot uses one: "
                         "set quant.format=mxfp8_e4m3 (or another mx*), or drop quant.scale_rule")
    if cfg.grad is not None and fmts["dx"] is not None:
        raise ValueError(f"quant.grad={cfg.grad} picks the integer dx quantizer, but quant.format_dx is "
                         f"{fmts['dx'].name}: use +quant=<a format recipe>, or drop quant.grad")
    if cfg.weight_granularity != "tensor" and fmts["w"] is not None:
        raise ValueError(f"quant.weight_granularity={cfg.weight_granularity} sets the integer weight grid, but "
                         f"quant.format_w is {fmts['w'].name} (its scales follow the format): drop it")
    if cfg.weight_blocks_2d and fmts["w"] is None:
        raise ValueError("quant.weight_blocks_2d=true needs a block-scaled quant.format_w (nvfp4, mx*, "
                         "fp8_e4m3_b128)")
    for slot in SLOTS:  # a slot's own setting needs a float format there (no effect otherwise)
        rounding, key = slot_rounding(cfg, slot), f"quant.rounding_{slot}"
        own = slot in ("w", "a") or getattr(cfg, f"rounding_{slot}") is not None
        if rounding not in ROUNDINGS:
            raise ValueError(f"{key if own else 'quant.grad_rounding'}={rounding!r} is unknown: use one of "
                             f"{', '.join(ROUNDINGS)}")
        transform = slot_transform(cfg, slot)
        if fmts[slot] is not None:
            continue
        kind = slot_format(cfg, slot)
        if own and rounding != ("nearest" if slot in ("w", "a") else "stochastic"):
            raise ValueError(f"{key}={rounding} needs a float quant.format_{slot}: {kind} slots have their own "
                             "rounding (integer grids: nearest forward, stochastic gradients)")
        if transform is not None and getattr(cfg, f"grad_transform_{slot}") is not None:
            raise ValueError(f"quant.grad_transform_{slot}={transform.name} needs a float quant.format_{slot} (it "
                             f"transforms the operands that format quantizes; quant.format_{slot} is {kind})")
    if not (fmts["dx"] or fmts["dw"]):  # the gradient group's settings need one float gradient slot
        if cfg.grad_rounding != "stochastic":
            raise ValueError(f"quant.grad_rounding={cfg.grad_rounding} needs a float quant.format_dx or format_dw "
                             "(integer gradient grids round stochastically)")
        if cfg.grad_transform is not None and cfg.grad_transform != "none":
            raise ValueError(f"quant.grad_transform={cfg.grad_transform} needs a float quant.format_dx or format_dw "
                             "(it transforms the operands those formats quantize; the integer grids have "
                             "quant.grad=householder)")
    if cfg.compile and all(slot_format(cfg, s) != "int" for s in SLOTS):
        raise ValueError("quant.compile=true fuses the integer quantizers, and every slot has a float format "
                         "(they run their own C kernel pass): drop quant.compile")
    if cfg.dequant == "ridge" and any(f is not None for f in fmts.values()):
        raise ValueError("quant.dequant=ridge fits integer grids only: drop quant.format* (or use quant.dequant=ste)")
    for key in ("keep_first_blocks", "keep_last_blocks"):
        if getattr(cfg, key) < 0:
            raise ValueError(f"quant.{key}={getattr(cfg, key)} must be >= 0 (blocks kept in full precision)")


def format_slot(cfg: QuantConfig, slot: str) -> FormatQuantizer:
    """The FormatQuantizer of a float-format slot (its format, rounding and GEMM transform)."""
    return FormatQuantizer(slot_number_format(cfg, slot), slot_rounding(cfg, slot), slot_transform(cfg, slot),
                           dim=SLOT_DIMS[slot], setting=f"quant.format_{slot}")


def slot_factory(cfg: QuantConfig):
    """(slot, module) -> a fresh quantizer for that slot of that layer, or None (full precision)."""

    def make(slot: str, module: nn.Module):
        name = slot_format(cfg, slot)
        if name == "fp32":
            return None
        if name != "int":
            return format_slot(cfg, slot)
        if slot in ("w", "a") and cfg.dequant == "ridge":
            return ridge_slot(cfg, slot)
        if slot == "w":
            return MinMaxQuantizer(cfg.bits_w, cfg.weight_granularity, "quant.bits_w")
        if slot == "a":
            return MinMaxQuantizer(cfg.bits_a, "tensor", "quant.bits_a")
        if cfg.grad is None:
            return None
        if slot == "dx":
            grid = cfg.grad_grid if GRADIENT_QUANTIZERS[cfg.grad] is PerSample else None
            return make_gradient_quantizer(cfg.grad, cfg.bits_dx, compile=cfg.compile, grid=grid)
        return make_gradient_quantizer(cfg.grad_dw, cfg.bits_dw, compile=cfg.compile)

    return make


def validate_dequant(cfg: QuantConfig) -> None:
    """Checks of the dequant / ridge settings (one line each)."""
    if cfg.dequant not in ("ste", "ridge"):
        raise ValueError(f"quant.dequant={cfg.dequant!r} is unknown: use ste (min-max grid) or ridge (ridge fit)")
    if cfg.dequant != "ridge":
        for key, off in (("block", None), ("ternary", False)):
            if getattr(cfg, key) != off:
                raise ValueError(f"quant.{key}={getattr(cfg, key)} needs quant.dequant=ridge "
                                 "(the ste min-max quantizer has only quant.weight_granularity=tensor|channel)")
        return
    if cfg.ridge_form not in RIDGE_FORMS:
        raise ValueError(f"quant.ridge_form={cfg.ridge_form!r} is unknown: use one of {', '.join(RIDGE_FORMS)}")
    if not cfg.ridge_lambda >= 0:
        raise ValueError(f"quant.ridge_lambda={cfg.ridge_lambda} must be >= 0 (the paper uses 0.01)")
    if cfg.block is not None and cfg.block < 1:
        raise ValueError(f"quant.block={cfg.block} must be >= 1 elements (or null: per tensor / per channel)")
    for slot in ("bits_w", "bits_a"):
        check_bits(getattr(cfg, slot), f"quant.{slot}", "ridge")


def ridge_slot(cfg: QuantConfig, slot: str) -> RidgeQuantizer:
    """Ridge quantizer of slot w (rows = output channels) or a (rows = samples); see QuantConfig.block."""
    if slot == "w":
        return RidgeQuantizer(cfg.bits_w, cfg.ridge_form, cfg.ridge_lambda, cfg.weight_granularity, cfg.block,
                              channel_dim=0, ternary=cfg.ternary, setting="quant.bits_w")
    return RidgeQuantizer(cfg.bits_a, cfg.ridge_form, cfg.ridge_lambda, "tensor", cfg.block, channel_dim=0,
                          setting="quant.bits_a")
