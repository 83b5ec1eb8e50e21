"""The gradient-variance study behind `fqtrun variance` (spec/fqt.md, "Measuring gradient variance").

The forward pass is the QAT forward at variance.forward_bits (weights and input activations,
nearest rounding); only the gradient quantizers change. A variance.quantizers entry is
- an integer gradient quantizer (per_tensor, per_sample, householder; ptq, psq, bhq): dY of the
  input-gradient GEMM (dX) at each of variance.bits, dY of the weight-gradient GEMM (dW) with
  variance.dw_quantizer at variance.dw_bits (null = the studied bits; 8 = the paper's protocol);
- or a quant recipe (conf/quant/<name>.yaml, e.g. per_sample, mxfp4_sr, nvfp4), optionally with
  settings of its own, `name:key=value:key=value` (any quant.<key>, and `bits` for all its bits_*;
  e.g. "per_sample:grad_grid=zero_aligned", "nvfp4:grad_transform_dw=none"): its dx and dw slots as
  the recipe sets them (grid, format, rounding, transform), at each of variance.bits like the plain
  quantizers (dW by variance.dw_quantizer at variance.dw_bits), or once, in the column of the dx
  slot's bits, where the entry sets `bits`/`bits_dx` or the format fixes them (mxfp4: 4).
`run_study` writes variance.json, variance.csv, variance.png and variance_layers.png and returns the data.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig
from rich import box
from rich.table import Table

from fqtrun import conf
from fqtrun.analysis.variance import (
    DX_QUANTIZERS,
    LAYERS_PLOT,
    SlotMaker,
    VarianceResult,
    canonical_quantizer,
    fqt_slots,
    held_batches,
    measure_variance,
)
from fqtrun.build import (
    build_model,
    build_recipe,
    build_task,
    checkpoint_path,
    load_weights,
    pick_device,
    quantize_model,
)
from fqtrun.config import compose_conf
from fqtrun.data.base import build_bundle
from fqtrun.errors import ConfigError, NumericsError
from fqtrun.files import write_json
from fqtrun.numerics_mode import NumericsModeConfig, portable_scope
from fqtrun.quant.bits import check_bits
from fqtrun.quant.gradient import make_gradient_quantizer
from fqtrun.quant.layers import NoiseContext
from fqtrun.quant.numerics import NonFiniteError
from fqtrun.quant.quantizers import GRANULARITIES
from fqtrun.quant.recipe import DW_QUANTIZERS, QuantConfig, slot_factory
from fqtrun.training.checkpoint import load_checkpoint


@dataclass
class VarianceStudyConfig:
    quantizers: list[str] = field(default_factory=lambda: ["per_tensor", "per_sample", "householder"])
    bits: list[int] = field(default_factory=lambda: [3, 4, 5, 6, 8])  # dX gradient bits studied
    dw_bits: Optional[int] = None  # dW gradient bits: null = the studied bits (strict), 8 = the paper's protocol
    dw_quantizer: str = "per_column"  # quantizer of dY in the dW GEMM: per_column | per_tensor
    forward_bits: int = 8  # QAT forward: weights and input activations
    weight_granularity: str = "tensor"  # forward weight ranges: tensor | channel
    k: int = 10  # repeated FQT backward passes per batch
    batches: int = 10  # batches of the train set averaged over
    batch_size: int = 100


@dataclass
class VarianceCommandConfig:
    dataset: Any = MISSING
    model: Any = MISSING
    variance: VarianceStudyConfig = field(default_factory=VarianceStudyConfig)
    checkpoint: Optional[str] = None  # a run's last.pt (or its folder); null = a fresh model
    seed: int = 0  # model init (fresh), held batches, noise
    device: str = "auto"
    threads: int = 0
    numerics: NumericsModeConfig = field(default_factory=NumericsModeConfig)


def register_variance_schema(cs: ConfigStore | None = None) -> None:
    """`fqtrun variance`'s schema (conf/variance.yaml), for the command and for `fqtrun reproduce`'s steps."""
    (cs or ConfigStore.instance()).store(name="variance_schema", node=VarianceCommandConfig)


def recipe_setups(entry: str, v) -> dict[int, SlotMaker]:
    """dx bits -> the dx/dw slots of a quant recipe entry "name[:key=value...]" (ConfigError otherwise).

    The entry is measured at each of variance.bits (`bits=b`, which feeds every bits_* slot of an integer
    recipe, with dW at variance.dw_bits by variance.dw_quantizer as the plain quantizers), unless it sets
    its own bits (`bits` or `bits_dx`), or its dx slot's bits are its format's (mxfp4, nvfp4, ...): then
    once, in the column of those bits.
    """
    name, *settings = entry.split(":")
    if not (Path(conf.__file__).parent / "quant" / f"{name}.yaml").is_file():
        raise ConfigError(f"variance.quantizers holds unknown quantizer {name!r}: use {', '.join(DX_QUANTIZERS)} "
                          "or a quant recipe (conf/quant: mxfp4_sr, mxfp4_rht_sr, nvfp4, ...)")
    if any("=" not in kv for kv in settings):
        raise ConfigError(f"variance.quantizers entry {entry!r}: write a recipe's own settings as "
                          "name:key=value:key=value (e.g. \"per_sample:grad_grid=zero_aligned\")")
    own = dict(kv.split("=", 1) for kv in settings)
    base = [f"+quant={name}", *(f"bits={value}" if key == "bits" else f"++quant.{key}={value}" for key, value in
                                own.items())]
    protocol = [f"quant.{key}={value}" for key, value in (("bits_dw", v.dw_bits), ("grad_dw", v.dw_quantizer))
                if value is not None and key not in own and "bits" not in own]
    studied = [[]] if "bits" in own or "bits_dx" in own else [[f"bits={b}", *protocol] for b in v.bits]
    probe = torch.nn.Linear(1, 1)
    out: dict[int, SlotMaker] = {}
    for extra in studied:
        try:
            recipe = build_recipe(compose_conf("train", [*base, *extra]).quant)
        except Exception as e:  # noqa: BLE001 (Hydra's override and schema errors: one line, the entry named)
            raise ConfigError(f"variance.quantizers entry {entry!r}: {' '.join(str(e).split())[:200]}") from None
        make = slot_factory(recipe)
        dx = make("dx", probe) or make("dw", probe)
        if dx is None:
            raise ConfigError(f"variance.quantizers entry {entry!r}: the recipe quantizes no gradient (its dx and "
                              "dw slots are full precision): nothing to measure")
        out.setdefault(dx.bits, make)
    return out


def validate(v) -> tuple[list[str], dict[str, dict[int, SlotMaker]]]:
    """Checks the study settings; (the entries' labels, aliases resolved; the recipe entries' setups)."""
    if not v.quantizers:
        raise ConfigError("variance.quantizers is empty: pass e.g. variance.quantizers=[per_tensor,per_sample]")
    if not v.bits:
        raise ConfigError("variance.bits is empty: pass e.g. variance.bits=[4,8]")
    names = [canonical_quantizer(q) if q in DX_QUANTIZERS else q for q in v.quantizers]
    if len(set(names)) != len(names):
        raise ConfigError(f"variance.quantizers={list(v.quantizers)} names a quantizer twice (aliases count)")
    recipes = {q: recipe_setups(q, v) for q in names if q not in DX_QUANTIZERS}
    names = [q for q in names if q not in recipes]
    if v.dw_quantizer not in DW_QUANTIZERS:
        raise ConfigError(f"variance.dw_quantizer={v.dw_quantizer!r} is unknown: use one of {', '.join(DW_QUANTIZERS)}")
    for name, bits in ((q, b) for q in names for b in v.bits):
        try:
            make_gradient_quantizer(name, bits)
        except ValueError as e:
            raise ConfigError(f"variance.bits={bits} with quantizer {name}: {e}") from None
    if v.dw_bits is not None:
        try:
            make_gradient_quantizer(v.dw_quantizer, v.dw_bits)
        except ValueError as e:
            raise ConfigError(f"variance.dw_bits={v.dw_bits}: {e}") from None
    if v.weight_granularity not in GRANULARITIES:
        raise ConfigError(f"variance.weight_granularity={v.weight_granularity!r} is unknown: use one of "
                          f"{', '.join(GRANULARITIES)}")
    try:
        check_bits(v.forward_bits, "variance.forward_bits")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    for key, low in (("k", 1), ("batches", 2), ("batch_size", 1)):
        if getattr(v, key) < low:
            raise ConfigError(f"variance.{key}={getattr(v, key)} must be >= {low}")
    return names + list(recipes), recipes


def study_model(cfg: DictConfig, bundle, noise: NoiseContext, name: str) -> torch.nn.Module:
    """The model with a QAT forward at variance.forward_bits, weights from the checkpoint if given."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, bundle)
    v = cfg.variance
    qat = QuantConfig(grad=None, bits_w=v.forward_bits, bits_a=v.forward_bits, bits_dx=v.forward_bits,
                      bits_dw=v.forward_bits, weight_granularity=v.weight_granularity)
    quantize_model(qat, False, model, noise)
    if cfg.checkpoint:
        path = checkpoint_path(cfg.checkpoint)
        load_weights(model, load_checkpoint(path), bundle, name, path)
    return model


@portable_scope
def run_study(cfg: DictConfig, out_dir: Path, model_name: str) -> tuple[dict, Table]:
    """Measure; write variance.json / .csv / .png / _layers.png into out_dir; (the data, its table)."""
    v = cfg.variance
    names, recipes = validate(v)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = pick_device(cfg.device)
    # a checkpoint's own tokenizer (a BPE), never another trained here
    bundle = build_bundle(cfg.dataset, load_checkpoint(checkpoint_path(cfg.checkpoint)) if cfg.checkpoint else None)
    noise = NoiseContext(seed=cfg.seed)
    model = study_model(cfg, bundle, noise, model_name).to(device)
    batches = held_batches(bundle.train, v.batch_size, v.batches, cfg.seed)
    bits = sorted({int(b) for b in v.bits} | {b for per_bits in recipes.values() for b in per_bits})
    setups = {(q, b): fqt_slots(q, b, v.dw_quantizer, v.dw_bits) for q in names if q not in recipes
              for b in bits if b in v.bits}
    setups.update({(q, b): make for q, per_bits in recipes.items() for b, make in per_bits.items()})
    try:
        res = measure_variance(model, batches, setups, k=v.k, loss_fn=build_task(cfg, bundle).loss, seed=cfg.seed)
    except NonFiniteError as err:
        source = f"checkpoint {checkpoint_path(cfg.checkpoint)}" if cfg.checkpoint else "the fresh model"
        raise NumericsError(f"{err} while measuring the gradient variance of {source}: pass the checkpoint "
                            "of a run that trained without NaN/inf (an earlier one)") from err

    settings = {
        "model": model_name, "dataset": bundle.name, "checkpoint": str(checkpoint_path(cfg.checkpoint))
        if cfg.checkpoint else None, "forward_bits": v.forward_bits,
        "dw_quantizer": v.dw_quantizer, "dw_bits": v.dw_bits,  # None: the studied bits
        "k": v.k, "batches": v.batches, "batch_size": v.batch_size, "seed": cfg.seed,
    }
    data = to_json(res, names, bits, settings)
    write_json(out_dir / "variance.json", data)
    write_csv(out_dir / "variance.csv", res, names, bits)
    title = f"{model_name} / {bundle.name}, dW {'at the studied bits' if v.dw_bits is None else f'at {v.dw_bits} bits'}"
    plot(out_dir / "variance.png", res, names, bits, title=title)
    plot_layers(out_dir / LAYERS_PLOT, res, names, bits[0], title=title)
    return data, table(res, names, bits, settings)


def to_json(res: VarianceResult, names: list[str], bits: list[int], settings: dict) -> dict:
    return {
        "settings": settings,
        "layers": res.layers,
        "sampling": {"total": res.sampling, "per_layer": res.sampling_per_layer},
        "quantization": {q: {str(b): {"total": res.quant[(q, b)], "per_layer": res.quant_per_layer[(q, b)]}
                             for b in bits if (q, b) in res.quant} for q in names},
    }


def write_csv(path: Path, res: VarianceResult, names: list[str], bits: list[int]) -> None:
    """Long format: kind (sampling | quantization), quantizer, bits, layer (or total), variance."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["kind", "quantizer", "bits", "layer", "variance"])
        for layer in ["total", *res.layers]:
            w.writerow(["sampling", "", "", layer, res.sampling if layer == "total" else res.sampling_per_layer[layer]])
        for q in names:
            for b in (b for b in bits if (q, b) in res.quant):
                per = res.quant_per_layer[(q, b)]
                for layer in ["total", *res.layers]:
                    w.writerow(["quantization", q, b, layer, res.quant[(q, b)] if layer == "total" else per[layer]])


def drop_per_bit(values: list[float], bits: list[int]) -> float:
    """Geometric-mean factor by which the variance falls per extra bit, first to last bit-width."""
    if len(bits) < 2:
        return float("nan")
    span = bits[-1] - bits[0]
    if span <= 0 or values[0] <= 0 or values[-1] <= 0:
        return float("nan")
    return (values[0] / values[-1]) ** (1.0 / span)


def table(res: VarianceResult, names: list[str], bits: list[int], settings: dict) -> Table:
    t = Table(title=f"quantization variance of the gradient (sampling variance {res.sampling:.3e})",
              title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False,
              caption=f"{settings['model']} / {settings['dataset']}, forward {settings['forward_bits']} bits, "
                      f"dW {settings['dw_quantizer']} at {settings['dw_bits'] or 'the studied'} bits, K={res.k}, "
                      f"{res.batches} batches",
              caption_justify="left")
    t.add_column("quantizer", style="bold", no_wrap=True)
    for b in bits:
        t.add_column(f"{b} bits", justify="right", no_wrap=True)
    t.add_column("x/bit", justify="right", no_wrap=True)
    order = sorted(range(len(bits)), key=lambda i: bits[i])
    for q in names:
        have = [i for i in order if (q, bits[i]) in res.quant]
        drop = drop_per_bit([res.quant[(q, bits[i])] for i in have], [bits[i] for i in have])
        t.add_row(q, *(f"{res.quant[(q, b)]:.2e}" if (q, b) in res.quant else "-" for b in bits),
                  "-" if math.isnan(drop) else f"{drop:.2f}x")
    return t


def plot_layers(path: Path, res: VarianceResult, names: list[str], bits: int, title: str = "") -> None:
    """Per layer (x) the sampling variance and each quantizer's at `bits` (log-scale bars): where the
    quantization noise sits, and how far below the sampling noise it is."""
    from matplotlib.figure import Figure

    from fqtrun.figures import save_figure

    series = {"sampling": res.sampling_per_layer}
    series |= {f"{q} ({bits} bits)": res.quant_per_layer[(q, bits)] for q in names if (q, bits) in res.quant}
    layers = res.layers
    fig = Figure(figsize=(max(6.0, 0.32 * len(layers) + 2.0), 4.5))
    ax = fig.add_subplot()
    width = 0.8 / len(series)
    for i, (label, per_layer) in enumerate(series.items()):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(layers))]
        ax.bar(xs, [per_layer[layer] for layer in layers], width=width, label=label,
               color="black" if label == "sampling" else None)
    ax.set_yscale("log")
    ax.set_xticks(range(len(layers)))
    ax.set_xticklabels(layers, rotation=90, fontsize=7)
    ax.set_ylabel("variance of the layer's gradient")
    ax.set_title(title, fontsize=9)
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.legend(fontsize=7)
    save_figure(fig, path)


def plot(path: Path, res: VarianceResult, names: list[str], bits: list[int], title: str = "") -> None:
    """Quantization variance vs bits (log scale), one line per quantizer, sampling variance as a level."""
    from matplotlib.figure import Figure

    from fqtrun.figures import save_figure

    fig = Figure(figsize=(5.5, 4.0))
    ax = fig.add_subplot()
    xs = sorted(bits)
    for q in names:
        pts = [(b, res.quant[(q, b)]) for b in xs if res.quant.get((q, b), 0) > 0]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=q)
    if res.sampling > 0:
        ax.axhline(res.sampling, color="black", linestyle="--", label="sampling variance")
    ax.set_yscale("log")
    ax.set_xlabel("bits of the dX gradient quantizer")
    ax.set_ylabel("variance of the gradient")
    ax.set_xticks(xs)
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    save_figure(fig, path)


