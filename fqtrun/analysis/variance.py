"""Gradient variance of fully quantized training: sampling vs quantization (spec/fqt.md,
"Measuring gradient variance").

    sampling      = mean_b ||g_QAT(b) - g_bar||^2,             g_bar = mean_b g_QAT(b)
    quantization  = mean_b (1/K) sum_k ||g_FQT,k(b) - g_QAT(b)||^2

Both per layer (the parameters a module owns directly) and in total. The FQT noise has zero
conditional mean, so the FQT gradient's overall variance is their sum.

One forward pass per batch serves every backward pass: the quantized layers read their dX/dW
quantizers (layer.slots) and noise draw (layer.noise.draw) when the backward runs, so the QAT
gradient and all (quantizer, bits, k) FQT gradients come from `torch.autograd.grad` on one
retained graph. Pass k on batch b of a setup uses noise draw `base + 1 + b * K + k`. Setups whose
slots hold number formats (quant/formats) need the layers' per-GEMM path (operands requantized
along each GEMM's reduction): they share a second forward through it, with its own QAT gradient.
`VarianceProbe` runs the same measurement during training without disturbing it.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from fqtrun.data.loader import make_loader
from fqtrun.errors import ConfigError
from fqtrun.quant.backends import Simulate
from fqtrun.quant.convert import quant_layers
from fqtrun.quant.formats.quantizer import FormatQuantizer
from fqtrun.quant.gradient import GRADIENT_QUANTIZERS, make_gradient_quantizer
from fqtrun.quant.grid import mix_seed
from fqtrun.training.hooks import PeriodicProbe, RunFacts

Tensor = torch.Tensor
Batch = tuple[Tensor, Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]
SlotMaker = Callable[[str, nn.Module], object | None]  # (slot "dx"|"dw", quantized layer) -> quantizer or None

DX_QUANTIZERS = ("per_tensor", "per_sample", "householder", "ptq", "psq", "bhq")
GRAD_SLOTS = ("dx", "dw")
LAYERS_PLOT = "variance_layers.png"  # `fqtrun variance`'s per-layer figure (runs/variance.py), read by reports


# ----- what the analysis measures -------------------------------------------------------------
@dataclass
class VarianceResult:
    """Totals and per-layer values; `quant` and `quant_per_layer` are keyed by setup label."""

    layers: list[str]
    sampling: float
    sampling_per_layer: dict[str, float]
    quant: dict[Hashable, float] = field(default_factory=dict)
    quant_per_layer: dict[Hashable, dict[str, float]] = field(default_factory=dict)
    batches: int = 0
    k: int = 0


def canonical_quantizer(name: str, setting: str = "variance.quantizers") -> str:
    """Registry name of a dX quantizer (aliases ptq/psq/bhq resolved); ValueError listing the valid ones."""
    if name not in DX_QUANTIZERS:
        raise ConfigError(f"{setting} holds unknown quantizer {name!r}: use any of {', '.join(DX_QUANTIZERS)}")
    return GRADIENT_QUANTIZERS[name].name


def fqt_slots(quantizer: str, bits: int, dw_quantizer: str = "per_column", dw_bits: int | None = None) -> SlotMaker:
    """dX quantizer `quantizer` at `bits`, dW quantizer `dw_quantizer` at dw_bits (None: the same bits)."""
    bits_dw = bits if dw_bits is None else dw_bits

    def make(slot: str, layer: nn.Module):
        return make_gradient_quantizer(quantizer, bits) if slot == "dx" else make_gradient_quantizer(dw_quantizer, bits_dw)

    return make


def layer_of_params(model: nn.Module) -> tuple[list[str], list[nn.Parameter], list[str]]:
    """(layer names in module order, trainable parameters, owning layer of each parameter)."""
    params, owners, layers = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        owner = name.rpartition(".")[0] or "(model)"
        params.append(p)
        owners.append(owner)
        if owner not in layers:
            layers.append(owner)
    return layers, params, owners


# ----- temporary changes to the model, always undone ------------------------------------------
class _Exact:
    """A dX slot that leaves dY as it is: makes the layer take its FQT autograd path in the forward."""

    bits = None

    def __call__(self, g: Tensor, seed: int) -> Tensor:
        return g


@contextmanager
def grad_slots(model: nn.Module, make: SlotMaker | None) -> Iterator[None]:
    """Every quantized layer's dx/dw slots set to make(slot, layer) (None: exact GEMMs), then restored."""
    saved = [(layer, {s: layer.slots[s] for s in GRAD_SLOTS}) for _, layer in quant_layers(model)]
    try:
        for layer, _ in saved:
            for s in GRAD_SLOTS:
                layer.slots[s] = None if make is None else make(s, layer)
        yield
    finally:
        for layer, old in saved:
            layer.slots.update(old)


@contextmanager
def untouched(model: nn.Module) -> Iterator[None]:
    """Run analysis passes on `model` leaving no trace: train/eval mode, buffers (BatchNorm
    statistics), the noise draw, the bits each layer reports, and the RNG are all restored."""
    training = model.training
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    layers = [layer for _, layer in quant_layers(model)]
    used = [dict(layer.record.bits) for layer in layers]  # read back by the bits probe after every step
    draws = [(layer.noise, layer.noise.draw) for layer in layers]
    devices = sorted({b.device.index or 0 for b in _tensors(model) if b.is_cuda})
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            model.train(training)
            with torch.no_grad():
                for b, old in buffers:
                    b.copy_(old)
            for layer, u in zip(layers, used):
                layer.record.bits = u
            for noise, d in draws:
                noise.draw = d


@contextmanager
def per_gemm(model: nn.Module, on: bool) -> Iterator[None]:
    """With on=True every quantized layer runs the simulate backend's per-GEMM path, then its own backend."""
    saved = [(layer, layer.backend) for _, layer in quant_layers(model)]
    try:
        if on:
            for layer, _ in saved:
                layer.backend = Simulate(per_gemm=True)
        yield
    finally:
        for layer, backend in saved:
            layer.backend = backend


def needs_per_gemm(layer: nn.Module, make: SlotMaker) -> bool:
    """Whether a setup's gradient slots hold number formats (they quantize along each GEMM's reduction)."""
    return any(isinstance(make(s, layer), FormatQuantizer) for s in GRAD_SLOTS)


def _tensors(model: nn.Module) -> Iterator[Tensor]:
    yield from model.parameters()
    yield from model.buffers()


# ----- the measurement ------------------------------------------------------------------------
def _sq_norms(diff: Sequence[Tensor], owners: list[str], layers: list[str]) -> Tensor:
    """(layers,) float64 on the CPU: sum of squares of the tensors each layer owns (one host sync)."""
    index = {name: i for i, name in enumerate(layers)}
    out = torch.zeros(len(layers), dtype=torch.float64, device=diff[0].device)
    for d, owner in zip(diff, owners):
        out[index[owner]] += d.double().pow(2).sum()
    return out.cpu()


def _grads(loss: Tensor, params: list[nn.Parameter]) -> list[Tensor]:
    gs = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, gs)]


def measure_variance(
    model: nn.Module,
    batches: Sequence[Batch],
    setups: dict[Hashable, SlotMaker],
    k: int = 10,
    loss_fn: LossFn = nn.functional.cross_entropy,
    seed: int = 0,
) -> VarianceResult:
    """Sampling variance of the QAT gradient and, per setup, the quantization variance of its FQT gradient.

    `model` must already be converted (fqtrun.quant.convert); its forward quantizers stay as they are,
    only the dx/dw slots change per setup. Runs in train mode (the gradient training sees); the forward
    randomness (dropout) of batch b is seeded by (seed, b) so all passes on a batch share it. The model
    is left exactly as it was (see `untouched`).
    """
    if len(batches) < 2:
        raise ConfigError(f"variance.batches={len(batches)} must be >= 2: the sampling variance compares batches")
    if k < 1:
        raise ConfigError(f"variance.k={k} must be >= 1 (repeated FQT backward passes per batch)")
    layers, params, owners = layer_of_params(model)
    qlayers = [layer for _, layer in quant_layers(model)]
    if not qlayers:
        raise ConfigError("the model has no quantized layer: convert it first (fqtrun.quant.convert)")
    device = params[0].device
    n_layers = len(layers)
    g_sum = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    sq_sum = torch.zeros(n_layers, dtype=torch.float64)
    quant_sum = {label: torch.zeros(n_layers, dtype=torch.float64) for label in setups}
    groups = {}  # per-GEMM path or not -> its setups (the plain one first, as before formats existed)
    for label, make in setups.items():
        groups.setdefault(needs_per_gemm(qlayers[0], make), {})[label] = make
    with untouched(model):
        model.train()
        base = qlayers[0].noise.draw
        for b, (x, y) in enumerate(batches):
            x, y = x.to(device), y.to(device)
            for first, (path, group) in enumerate(sorted(groups.items(), key=lambda kv: kv[0])):
                torch.manual_seed(seed * 1_000_003 + b)
                with per_gemm(model, path), grad_slots(model, lambda slot, layer: _Exact()):
                    loss = loss_fn(model(x), y)  # FQT autograd path everywhere; slots are read at backward
                with grad_slots(model, None):
                    g_qat = _grads(loss, params)
                if first == 0:  # the sampling variance, from the first forward of the batch
                    for g_acc, g in zip(g_sum, g_qat):
                        g_acc += g.double()
                    sq_sum += _sq_norms(g_qat, owners, layers)
                for label, make in group.items():
                    with grad_slots(model, make):
                        for j in range(k):
                            for layer in qlayers:
                                layer.noise.draw = base + 1 + b * k + j
                            g = _grads(loss, params)
                            quant_sum[label] += _sq_norms([a - c for a, c in zip(g, g_qat)], owners, layers)
                del loss
    n = len(batches)
    g_bar = [g / n for g in g_sum]
    # mean_b ||g_b - g_bar||^2 = mean_b ||g_b||^2 - ||g_bar||^2, accumulated in float64
    sampling = (sq_sum / n - _sq_norms(g_bar, owners, layers)).clamp(min=0)
    per = lambda v: {name: float(v[i]) for i, name in enumerate(layers)}
    quant = {label: v / (n * k) for label, v in quant_sum.items()}
    return VarianceResult(
        layers=layers, sampling=float(sampling.sum()), sampling_per_layer=per(sampling),
        quant={label: float(v.sum()) for label, v in quant.items()},
        quant_per_layer={label: per(v) for label, v in quant.items()}, batches=n, k=k,
    )


def held_batches(dataset, batch_size: int, count: int, seed: int) -> list[Batch]:
    """`count` batches of the dataset, the same for one seed (a seeded permutation, no replacement)."""
    if count * batch_size > len(dataset):
        raise ConfigError(f"variance.batches={count} x batch size {batch_size} exceeds the {len(dataset)} "
                          "training samples: lower variance.batches or the batch size")
    out = []
    for x, y in make_loader(dataset, batch_size, shuffle=True, seed=seed):
        if len(out) == count:
            break
        out.append((x, y))
    return out


# ----- the training probe ---------------------------------------------------------------------
class VarianceProbe(PeriodicProbe):
    """Every `every` steps: var/sampling and var/quant of the run's own FQT gradient on held batches
    (held until the next logged record with var/step, the step it was taken at)."""

    def __init__(self, model: nn.Module, batches: list[Batch], every: int, k: int, log_every: int,
                 loss_fn: LossFn, seed: int):
        super().__init__(every, log_every)
        self.model, self.batches, self.k = model, batches, k
        self.loss_fn, self.seed = loss_fn, seed

    def measure(self, step: int) -> dict:
        own = {id(layer): dict(layer.slots) for _, layer in quant_layers(self.model)}
        setups = {"run": lambda slot, layer: own[id(layer)][slot]}
        res = measure_variance(self.model, self.batches, setups, self.k, self.loss_fn, self.seed)
        self.last = {"var/sampling": res.sampling, "var/quant": res.quant["run"], "var/step": step}
        return dict(self.last)

    def summary(self) -> dict:
        return {f"final_{k.replace('/', '_')}": v for k, v in self.last.items()}


def variance_hook(v, facts: RunFacts) -> VarianceProbe | None:
    """A VarianceProbe when variance.every > 0 and the run quantizes gradients (rank 0 only under DDP)."""
    if v.every < 0:
        raise ConfigError(f"variance.every={v.every} must be >= 0 (0 turns the probe off)")
    if v.every == 0 or not facts.is_main:
        return None
    if v.k < 1:
        raise ConfigError(f"variance.k={v.k} must be >= 1 (repeated FQT backward passes per batch)")
    if v.batches < 2:
        raise ConfigError(f"variance.batches={v.batches} must be >= 2: the sampling variance compares batches")
    if not any(layer.fully_quantized for _, layer in quant_layers(facts.model)):
        return None  # fp32 or QAT: no quantization variance to measure
    batches = held_batches(facts.train_set, facts.batch_size, v.batches, held_seed(facts.seed))
    return VarianceProbe(facts.model, batches, v.every, v.k, facts.log_every, facts.task.loss, facts.seed)


def held_seed(seed: int) -> int:
    """Seed of the held batches: fixed per run, unrelated to the epochs' shuffling seeds."""
    return mix_seed(int(seed), 0x7661)  # 0x7661: "va"
