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
from fqtrun.quant.gradient import GRAD_GRIDS, GRADIENT_QUANTIZERS, PerSample, make_gradient_quantizer
from fqtrun.quant.quantizers import RIDGE_FORMS, MinMaxQuantizer, RidgeQuantizer

DW_QUANTIZERS = ("per_tensor", "per_column")
BACKENDS = backends.BACKENDS  # simulate | int8 | auto


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


def build_recipe(**settings) -> QuantConfig:
    """The validated recipe (what `instantiate(cfg.quant)` returns); ValueError names the setting."""
    settings["exclude"] = list(settings.get("exclude", []))
    recipe = QuantConfig(**settings)
    validate(recipe)
    return recipe


def validate(cfg: QuantConfig) -> None:
    """Fail early, one line per problem, before any data or model is built."""
    validate_dequant(cfg)
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


def slot_factory(cfg: QuantConfig):
    """(slot, module) -> a fresh quantizer for that slot of that layer, or None (full precision)."""

    def make(slot: str, module: nn.Module):
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
