"""The mask study behind `fqtrun mask` (spec sparsity.md): what N:M / transposable N:M masks cost a
trained model, and its one-shot conversion to N:M. Convention: N is the number KEPT of every M.

1. Per masked layer: kept |w| of the structured mask over unstructured top-k at the same density,
   greedy over exact (transposable), log10 mask diversity of the constraint and of unstructured,
   mask search times (sparsity/report.py).
2. Conversion (convert.enabled; by default when convert.calibration_batches > 0): magnitude masks,
   then per-layer least-squares reconstruction of the kept weights on calibration batches and BN
   re-estimation (sparsity/conversion.py); test accuracy dense vs magnitude-only vs reconstructed;
   the sparse model is written to <out>/sparse as a run folder (sparsity/checkpoint.py).
Layers masked: the same rule as sparse training (MaskPolicy): every sparse-capable conv/linear but
the classifier (sparsity.keep_last) and sparsity.exclude.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from omegaconf import DictConfig

from fqtrun.build import load_train_run, pick_device, quantize_model
from fqtrun.errors import ConfigError
from fqtrun.files import write_json
from fqtrun.numerics_mode import portable_scope
from fqtrun.quant.convert import quant_layers
from fqtrun.quant.layers import NoiseContext
from fqtrun.sparsity.checkpoint import save_sparse_checkpoint
from fqtrun.sparsity.conversion import calibration_batches, convert_to_sparse, fold_masks
from fqtrun.sparsity.policy import MaskPolicy
from fqtrun.sparsity.report import kept_dense, masked_layer_rows
from fqtrun.sparsity.tables import markdown


def study_settings(cfg: DictConfig) -> tuple[MaskPolicy, bool]:
    """The mask policy (validated by MaskPolicy) and whether to convert; raises one-line errors."""
    s, c = cfg.sparsity, cfg.convert
    policy = MaskPolicy(kind=s.kind, n=s.n, m=s.m, method=s.method, exclude=list(s.exclude), keep_last=s.keep_last)
    checks = [(c.calibration_batches >= 0, f"convert.calibration_batches={c.calibration_batches} must be >= 0"),
              (c.batch_size >= 1, f"convert.batch_size={c.batch_size} must be >= 1"),
              (c.damping > 0, f"convert.damping={c.damping} must be > 0: it keeps the least squares invertible"),
              (cfg.eval_batch_size >= 1, f"eval_batch_size={cfg.eval_batch_size} must be >= 1")]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(msg)
    enabled = c.calibration_batches > 0 if c.enabled is None else bool(c.enabled)
    if enabled and c.calibration_batches < 1:
        raise ConfigError("convert.enabled=true needs convert.calibration_batches >= 1 (the reconstruction and "
                          "BN re-estimation data); or pass convert.enabled=false for the mask report alone")
    return policy, enabled


@portable_scope
def run_mask_study(cfg: DictConfig, out_dir: Path) -> dict:
    """Mask report (and conversion) of a trained run (a composed `mask` config); writes mask.json, mask.md
    and sparse/ into out_dir and returns the summary."""
    policy, convert_enabled = study_settings(cfg)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = pick_device(cfg.device)
    run = load_train_run(cfg.checkpoint, "mask")
    model = run.model
    if next(quant_layers(model), None) is None:  # a plain fp32 run: make the layers mask-capable, as sparse runs are
        quantize_model(None, True, model, NoiseContext(seed=run.cfg.seed))
    had_masks = fold_masks(model)  # a sparse run: the study starts from its masked weights, dense
    model.to(device)

    def accuracy(m: torch.nn.Module) -> float:
        return run.task.evaluate(m, run.bundle.test, cfg.eval_batch_size, device)["acc"]

    t0 = time.perf_counter()
    acc_dense = accuracy(model)
    t_eval = time.perf_counter() - t0
    policy.attach(model)  # magnitude masks of the dense weights (the classifier and excluded layers stay dense)
    rows = masked_layer_rows(model, policy)
    acc_magnitude = accuracy(model)
    summary = {
        "checkpoint": str(run.path), "model": run.name, "dataset": run.bundle.name,
        "sparsity": {"kind": policy.kind, "n": policy.n, "m": policy.m, "method": policy.method,
                     "convention": "n kept of every m"},
        "masked": list(policy.names), "kept_dense": kept_dense(model, policy),
        "checkpoint_had_masks": had_masks,
        "density": policy.densities(model),  # of the masks applied (method), kept per layer
        # over the layers that tile exactly (the others have no diversity formula)
        "log10_md": sum(r["log10_md"] for r in rows if r["log10_md"] is not None),
        "log10_md_unstructured": sum(r["log10_md_unstructured"] for r in rows if r["log10_md"] is not None),
        "accuracy": {"dense": acc_dense, "magnitude": acc_magnitude, "reconstructed": None},
        "timing_s": {"masks": sum(r["mask_ms"] + (r["greedy_ms"] or 0.0) for r in rows) / 1e3,
                     "evaluation": t_eval},
        "layers": rows,
    }
    if convert_enabled:
        c = cfg.convert
        batches = calibration_batches(run.bundle.train, c.calibration_batches, c.batch_size, cfg.seed, device)
        done = convert_to_sparse(model, policy.names, batches, c.damping, c.bn, accuracy)
        summary["accuracy"].update(done["accuracy"])
        for r in rows:
            r.update(done["errors"][r["layer"]])
        summary["timing_s"].update(done["timing_s"])
        summary["calibration"] = done["calibration"]
        summary["sparse_checkpoint"] = str(save_sparse_checkpoint(out_dir / "sparse", run.cfg, model, run.name,
                                                                  run.path, policy))
    write_json(out_dir / "mask.json", summary)
    (out_dir / "mask.md").write_text(markdown(summary), encoding="utf-8")
    return summary
