"""fqtrun train: build dataset, model, quantization, optimizer and hooks from the config; fit."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from fqtrun.analysis.trace_plot import plot_bit_trace
from fqtrun.commands.common import (
    done_summary,
    hydra_choices,
    pick_device,
    run_reporting_errors,
    task_overrides,
    write_json,
)
from fqtrun.config import register_configs, validate_train
from fqtrun.errors import CheckpointError
from fqtrun.quant.backends import apply_backend, backend_report
from fqtrun.quant.convert import ConversionReport, convert, used_bits
from fqtrun.quant.layers import NoiseContext
from fqtrun.quant.recipe import slot_factory
from fqtrun.training.checkpoint import check_matches, load_checkpoint
from fqtrun.training.distributed import NullLogger, SingleProcess
from fqtrun.training.distributed import setup as setup_processes
from fqtrun.training.hooks import Hook
from fqtrun.training.loggers import JsonlLogger, ProgressView, WandbLogger, make_console, summary_table
from fqtrun.training.trainer import Interrupted, LoopSettings, Trainer

register_configs()


class NoiseStep(Hook):
    """Keeps the stochastic-rounding noise a function of the global step (exact resume)."""

    def __init__(self, noise: NoiseContext):
        self.noise = noise

    def before_step(self, step: int) -> None:
        self.noise.step = step


class BitsProbe(Hook):
    """Adds the bits each slot actually used (read back from the layers) to every record."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.last: dict[str, int] = {}

    def after_step(self, step: int) -> dict:
        self.last = {k: v for k, v in used_bits(self.model).items() if v is not None}
        return {f"bits_{k}": v for k, v in self.last.items()}

    def summary(self) -> dict:
        return {"bits_used": self.last}  # the last training step's, not the evaluation's


def build_model(cfg: DictConfig, bundle) -> torch.nn.Module:
    return instantiate(cfg.model, num_classes=bundle.num_classes, input_shape=tuple(bundle.input_shape))


def quantize_model(cfg: DictConfig, model: torch.nn.Module, noise: NoiseContext) -> ConversionReport | None:
    """Apply the quant recipe (and make layers sparse-capable); None when the run is plain fp32."""
    q = cfg.quant
    if q is None and cfg.get("sparsity") is None:
        return None
    factory = slot_factory(q) if q is not None else (lambda slot, module: None)
    report = convert(model, factory, noise, keep_first=bool(q and q.keep_first), keep_last=bool(q and q.keep_last),
                     exclude=list(q.exclude) if q else [])
    if q is not None:
        apply_backend(model, q.backend, compile=q.compile)
    return report


# Techniques plug into the loop through hook factories: "module:function", each called as
# function(cfg, model, bundle) -> Hook | None (None when the run does not use that technique).
HOOK_FACTORIES: tuple[str, ...] = (
    "fqtrun.sparsity.trainer_hook:sparsity_hook",
    "fqtrun.analysis.variance:variance_hook",
    "fqtrun.training.precision:precision_hook",
    "fqtrun.training.precision:bitops_hook",
)


def build_hooks(cfg: DictConfig, model: torch.nn.Module, bundle, noise: NoiseContext) -> list[Hook]:
    hooks: list[Hook] = [NoiseStep(noise)]
    for spec in HOOK_FACTORIES:
        module, _, fn = spec.partition(":")
        hook = getattr(importlib.import_module(module), fn)(cfg, model, bundle)
        if hook is not None:
            hooks.append(hook)
    if cfg.quant is not None:
        hooks.append(BitsProbe(model))  # last, so it reads the bits the other hooks set
    return hooks


def loop_settings(cfg: DictConfig) -> LoopSettings:
    return LoopSettings(
        epochs=cfg.epochs, batch_size=cfg.batch_size, eval_batch_size=cfg.eval_batch_size, seed=cfg.seed,
        label_smoothing=cfg.label_smoothing, grad_clip=cfg.grad_clip, nan_policy=cfg.nan_policy,
        log_every=cfg.logger.log_every, checkpoint_every=cfg.checkpoint.every, keep_all=cfg.checkpoint.keep_all,
        warmup_epochs=cfg.lr.warmup_epochs, lr_kind=cfg.lr.kind, min_lr_ratio=cfg.lr.min_lr_ratio,
        milestones=tuple(cfg.lr.milestones), gamma=cfg.lr.gamma,
    )


def quant_label(cfg: DictConfig) -> str:
    q = cfg.quant
    if q is None:
        return "none (fp32)"
    grad = f"{q.grad} dx{q.bits_dx} / {q.grad_dw} dw{q.bits_dw}" if q.grad else "fp32 gradients (STE)"
    return f"{q.name}: w{q.bits_w} a{q.bits_a}, {grad}"


def run_train(cfg: DictConfig, out_dir: Path) -> dict:
    """Train as configured, writing everything into out_dir; returns the summary.

    skip_done=true returns the summary of a finished run in out_dir (a re-run sweep skips done
    jobs); trainer.distributed=true runs as one DDP rank under torchrun (training/distributed.py).
    """
    validate_train(cfg)
    if cfg.skip_done and (done := done_summary(out_dir)) is not None:
        print(f"skip: {out_dir} already holds summary.json (skip_done=true)")
        return done
    dist = setup_processes(cfg.trainer.distributed, cfg.device)
    try:
        return _train(cfg, dist.shared_dir(out_dir), dist)
    finally:
        dist.close()


def _train(cfg: DictConfig, out_dir: Path, dist: SingleProcess) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    console = make_console()
    choices = hydra_choices()
    device = dist.device or pick_device(cfg.device)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)

    bundle = instantiate(cfg.dataset)
    model = build_model(cfg, bundle)
    noise = NoiseContext(seed=dist.noise_seed(cfg.seed))
    report = quantize_model(cfg, model, noise)
    if not dist.is_main:
        cfg.variance.every = 0  # DDP: the gradient-variance probe runs on rank 0 only
    hooks = build_hooks(cfg, model, bundle, noise)
    model.to(device)
    optimizer = instantiate(cfg.optim)(params=model.parameters())
    model_name = choices.get("model") or str(cfg.model._target_).rsplit(".", 1)[-1].lower()

    ckpt = None
    if cfg.resume:
        path = out_dir / "last.pt"
        if not path.is_file():
            raise CheckpointError(f"resume=true but {path} does not exist: pass hydra.run.dir=<the run folder "
                                  "to continue> (it holds last.pt)")
        ckpt = load_checkpoint(path)
        check_matches(ckpt, model, model_name, path)

    jsonl = JsonlLogger(out_dir / "metrics.jsonl") if dist.is_main else NullLogger()  # DDP: rank 0 logs
    if ckpt is None:
        jsonl.truncate(0)
    else:
        jsonl.truncate(ckpt.get("metrics_offset", 0))
    wandb = None
    if cfg.logger.wandb.mode != "disabled" and dist.is_main:
        w = cfg.logger.wandb
        wandb = WandbLogger(out_dir, w.mode, w.project, w.entity, list(w.tags),
                            OmegaConf.to_container(cfg, resolve=True), name=out_dir.name,
                            resume_id=ckpt.get("wandb_id") if ckpt else None)

    def log(record: dict) -> None:
        jsonl.log(record)
        if wandb is not None:
            wandb.log(record)

    trainer = Trainer(
        model, optimizer, bundle.train, bundle.test, loop_settings(cfg), out_dir, device, hooks, log,
        ProgressView(cfg.logger.progress if dist.is_main else "none", console),
        extra_state=lambda: {"metrics_offset": jsonl.offset(), "model_name": model_name,
                             "wandb_id": wandb.id if wandb else None},
        dist=dist,
    )
    if ckpt is not None:
        trainer.load_state(ckpt)
        console.print(f"resuming {out_dir} at epoch {trainer.state.epoch}, step {trainer.state.step}")
    try:
        state = trainer.fit()
    except Interrupted as e:
        jsonl.close()
        if wandb is not None:
            wandb.close()
        print(f"interrupted by signal {e.signum} at step {trainer.state.step}: checkpoint saved to "
              f"{trainer.last_checkpoint}; continue with: fqtrun train resume=true hydra.run.dir={out_dir} "
              "<the same overrides>", file=sys.stderr)
        sys.exit(128 + e.signum)

    summary = {
        "final_test_acc": state.last_acc,
        "best_test_acc": state.best_acc,
        "final_test_loss": state.last_test_loss,
        "final_train_loss": state.last_train_loss,
        "epochs": state.epoch,
        "steps": state.step,
        "skipped_steps": state.skipped_steps,
        "wall_time_s": round(state.wall_time_s, 3),
        "overrides": task_overrides(),
        "model": model_name,
        "dataset": choices.get("dataset") or str(cfg.dataset._target_).rsplit(".", 2)[-2],
        "quant": quant_label(cfg),
        "layers_quantized": report.converted if report else [],
        "layers_full_precision": report.kept if report else {},
        "layer_backends": backend_report(model) if cfg.quant is not None else {},
        "parameters": sum(p.numel() for p in model.parameters()),
        "device": str(device),
        "world_size": dist.world_size,
    }
    summary["bits_used"] = {}
    for h in hooks:
        summary.update(h.summary())
    jsonl.close()
    if dist.is_main and cfg.quant is not None and plot_bit_trace(out_dir / "metrics.jsonl", out_dir / "bit_trace.png"):
        summary["bit_trace"] = str(out_dir / "bit_trace.png")
    if not dist.is_main:
        return summary
    write_json(out_dir / "summary.json", summary)
    if wandb is not None:
        wandb.close(summary)
    _print_summary(console, summary, out_dir)
    return summary


def _print_summary(console, s: dict, out_dir: Path) -> None:
    rows = [
        ("model / dataset", f"{s['model']} / {s['dataset']}"),
        ("quantization", s["quant"]),
        ("bits used (last step)", " ".join(f"{k}={v}" for k, v in s["bits_used"].items()) or "fp32"),
        ("layers converted", f"{len(s['layers_quantized'])} (+{len(s['layers_full_precision'])} kept fp)"
         if s["layers_quantized"] or s["layers_full_precision"] else "none"),
        ("epochs / steps", f"{s['epochs']} / {s['steps']}"),
        ("final test acc", f"{s['final_test_acc']:.4f}"),
        ("best test acc", f"{s['best_test_acc']:.4f}"),
        ("final train loss", f"{s['final_train_loss']:.4f}"),
        ("wall time", f"{s['wall_time_s']:.1f} s"),
    ]
    if "sparsity" in s:
        sp = s["sparsity"]
        mean = sum(sp["density"].values()) / len(sp["density"])
        rows.insert(3, ("sparsity", f"{sp['kind']} {sp['n']}:{sp['m']} on {len(sp['density'])} layers, "
                                    f"density {mean:.3f}"))
    backends = s.get("layer_backends") or {}
    if any(v != "simulate" for v in backends.values()):
        n_int8 = sum(v == "int8" for v in backends.values())
        rows.insert(4, ("GEMM backend", f"int8 on {n_int8}/{len(backends)} layers (others: see summary.json)"))
    if "gbitops" in s:
        rows.append(("GBitOPs (savings)", f"{s['gbitops']:.1f} ({100 * s['bitops_savings']:.1f}%)"))
    console.print(summary_table("fqtrun train: summary", rows))
    console.print(f"outputs: {out_dir.resolve()}", soft_wrap=True)


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> None:
    run_reporting_errors(run_train, cfg)
