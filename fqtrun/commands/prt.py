"""fqtrun prt: the precision range test that picks CPT's q_min (spec/cpt.md, "Precision Range Test").

    fqtrun prt +quant=per_sample                                   # MNIST-1D CNN
    fqtrun prt model=resnet20 dataset=cifar10 dataset.root=/data/cifar10 +quant=per_sample

For b = prt.b_start, b_start + 1, ..., prt.b_max: train prt.steps_per_bits steps with the forward
slots (w, a) at b and the gradients at their fixed quant.bits_dx / bits_dw; the gain is the mean
train accuracy over the last prt.window steps minus over the first; q_min is the first b whose
gain exceeds prt.threshold. q_max = prt.b_max, the static baseline the schedule replaces.
One run carries over from precision to precision (the paper's "first epochs"); prt.fresh_model=true
restarts model, optimizer and batches at every precision instead. Writes prt.json and prt.png,
prints a table and the schedule override to train with.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.config_store import ConfigStore
from hydra.utils import instantiate
from omegaconf import MISSING, DictConfig
from torch import nn

from fqtrun.analysis.prt import PRTResult, precision_range_test
from fqtrun.commands.common import pick_device, run_reporting_errors, write_json
from fqtrun.config import register_configs
from fqtrun.data.loader import make_loader
from fqtrun.errors import ConfigError
from fqtrun.quant.convert import set_bits
from fqtrun.quant.grid import mix_seed
from fqtrun.quant.layers import NoiseContext
from fqtrun.quant.recipe import QuantConfig
from fqtrun.quant.recipe import validate as validate_quant
from fqtrun.training.loggers import make_console, summary_table


@dataclass
class PrtSettings:
    b_start: int = 2  # first forward precision tried
    b_max: int = 8  # the last one tried, and q_max of the suggested schedule (the static baseline)
    steps_per_bits: int = 100  # K: training steps at each precision
    window: int = 10  # w: steps averaged at the start and at the end of the K
    threshold: float = 0.05  # tau: train-accuracy gain (fraction, not percent) that picks q_min
    fresh_model: bool = False  # true: every precision restarts model, optimizer and batches


@dataclass
class PrtCommandConfig:
    dataset: Any = MISSING
    model: Any = MISSING
    optim: Any = MISSING
    quant: QuantConfig | None = None  # +quant=<recipe>: required
    prt: PrtSettings = field(default_factory=PrtSettings)
    bits: int = 8  # feeds every quant.bits_* slot unless set: the gradients' fixed precision
    batch_size: int = 100
    seed: int = 0
    device: str = "auto"
    threads: int = 0


register_configs()
ConfigStore.instance().store(name="prt_schema", node=PrtCommandConfig)


class PrecisionTrainer:
    """train_steps(bits, k) for precision_range_test: k plain SGD steps, per-step batch accuracy."""

    def __init__(self, cfg: DictConfig, device: torch.device):
        from fqtrun.commands.train import build_model, quantize_model

        torch.manual_seed(cfg.seed)
        self.bundle = instantiate(cfg.dataset)
        self.model = build_model(cfg, self.bundle)
        self.noise = NoiseContext(seed=cfg.seed)
        self.report = quantize_model(cfg, self.model, self.noise)
        self.model.to(device).train()
        self.optimizer = instantiate(cfg.optim)(params=self.model.parameters())
        self.cfg, self.device = cfg, device
        self.fresh = bool(cfg.prt.fresh_model)
        self._init = ({k: v.clone() for k, v in self.model.state_dict().items()}, self.optimizer.state_dict())
        self._restart()

    def _restart(self) -> None:
        self.step = 0
        self.batches = self._batches()

    def _batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch = 0
        while True:
            yield from make_loader(self.bundle.train, self.cfg.batch_size, shuffle=True,
                                   seed=mix_seed(self.cfg.seed, epoch))
            epoch += 1

    def __call__(self, bits: int, k: int) -> list[float]:
        if self.fresh and self.step > 0:
            self.model.load_state_dict(self._init[0])
            self.optimizer.load_state_dict(self._init[1])
            self._restart()
        set_bits(self.model, ("w", "a"), bits)
        accs = []
        for _ in range(k):
            x, y = (t.to(self.device) for t in next(self.batches))
            self.noise.step = self.step
            logits = self.model(x)
            loss = nn.functional.cross_entropy(logits, y)
            self.optimizer.zero_grad(set_to_none=True)
            if math.isfinite(loss.item()):  # a diverged step at very low bits is skipped, not fatal
                loss.backward()
                self.optimizer.step()
            accs.append(float((logits.argmax(1) == y).float().mean()))
            self.step += 1
        return accs


def result_record(res: PRTResult, settings) -> dict:
    w = res.window
    return {
        "q_min": res.q_min,
        "q_max": res.b_max,
        "override": res.override,
        "summary": res.summary(),
        "settings": {"b_start": settings.b_start, "b_max": settings.b_max, "steps_per_bits": settings.steps_per_bits,
                     "window": w, "threshold": res.threshold, "fresh_model": bool(settings.fresh_model)},
        "trace": [{"bits": b, "gain": t.delta, "acc_first": sum(t.accs[:w]) / w, "acc_last": sum(t.accs[-w:]) / w,
                   "accs": list(t.accs)} for b, t in res.trace.items()],
    }


def plot_prt(res: PRTResult, out_png: Path) -> Path:
    """Left: per-step train accuracy, one colour per precision; right: the gain per precision vs tau."""
    from matplotlib.figure import Figure

    from fqtrun.figures import save_figure

    fig = Figure(figsize=(10, 3.5))
    left, right = fig.subplots(1, 2)
    start = 0
    for b, t in res.trace.items():
        left.plot(range(start, start + len(t.accs)), t.accs, linewidth=0.8, label=f"{b} bits")
        start += len(t.accs)
    left.set_xlabel("step")
    left.set_ylabel("train batch accuracy")
    left.legend(fontsize=7)
    bits = list(res.trace)
    colors = ["tab:green" if b == res.q_min else "tab:gray" for b in bits]
    right.bar(bits, [res.trace[b].delta for b in bits], color=colors)
    right.axhline(res.threshold, color="tab:red", linestyle="--", label=f"threshold {res.threshold:g}")
    right.set_xticks(bits)
    right.set_xlabel("forward bits")
    right.set_ylabel(f"acc gain (last {res.window} - first {res.window})")
    right.set_title(f"q_min = {res.q_min}" if res.found else "no q_min found", fontsize=9)
    right.legend(fontsize=7)
    return save_figure(fig, out_png)


def run_prt(cfg: DictConfig, out_dir: Path) -> dict:
    """Run the precision range test; writes prt.json and prt.png into out_dir; returns the record."""
    if cfg.quant is None:
        raise ConfigError("fqtrun prt needs a quantized model: add +quant=per_sample (or qat, per_tensor, householder)")
    try:
        validate_quant(cfg.quant)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.batch_size < 1:
        raise ConfigError(f"batch_size={cfg.batch_size} must be >= 1")
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)
    p = cfg.prt
    state: dict[str, PrecisionTrainer] = {}

    def train_steps(bits: int, k: int) -> list[float]:
        if not state:  # built lazily: precision_range_test checks the prt.* settings first
            state["trainer"] = PrecisionTrainer(cfg, device)
        return state["trainer"](bits, k)

    res = precision_range_test(train_steps, p.b_start, p.b_max, p.steps_per_bits, p.window, p.threshold)
    record = result_record(res, p)
    write_json(out_dir / "prt.json", record)
    record["plot"] = str(plot_prt(res, out_dir / "prt.png"))
    _print(res, out_dir)
    return record


def _print(res: PRTResult, out_dir: Path) -> None:
    console = make_console()
    w = res.window
    rows = [(f"{b} bits", f"acc {sum(t.accs[:w]) / w:.3f} -> {sum(t.accs[-w:]) / w:.3f}   gain {t.delta:+.3f}"
             + ("   <- q_min" if b == res.q_min else "")) for b, t in res.trace.items()]
    rows += [("threshold", f"{res.threshold:g}"), ("q_min / q_max", f"{res.q_min} / {res.b_max}"),
             ("outputs", f"{out_dir / 'prt.json'}, {out_dir / 'prt.png'}")]
    console.print(summary_table("fqtrun prt: train-accuracy gain per precision", rows))
    print(res.summary())  # plain print: never wrapped, so the override can be copied
    if res.override:
        print(f"train with: fqtrun train <the same dataset/model/quant overrides> {res.override}")


@hydra.main(version_base="1.3", config_path="../conf", config_name="prt")
def main(cfg: DictConfig) -> None:
    run_reporting_errors(run_prt, cfg)
