"""Numerics health during training: every `numerics.every` steps, what each quantized layer's slots did
to their tensors (fqtrun/quant/health.py): fraction saturated, fraction flushed to zero, SQNR, non-finite
count and bits, and the operands' outlier measures (max/RMS, kurtosis; before and after RHT where it runs).

On a probe step the hook sets every quantized layer's RunRecord.probe before the forward; the backend
measures each slot it quantizes (w and a in the forward, dx and dw in the backward) from the tensor and
its quantized value, and the hook reads the records after the step. Metrics: numerics/<layer>/<slot>/<stat>
and numerics/step (the probe's step), held until the trainer's next logged record; summary.json gets the
last probe's rows, worst first (quant.health.severity).
"""

from __future__ import annotations

from fqtrun.errors import ConfigError
from fqtrun.quant.backends import SLOTS
from fqtrun.quant.convert import quant_layers
from fqtrun.quant.health import severity, stats
from fqtrun.training.hooks import PeriodicProbe, RunFacts


def metric_key(layer: str, slot: str, stat: str) -> str:
    """The metrics.jsonl / wandb key of one statistic: numerics/<layer>/<slot>/<stat>."""
    return f"numerics/{layer}/{slot}/{stat}"


class NumericsProbe(PeriodicProbe):
    """Measures every quantized layer's slots on steps every, 2 every, ...; other steps pay nothing."""

    def __init__(self, layers: list, every: int, log_every: int):
        super().__init__(every, log_every)
        self.layers = layers

    def before_step(self, step: int) -> None:
        probe = (step + 1) % self.every == 0  # `step` steps are done: this one is number step + 1
        for _, layer in self.layers:
            layer.record.probe = probe

    def measure(self, step: int) -> dict:
        rows = self.read()
        self.last = {"step": step, "rows": rows}
        metrics = {metric_key(r["layer"], r["slot"], k): v for r in rows for k, v in r.items()
                   if k not in ("layer", "slot")}
        return {"numerics/step": step, **metrics}

    def read(self) -> list[dict]:
        """The probe's rows (layer, slot, STATS and the OUTLIERS taken) in model and slot order; switches the
        records' probes off."""
        rows = []
        for name, layer in self.layers:
            record = layer.record
            rows += [{"layer": name, "slot": s, **stats(record.health[s], record.bits[s])}
                     for s in SLOTS if s in record.health]
            record.probe, record.health = False, {}
        return rows

    def summary(self) -> dict:
        if not self.last:
            return {}
        return {"numerics_step": self.last["step"], "numerics": sorted(self.last["rows"], key=severity)}


def numerics_hook(node, facts: RunFacts) -> NumericsProbe | None:
    """A NumericsProbe when numerics.every > 0 (rank 0 only under DDP); refuses a run with no quantizer."""
    if node.every < 0:
        raise ConfigError(f"numerics.every={node.every} must be >= 0 (0 turns the numerics-health probe off)")
    if node.every == 0 or not facts.is_main:
        return None
    layers = [(name, layer) for name, layer in quant_layers(facts.model)
              if any(q is not None for q in layer.slots.values())]
    if not layers:
        raise ConfigError(f"numerics.every={node.every} measures quantizers but the run has none: add "
                          "+quant=<recipe> (e.g. +quant=per_sample), or drop numerics.every")
    return NumericsProbe(layers, node.every, facts.log_every)
