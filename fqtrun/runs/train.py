"""One training run from its config: assemble it, attach the loggers, resume, fit, summarize.

`run_training(cfg, out_dir)` is what `fqtrun train`, sweeps and `fqtrun reproduce` call; it writes
metrics.jsonl, summary.json, last.pt, bit_trace.png and an offline wandb run into out_dir and
returns the summary. It never changes cfg and reads no global state: the command passes the
overrides and config-group choices it was started with (they label the run).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from fqtrun.build import DEFAULT_HOOKS, assemble, check_checkpoint, model_name, pick_device
from fqtrun.config import validate_train
from fqtrun.errors import CheckpointError, FqtrunError
from fqtrun.files import atomic_open, write_json
from fqtrun.numerics_mode import machine_info, portable_scope
from fqtrun.precision.trace_plot import plot_bit_trace
from fqtrun.quant.backends import backend_report
from fqtrun.quant.recipe import recipe_label
from fqtrun.training.checkpoint import load_checkpoint
from fqtrun.training.distributed import NullLogger, SingleProcess
from fqtrun.training.hooks import HookSpec
from fqtrun.training.loggers import JsonlLogger, ProgressView, WandbLogger, make_console
from fqtrun.training.processes import setup as setup_processes
from fqtrun.training.processes import strategy_of
from fqtrun.training.trainer import Interrupted, LoopSettings, Trainer

BOOKKEEPING = ("skip_done=", "resume=")  # overrides that do not change what a run computes


def finished_summary(out_dir: Path, overrides: Sequence[str]) -> dict | None:
    """The summary of a finished run in out_dir made with these overrides, or None when there is none.

    The one rule for "already done" (skip_done=true, experiment grids): a summary.json with other
    overrides is refused, since a re-run sweep numbers its jobs in the same order only when it has
    the same overrides (and the same hydra.sweep.dir); an unreadable one means "run again".
    """
    path = out_dir / "summary.json"
    if not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    theirs = sorted(o for o in summary.get("overrides", []) if not o.startswith(BOOKKEEPING))
    ours = sorted(o for o in overrides if not o.startswith(BOOKKEEPING))
    if set(ours) - set(theirs) == {"numerics.portable=true"} and set(theirs) <= set(ours):
        raise FqtrunError(f"{out_dir} holds a finished run with native numerics: pass numerics.portable=false "
                          "to reuse it, or pick a new output folder to train it portable")
    if theirs != ours:
        raise FqtrunError(f"{out_dir} holds a finished run with other overrides ({' '.join(theirs) or 'none'}): "
                          "re-run with the same overrides, or pick a new output folder")
    return summary


@portable_scope
def run_training(cfg: DictConfig, out_dir: Path, overrides: Sequence[str] = (),
                 choices: Mapping[str, str] | None = None,
                 hook_specs: Sequence[HookSpec] = DEFAULT_HOOKS) -> dict:
    """Train as configured, writing everything into out_dir; returns the summary.

    skip_done=true returns the summary of a finished run in out_dir (a re-run sweep skips done
    jobs); trainer.strategy=ddp|fsdp runs as one rank under torchrun (training/distributed.py, fsdp.py).
    Interrupted (SIGTERM, Ctrl-C) propagates after last.pt is saved.
    """
    validate_train(cfg, overrides)
    if cfg.skip_done and (done := finished_summary(out_dir, overrides)) is not None:
        print(f"skip: {out_dir} already holds summary.json (skip_done=true)")
        return done
    dist = setup_processes(strategy_of(cfg), cfg.device)
    try:
        return _train(cfg, dist.shared_dir(out_dir), dist, list(overrides), dict(choices or {}), hook_specs)
    finally:
        dist.close()


def _loop_settings(cfg: DictConfig) -> LoopSettings:
    return LoopSettings(
        epochs=cfg.epochs, batch_size=cfg.batch_size, eval_batch_size=cfg.eval_batch_size, seed=cfg.seed,
        grad_clip=cfg.grad_clip, nan_policy=cfg.nan_policy, log_every=cfg.logger.log_every,
        checkpoint_every=cfg.checkpoint.every, keep_all=cfg.checkpoint.keep_all,
        max_steps=cfg.trainer.max_steps, eval_every=cfg.trainer.eval_every, compile=cfg.trainer.compile,
    )


def _train(cfg: DictConfig, out_dir: Path, dist: SingleProcess, overrides: list[str], choices: dict,
           hook_specs: Sequence[HookSpec]) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    console = make_console()
    device = dist.device or pick_device(cfg.device)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    ckpt = None
    if cfg.resume:  # read first: the data reuses the checkpoint's tokenizer
        path = out_dir / "last.pt"
        if not path.is_file():
            raise CheckpointError(f"resume=true but {path} does not exist: pass hydra.run.dir=<the run folder "
                                  "to continue> (it holds last.pt)")
        ckpt = load_checkpoint(path)
    run = assemble(cfg, device, dist.noise_seed(cfg.seed), dist.is_main, hook_specs, resuming=ckpt)
    model, name = run.model, model_name(cfg, choices)
    if ckpt is not None:
        check_checkpoint(ckpt, model, run.bundle, name, out_dir / "last.pt")
    tokenizer = run.bundle.tokenizer_json()  # a trained tokenizer stays with the run and its checkpoints
    if tokenizer is not None and dist.is_main:
        with atomic_open(out_dir / "tokenizer.json", "w", encoding="utf-8") as f:
            f.write(tokenizer)

    jsonl = JsonlLogger(out_dir / "metrics.jsonl") if dist.is_main else NullLogger()  # DDP: rank 0 logs
    jsonl.truncate(0 if ckpt is None else ckpt.get("metrics_offset", 0))
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
        model, run.optimizer, run.task, run.bundle.train, run.bundle.test, _loop_settings(cfg), out_dir, device,
        run.hooks, log, ProgressView(cfg.logger.progress if dist.is_main else "none", console), run.lr_at,
        extra_state=lambda: {"metrics_offset": jsonl.offset(), "model_name": name,
                             "wandb_id": wandb.id if wandb else None, "data": run.bundle.signature(),
                             **({"tokenizer": tokenizer} if tokenizer is not None else {})},
        dist=dist,
    )
    if ckpt is not None:
        trainer.load_state(ckpt)
        trainer.last_checkpoint = out_dir / "last.pt"  # the last good one, until the trainer writes another
        console.print(f"resuming {out_dir} at epoch {trainer.state.epoch}, step {trainer.state.step}")
    try:
        state = trainer.fit()
    except (Interrupted, FqtrunError):  # a signal, or a stop (non-finite values): close what was written
        jsonl.close()
        if wandb is not None:
            wandb.close()
        raise

    headline = f"final_test_{run.task.headline}"
    summary = {
        **{f"final_test_{k}": v for k, v in state.last_eval.items()},
        headline: state.last_eval.get(run.task.headline, float("nan")),
        f"best_test_{run.task.headline}": float("nan") if state.best is None else state.best,
        "headline": run.task.headline,
        "final_train_loss": state.last_train_loss,
        "epochs": state.epoch,
        "steps": state.step,
        "skipped_steps": state.skipped_steps,
        "wall_time_s": round(state.wall_time_s, 3),
        "overrides": overrides,
        "model": name,
        "dataset": choices.get("dataset") or str(cfg.dataset._target_).rsplit(".", 2)[-2],
        **({"data": facts} if (facts := run.bundle.facts()) else {}),
        "quant": recipe_label(run.recipe),
        "layers_quantized": run.report.converted if run.report else [],
        "layers_full_precision": run.report.kept if run.report else {},
        "layer_backends": backend_report(model) if run.recipe is not None else {},
        "parameters": sum(p.numel() for p in model.parameters()),
        "device": str(device),
        "world_size": dist.world_size,
        "machine": machine_info(cfg.numerics.portable),
        "bits_used": {},
    }
    for h in run.hooks:
        summary.update(h.summary())
    jsonl.close()
    if dist.is_main and run.recipe is not None and plot_bit_trace(out_dir / "metrics.jsonl",
                                                                  out_dir / "bit_trace.png"):
        summary["bit_trace"] = str(out_dir / "bit_trace.png")
    if not dist.is_main:
        return summary
    write_json(out_dir / "summary.json", summary)
    if wandb is not None:
        wandb.close(summary)
    return summary
