"""The training loop: epochs of steps, evaluation every epoch, checkpoints, resume, signals.

Read top to bottom: `fit` -> `_train_epoch` -> `_step`. Everything technique-specific comes
in through `hooks` (training/hooks.py); everything that leaves comes out through `log`.
"""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from fqtrun.data.loader import make_loader
from fqtrun.errors import TrainingError
from fqtrun.quant.grid import mix_seed
from fqtrun.training.checkpoint import model_signature, save_checkpoint
from fqtrun.training.distributed import SingleProcess
from fqtrun.training.hooks import Hook
from fqtrun.training.lr import lr_factor


@dataclass
class TrainState:
    """Where the run is; saved in every checkpoint."""

    epoch: int = 0  # epochs completed
    batch: int = 0  # batches done in the current epoch
    step: int = 0  # global optimizer steps taken (including skipped NaN steps)
    best_acc: float = 0.0
    last_acc: float = float("nan")
    last_test_loss: float = float("nan")
    last_train_loss: float = float("nan")
    skipped_steps: int = 0
    wall_time_s: float = 0.0
    window_loss: float = 0.0  # train loss/acc accumulated since the last train record
    window_correct: int = 0
    window_n: int = 0


@dataclass
class LoopSettings:
    epochs: int
    batch_size: int
    eval_batch_size: int
    seed: int
    label_smoothing: float = 0.0
    grad_clip: float = 0.0
    nan_policy: str = "stop"
    log_every: int = 10
    checkpoint_every: int = 1
    keep_all: bool = False
    warmup_epochs: float = 0.0
    lr_kind: str = "cosine"
    min_lr_ratio: float = 0.0
    milestones: tuple[float, ...] = ()
    gamma: float = 0.1


class Interrupted(Exception):
    def __init__(self, signum: int):
        self.signum = signum


class Trainer:
    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, train_set, test_set,
                 settings: LoopSettings, out_dir: Path, device: torch.device, hooks: list[Hook],
                 log: Callable[[dict], None], progress, extra_state: Callable[[], dict] | None = None,
                 dist: SingleProcess | None = None):
        self.model, self.optimizer = model, optimizer
        self.train_set, self.test_set = train_set, test_set
        self.s = settings
        self.out_dir = Path(out_dir)
        self.device = device
        self.hooks = hooks
        self.log = log
        self.progress = progress
        self.extra_state = extra_state or (lambda: {})
        self.state = TrainState()
        self.base_lrs = [g["lr"] for g in optimizer.param_groups]
        self.steps_per_epoch = len(make_loader(train_set, settings.batch_size, shuffle=True, seed=0))
        self.total_steps = self.steps_per_epoch * settings.epochs
        self.last_checkpoint: Path | None = None
        self._signal: int | None = None
        # DDP (training/distributed.py): sharded loader, wrapped model, global loss; rank 0 saves
        self.dist = dist or SingleProcess()
        self.train_model = self.dist.wrap(model)

    # ----- state ---------------------------------------------------------------------------
    def checkpoint_state(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "train_state": asdict(self.state),
            "hooks": [h.state_dict() for h in self.hooks],
            "torch_rng": torch.get_rng_state(),
            "signature": model_signature(self.model),
            **self.extra_state(),
        }

    def load_state(self, ckpt: dict) -> None:
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.state = TrainState(**ckpt["train_state"])
        for hook, hs in zip(self.hooks, ckpt.get("hooks", [])):
            hook.load_state_dict(hs)
        torch.set_rng_state(ckpt["torch_rng"])

    def save(self, name: str = "last.pt") -> Path:
        if not self.dist.is_main:  # DDP: only rank 0 writes checkpoints
            return self.out_dir / name
        self.last_checkpoint = save_checkpoint(self.out_dir / name, self.checkpoint_state())
        return self.last_checkpoint

    # ----- the loop ------------------------------------------------------------------------
    def fit(self) -> TrainState:
        """Train from the current state to the last epoch; SIGTERM/SIGINT save and raise Interrupted."""
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        self.progress.start(self.s.epochs, self.steps_per_epoch, self.state.epoch)
        try:
            while self.state.epoch < self.s.epochs:
                self._train_epoch()
                self.state.epoch += 1
                self.state.batch = 0
                self._evaluate_and_log()
                every = self.s.checkpoint_every
                if self.state.epoch == self.s.epochs or (every > 0 and self.state.epoch % every == 0):
                    self.save()
                    if self.s.keep_all:
                        self.save(f"epoch_{self.state.epoch:04d}.pt")
        finally:
            self.progress.stop()
            for s, h in old.items():
                signal.signal(s, h)
        return self.state

    def _on_signal(self, signum, frame) -> None:
        self._signal = signum  # acted on between steps, so the saved state is consistent

    def _train_epoch(self) -> None:
        s, st = self.s, self.state
        self.model.train()
        loader = self.dist.loader(self.train_set, s.batch_size, seed=mix_seed(s.seed, st.epoch),
                                  skip_batches=st.batch)
        t0 = time.perf_counter()
        for x, y in loader:
            loss, correct, n = self._step(x.to(self.device, non_blocking=True),
                                          y.to(self.device, non_blocking=True))
            st.batch += 1
            st.step += 1
            if loss is not None:
                st.window_loss += loss * n
                st.window_correct += correct
                st.window_n += n
            extra = {}
            for h in self.hooks:
                extra.update(h.after_step(st.step))
            if st.step % s.log_every == 0 and st.window_n:
                self._log_train(extra)
            bits = " ".join(f"{k[5:]}{v}" for k, v in extra.items() if k.startswith("bits_"))
            self.progress.step(st.batch, f"loss {st.last_train_loss:.4f} {bits}".rstrip())
            if self.dist.any(self._signal is not None):  # DDP: a signal on any rank stops all
                st.wall_time_s += time.perf_counter() - t0
                self.save()
                raise Interrupted(self._signal or signal.SIGTERM)
        st.wall_time_s += time.perf_counter() - t0

    def _step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float | None, int, int]:
        """One optimizer step; returns the (global) batch's loss, correct count and size."""
        s, st = self.s, self.state
        for g, base in zip(self.optimizer.param_groups, self.base_lrs):
            g["lr"] = base * lr_factor(st.step, self.total_steps, round(s.warmup_epochs * self.steps_per_epoch),
                                       s.lr_kind, s.min_lr_ratio, s.milestones, s.gamma)
        for h in self.hooks:
            h.before_step(st.step)
        logits = self.train_model(x)
        global_n = min(s.batch_size, len(self.train_set) - st.batch * s.batch_size)  # this step's batch
        loss, value, correct, n = self.dist.batch_loss(logits, y, s.label_smoothing, global_n)
        self.optimizer.zero_grad(set_to_none=True)
        if not math.isfinite(value):
            if s.nan_policy == "skip":
                st.skipped_steps += 1
                return None, 0, 0
            where = self.last_checkpoint or "none written yet"
            raise TrainingError(f"loss is {value} at step {st.step} (epoch {st.epoch}); last good checkpoint: "
                                f"{where}; lower optim.lr, raise the bits, or set nan_policy=skip")
        loss.backward()
        for h in self.hooks:
            h.after_backward(st.step)
        if s.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.model.parameters(), s.grad_clip)
        self.optimizer.step()
        st.last_train_loss = value
        return value, correct, n

    def _log_train(self, extra: dict) -> None:
        st = self.state
        self.log({"step": st.step, "epoch": st.epoch, "split": "train", "loss": st.window_loss / st.window_n,
                  "acc": st.window_correct / st.window_n, "lr": self.optimizer.param_groups[0]["lr"], **extra})
        st.window_loss, st.window_correct, st.window_n = 0.0, 0, 0

    @torch.no_grad()
    def evaluate(self) -> tuple[float, float]:
        """Test loss and accuracy, with the hooks' stated evaluation settings."""
        for h in self.hooks:
            h.before_eval()
        was_training = self.model.training
        self.model.eval()
        total, correct, n = 0.0, 0, 0
        for x, y in make_loader(self.test_set, self.s.eval_batch_size, shuffle=False, seed=0):
            x, y = x.to(self.device), y.to(self.device)
            logits = self.model(x)
            total += nn.functional.cross_entropy(logits, y, reduction="sum").item()
            correct += int((logits.argmax(1) == y).sum())
            n += len(y)
        self.model.train(was_training)
        for h in self.hooks:
            h.after_eval()
        return total / max(n, 1), correct / max(n, 1)

    def _evaluate_and_log(self) -> None:
        st = self.state
        loss, acc = self.evaluate()
        st.last_acc, st.last_test_loss = acc, loss
        st.best_acc = max(st.best_acc, acc)
        self.log({"step": st.step, "epoch": st.epoch, "split": "test", "loss": loss, "acc": acc})
        self.progress.epoch(st.epoch, self.s.epochs,
                            f"train loss {st.last_train_loss:.4f}  test loss {loss:.4f}  test acc {acc:.4f}")
