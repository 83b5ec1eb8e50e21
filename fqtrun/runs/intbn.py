"""The integer-BN study behind `fqtrun intbn` (spec/denoise_bn.md B): a trained quantized run's BNs
become the integer op clip((A x + B) >> T, 0, L), verified bit-exact, and the test accuracy compared.

Four evaluations of the test split, one model: as trained (dynamic activation scales); with static
scales frozen on `calib_samples` training samples (float32 BN); converted, each block's BN computed by
the exact float reference; the same with the integer op. Only the op differs between the last two, so
their accuracies must be equal. BNs whose output is not only requantized by one quantized layer (e.g.
it feeds a residual add) stay float. `run_intbn_study` writes intbn.json and returns its content.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from fqtrun.build import load_train_run
from fqtrun.errors import ConfigError
from fqtrun.files import write_json
from fqtrun.intbn.blocks import find_blocks
from fqtrun.intbn.calibrate import calibrate, freeze_activations
from fqtrun.intbn.convert import ACC_RANGES, check_convertible, convert_model, use_op
from fqtrun.intbn.derive import check_output_bits
from fqtrun.numerics_mode import NumericsModeConfig, portable_scope

DEVICE = torch.device("cpu")  # the integer ops run in int64 / float64 on the CPU


@dataclass
class IntbnConfig:
    checkpoint: str = MISSING  # last.pt inside a `fqtrun train` run folder (its .hydra/config.yaml is read)
    bits: Optional[int] = None  # activation (requantization output) bits; null = as trained (quant.bits_a)
    acc_bits: int = 32  # signed accumulator width (int32 hardware)
    # where (A, B, T) must be exact: reachable = every accumulator the layer can produce from its weight codes
    # and input grid (smallest shifts); full = every acc_bits integer
    acc_range: str = "reachable"
    max_shift: int = 40  # largest shift T searched
    calib_samples: int = 1024  # training samples whose min-max range freezes each activation scale
    batch_size: int = 500  # calibration and evaluation batch size
    threads: int = 0  # torch CPU threads (0 = torch's default)
    numerics: NumericsModeConfig = field(default_factory=NumericsModeConfig)



def register_intbn_schema(cs: ConfigStore | None = None) -> None:
    """`fqtrun intbn`'s schema (conf/intbn.yaml), for the command and for `fqtrun reproduce`'s steps."""
    (cs or ConfigStore.instance()).store(name="intbn_schema", node=IntbnConfig)


def validate(cfg: DictConfig) -> None:
    """One-line ConfigError for a bad intbn setting."""
    if cfg.bits is not None:
        try:
            check_output_bits(cfg.bits, "bits")
        except ValueError as e:
            raise ConfigError(f"{e} (or null: as trained)") from None
    checks = [(2 <= cfg.acc_bits <= 48, f"acc_bits={cfg.acc_bits} must be in 2..48"),
              (cfg.acc_range in ACC_RANGES, f"acc_range={cfg.acc_range!r} is unknown: use {' or '.join(ACC_RANGES)}"),
              (cfg.calib_samples >= 1, f"calib_samples={cfg.calib_samples} must be >= 1"),
              (cfg.batch_size >= 1, f"batch_size={cfg.batch_size} must be >= 1")]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(msg)


@portable_scope
def run_intbn_study(cfg: DictConfig, out_dir: Path) -> dict:
    """Convert, verify and evaluate the run at cfg.checkpoint; writes intbn.json into out_dir, returns it."""
    validate(cfg)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    out_dir.mkdir(parents=True, exist_ok=True)
    run = load_train_run(cfg.checkpoint, "intbn", require=check_convertible)
    model, test = run.model, run.bundle.test
    blocks, kept = find_blocks(model)
    if not blocks:
        raise ConfigError(f"model={run.name} has no conv/linear -> BN [-> ReLU] -> quantized layer block to convert "
                          f"({'; '.join(f'{k}: {v}' for k, v in kept.items())})")

    def predict() -> tuple[torch.Tensor, torch.Tensor]:
        return run.task.predict(model, test, cfg.batch_size, DEVICE)

    pred_dyn, labels = predict()  # as trained: per-batch min-max scales
    freeze_activations(model, calibrate(model, run.bundle.train, cfg.calib_samples, cfg.batch_size, DEVICE), cfg.bits)
    pred_static = predict()[0]  # static scales, float32 BN
    rows = convert_model(model, blocks, cfg.acc_bits, cfg.acc_range, cfg.max_shift)
    results = {}
    for use in ("ref", "int"):
        requants = use_op(model, use)
        results[use] = predict()[0]
    for row, m in zip(rows, requants):
        row["codes_compared"], row["code_mismatches"] = m.codes_seen, m.mismatches

    def acc(p: torch.Tensor) -> float:
        return float((p == labels).float().mean())

    summary = {
        "checkpoint": str(cfg.checkpoint), "model": run.name, "quant": OmegaConf.to_container(run.cfg.quant),
        "bits": cfg.bits, "acc_bits": cfg.acc_bits, "acc_range": cfg.acc_range, "calib_samples": cfg.calib_samples,
        "test_samples": len(labels),
        "acc_fake_quant_dynamic": acc(pred_dyn), "acc_static_float32_bn": acc(pred_static),
        "acc_float_bn_requant": acc(results["ref"]), "acc_integer_bn": acc(results["int"]),
        "predictions_equal": bool(torch.equal(results["ref"], results["int"])),
        "all_layers_exact": all(r["verified_exact"] for r in rows),
        "converted": len(rows), "kept_float": kept, "layers": rows,
    }
    summary["acc_difference"] = summary["acc_integer_bn"] - summary["acc_float_bn_requant"]
    write_json(out_dir / "intbn.json", summary)
    return summary
