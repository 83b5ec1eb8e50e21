"""The precision range test on the one Trainer (spec/cpt.md, "Precision Range Test").

A PRT is training with a precision schedule and a stop rule: the forward slots (w, a) hold bits b
for prt.steps_per_bits steps, b = b_start, b_start + 1, ...; the rule (precision/prt.py) stops at
the first b whose train-accuracy gain exceeds the threshold. The gradients keep their quant bits.
One run carries over from precision to precision (the paper's "first epochs"); fresh_model=true
assembles the run anew (same seed, same initial weights, same batches) for every precision.
"""

from __future__ import annotations

from omegaconf import DictConfig

from fqtrun.build import DEFAULT_HOOKS, assemble, pick_device
from fqtrun.errors import ConfigError
from fqtrun.numerics_mode import portable_scope
from fqtrun.precision.prt import PRTResult, precision_range_test
from fqtrun.quant.convert import set_bits
from fqtrun.training.hooks import Hook, HookSpec
from fqtrun.training.loggers import ProgressView, make_console
from fqtrun.training.trainer import LoopSettings, Trainer


class BatchAccuracy(Hook):
    """Records every training step's batch accuracy (the PRT's measurement)."""

    def __init__(self):
        self.accs: list[float] = []

    def after_step(self, step: int, batch: dict) -> dict:
        self.accs.append(batch["acc"])
        return {}


def _trainer(cfg: DictConfig, device, record: BatchAccuracy) -> Trainer:
    """A run with the noise hook and the recorder; no evaluation, no checkpoints."""
    specs = [s for s in DEFAULT_HOOKS if s.name == "noise"] + [HookSpec("prt", None, lambda node, facts: record)]
    run = assemble(cfg, device, cfg.seed, hook_specs=specs)
    settings = LoopSettings(epochs=cfg.epochs, batch_size=cfg.batch_size, eval_batch_size=cfg.eval_batch_size,
                            seed=cfg.seed, grad_clip=cfg.grad_clip, nan_policy="skip",
                            log_every=cfg.logger.log_every, max_steps=0, save=False)
    progress = ProgressView(cfg.logger.progress, make_console())
    return Trainer(run.model, run.optimizer, run.task, run.bundle.train, None, settings, ".", device, run.hooks,
                   lambda record: None, progress, run.lr_at)


@portable_scope
def run_precision_range_test(cfg: DictConfig) -> PRTResult:
    """Train through the precisions until the stop rule fires; NaN steps at very low bits are skipped."""
    if cfg.get("quant") is None:
        raise ConfigError("fqtrun prt needs a quantized model: add +quant=per_sample (or qat, per_tensor, householder)")
    device = pick_device(cfg.device)
    p = cfg.prt
    state: dict[str, tuple[Trainer, BatchAccuracy]] = {}

    def train_steps(bits: int, k: int) -> list[float]:
        if not state or p.fresh_model:  # built lazily: precision_range_test checks the prt.* settings first
            record = BatchAccuracy()
            state["run"] = (_trainer(cfg, device, record), record)
        trainer, record = state["run"]
        set_bits(trainer.model, ("w", "a"), bits)
        first = len(record.accs)
        trainer.total_steps = trainer.state.step + k
        trainer.fit()
        return record.accs[first:]

    return precision_range_test(train_steps, p.b_start, p.b_max, p.steps_per_bits, p.window, p.threshold)
