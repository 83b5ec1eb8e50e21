"""The benchmark's settings (the `bench` node of conf/bench.yaml) and the sizes quick mode uses instead."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from fqtrun.errors import ConfigError


@dataclass
class BenchSettings:
    """What `fqtrun bench` measures and at which sizes (the bench node of its config)."""

    quick: bool = False  # tiny sizes, 2 repetitions, 1 thread, no compile (the test's mode)
    reps: int = 7  # interleaved repetitions per figure
    warmup: int = 2  # untimed steps per variant first (torch.compile happens here)
    threads: list[int] = field(default_factory=lambda: [2, 1])
    quant_elements: int = 4 * 1024 * 1024  # gradient size of the quantizer bench
    quant_rows: int = 1024  # its rows (samples)
    width: int = 1024  # model=mlp: block input/output width
    hidden: int = 4096  # model=mlp: block hidden width
    blocks: int = 4  # model=mlp: number of blocks
    features: int = 256  # input length for other model choices (1-D signal)
    classes: int = 10
    vocab: int = 256  # model=gpt: vocabulary of the token windows (byte-level)
    cnn_channels: int = 128
    cnn_in_channels: int = 16
    cnn_length: int = 256
    cnn_batch: int = 128
    grad: str = "per_sample"  # dX quantizer of the FQT steps (per_tensor | per_sample | householder)
    bits: int = 8  # every slot of the FQT steps
    compile: bool = True  # torch.compile the quantizers (FQT steps and the compiled quantizer rows)
    # the train steps through torch.compile too (trainer.compile): fp32, FQT simulate and the format recipe
    compiled_steps: bool = True
    step_format: str = "nvfp4"  # the format recipe's format (every slot; RHT16 and SR on the gradients)
    masks: bool = True  # also time the mask search (masks.py) at each thread count
    mask_size: int = 4096  # the square fp32 weight searched
    mask_reps: int = 5
    mask_flow: bool = True  # exact transposable 4:8 (batched min-cost flow): seconds at 4096^2
    mask_flow_reps: int = 1
    numerics: bool = True  # also time the numerics-health probe on the linear model's FQT int8 step
    numerics_every: int = 100  # the numerics.every its overhead is stated for


# What bench.quick=true puts in place of the settings (a run of seconds: the tests' mode).
QUICK = {"reps": 2, "warmup": 1, "threads": [1], "quant_elements": 1 << 16, "quant_rows": 64, "width": 64,
         "hidden": 128, "blocks": 1, "features": 64, "cnn_channels": 32, "cnn_in_channels": 4, "cnn_length": 32,
         "cnn_batch": 16, "compile": False, "compiled_steps": False, "mask_size": 64, "mask_reps": 2}


def resolve_settings(asked: BenchSettings, batch_size: int) -> BenchSettings:
    """The settings a run measures with: quick mode's sizes applied, every range checked (ConfigError)."""
    if asked.quick:
        refuse_overwritten(asked)
    s = dataclasses.replace(asked, **QUICK) if asked.quick else asked
    checks = [(s.reps >= 1, f"bench.reps={s.reps} must be >= 1"),
              (all(t >= 1 for t in s.threads) and s.threads, f"bench.threads={s.threads} must list thread counts >= 1"),
              (batch_size >= 1, f"batch_size={batch_size} must be >= 1"),
              (s.quant_elements >= s.quant_rows >= 1, "bench.quant_elements must be >= bench.quant_rows >= 1"),
              (s.mask_size >= 8 and s.mask_reps >= 1 and s.mask_flow_reps >= 1,
               "bench.mask_size must be >= 8 and bench.mask_reps, bench.mask_flow_reps >= 1"),
              (s.numerics_every >= 1, f"bench.numerics_every={s.numerics_every} must be >= 1")]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(msg)
    return s


def refuse_overwritten(asked: BenchSettings) -> None:
    """A quick run refuses a setting that quick mode would silently replace.

    The composed config does not say what the user typed, so a value other than the schema's
    default is taken as set by the user (one equal to the default cannot be told from unset, and
    passes); a value equal to quick mode's own is not replaced, and passes too.
    """
    default = BenchSettings()
    for key, quick in QUICK.items():
        value = getattr(asked, key)
        if value not in (getattr(default, key), quick):
            shown = json.dumps(value, separators=(",", ":"))  # as typed on the command line: [4], false
            raise ConfigError(f"bench.{key}={shown} is ignored with bench.quick=true (quick mode uses its own "
                              f"tiny sizes): drop bench.{key} or bench.quick")
