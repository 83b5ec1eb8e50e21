"""The training loop: steps over epochs, evaluation, checkpoints, resume, signals, stop rules.

Read top to bottom: `fit` -> `_train_epoch` -> `_step`. How a batch becomes a loss and metrics
comes from `task` (fqtrun/tasks); everything technique-specific comes in through `hooks`
(training/hooks.py); the learning rate is a pure `lr_at(step)`; everything that leaves comes
out through `log`.
"""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from fqtrun.data.loader import make_loader
from fqtrun.errors import CheckpointError, TrainingError
from fqtrun.quant.backends.base import RunRecord
from fqtrun.quant.grid import mix_seed
from fqtrun.quant.numerics import NonFiniteError
from fqtrun.training.compiled import compiled_model
from fqtrun.training.distributed import SingleProcess
from fqtrun.training.hooks import Hook


@dataclass
class TrainState:
    """Where the run is; saved in every checkpoint."""

    epoch: int = 0  # epochs completed
    batch: int = 0  # batches done in the current epoch
    step: int = 0  # global optimizer steps taken (including skipped NaN steps)
    best: float | None = None  # best evaluation value of the task's headline metric
    last_eval: dict = field(default_factory=dict)  # the last evaluation's metrics
    last_train_loss: float = float("nan")
    skipped_steps: int = 0
    wall_time_s: float = 0.0
    window_loss: float = 0.0  # train loss and task sums accumulated since the last train record
    window_sums: dict = field(default_factory=dict)
    window_n: int = 0


@dataclass
class LoopSettings:
    epochs: int
    batch_size: int
    eval_batch_size: int
    seed: int
    grad_clip: float = 0.0
    nan_policy: str = "stop"
    log_every: int = 10
    checkpoint_every: int = 1  # epochs (or evaluations, when eval_every > 0) between checkpoints
    keep_all: bool = False
    max_steps: int | None = None  # stop after this many steps (None: epochs x steps per epoch)
    eval_every: int = 0  # steps between evaluations; 0: at the end of every epoch
    save: bool = True  # write checkpoints (a precision range test does not)
    compile: bool = False  # torch.compile the model's forward and backward (trainer.compile)


class Interrupted(Exception):
    def __init__(self, signum: int):
        self.signum = signum


class Trainer:
    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, task, train_set, test_set,
                 settings: LoopSettings, out_dir: Path, device: torch.device, hooks: list[Hook],
                 log: Callable[[dict], None], progress, lr_at: Callable[[int], float],
                 extra_state: Callable[[], dict] | None = None, dist: SingleProcess | None = None):
        self.model, self.optimizer, self.task = model, optimizer, task
        self.train_set, self.test_set = train_set, test_set
        self.s = settings
        self.out_dir = Path(out_dir)
        self.device = device
        self.hooks = hooks
        self.log = log
        self.progress = progress
        self.lr_at = lr_at
        self.extra_state = extra_state or (lambda: {})
        self.state = TrainState()
        self.base_lrs = [g["lr"] for g in optimizer.param_groups]
        self.steps_per_epoch = steps_per_epoch(train_set, settings.batch_size)
        by_epochs = self.steps_per_epoch * settings.epochs
        self.total_steps = by_epochs if settings.max_steps is None else settings.max_steps
        self.last_checkpoint: Path | None = None
        self._signal: int | None = None
        self._stop = False
        # DDP, FSDP (training/distributed.py, fsdp.py): sharded loader, wrapped or sharded model (FSDP: and
        # an optimizer over the shards), global loss; rank 0 logs
        self.dist = dist or SingleProcess()
        self.train_model, self.optimizer = self.dist.prepare(model, optimizer)
        self.step_model = compiled_model(self.train_model) if settings.compile else self.train_model
        self._records = [m.record for m in model.modules() if isinstance(getattr(m, "record", None), RunRecord)]

    # ----- state ---------------------------------------------------------------------------
    def run_state(self) -> dict:
        """What a checkpoint holds besides the model and optimizer (self.dist.save writes those)."""
        return {
            "train_state": asdict(self.state),
            "hooks": [h.state_dict() for h in self.hooks],
            "torch_rng": torch.get_rng_state(),
            **self.extra_state(),
        }

    def load_state(self, ckpt: dict) -> None:
        self.dist.load(ckpt, self.out_dir / "last.pt", self.model, self.optimizer)
        try:
            self.state = TrainState(**ckpt["train_state"])
        except TypeError:
            raise CheckpointError("the checkpoint's training state was written by another fqtrun version: "
                                  "start a new run (or resume with the version that wrote it)") from None
        for hook, hs in zip(self.hooks, ckpt.get("hooks", [])):
            hook.load_state_dict(hs)
        torch.set_rng_state(ckpt["torch_rng"])

    def save(self, name: str = "last.pt") -> Path:
        if not self.s.save:
            return self.out_dir / name
        written = self.dist.save(self.out_dir / name, self.model, self.optimizer, self.run_state)
        if written is not None:  # DDP, FSDP: rank 0 writes the file (FSDP: every rank its shards)
            self.last_checkpoint = written
        return self.out_dir / name

    # ----- the loop ------------------------------------------------------------------------
    def fit(self) -> TrainState:
        """Train from the current state to the last step; SIGTERM/SIGINT save and raise Interrupted."""
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        epochs = -(-self.total_steps // self.steps_per_epoch)
        self.progress.start(self.progress_total(), self.steps_per_epoch, *self.progress_at())
        try:
            while self.state.step < self.total_steps and not self._stop:
                self._train_epoch()
                if self.state.batch == self.steps_per_epoch:  # a whole epoch (not a stop mid-epoch)
                    self.state.epoch += 1
                    self.state.batch = 0
                    if self.s.eval_every == 0:
                        self._evaluate_and_log()
                        self._checkpoint(self.state.epoch, epochs)
            if self.state.batch and self.s.eval_every == 0:  # ended mid-epoch (max_steps or a stop rule)
                self._evaluate_and_log()
                self.save()
        finally:
            self.progress.stop()
            for s, h in old.items():
                signal.signal(s, h)
        return self.state

    def _checkpoint(self, count: int, last: int) -> None:
        """Save after evaluation number `count` (epochs, or evaluations when eval_every > 0)."""
        every = self.s.checkpoint_every
        if count == last or self.state.step >= self.total_steps or (every > 0 and count % every == 0):
            self.save()
            if self.s.keep_all:
                self.save(f"epoch_{count:04d}.pt" if self.s.eval_every == 0 else f"step_{self.state.step:07d}.pt")

    def _on_signal(self, signum, frame) -> None:
        self._signal = signum  # acted on between steps, so the saved state is consistent

    def _train_epoch(self) -> None:
        s, st = self.s, self.state
        self.model.train()
        loader = self.dist.loader(self.train_set, s.batch_size, seed=mix_seed(s.seed, st.epoch),
                                  skip_batches=st.batch)
        t0 = time.perf_counter()
        for x, y in loader:
            loss, sums, n, batch = self._step(x.to(self.device, non_blocking=True),
                                              y.to(self.device, non_blocking=True))
            st.batch += 1
            st.step += 1
            if loss is not None:
                st.window_loss += loss * n
                for k, v in sums.items():
                    st.window_sums[k] = st.window_sums.get(k, 0) + v
                st.window_n += n
            extra = {}
            for h in self.hooks:
                extra.update(h.after_step(st.step, batch))
            if st.step % s.log_every == 0 and st.window_n:
                self._log_train(extra)
            bits = " ".join(f"{k[5:]}{v}" for k, v in extra.items() if k.startswith("bits_"))
            self.progress.step(st.batch, f"loss {st.last_train_loss:.4f} {bits}".rstrip())
            self._stop = any(h.wants_stop() for h in self.hooks)
            done = self._stop or st.step >= self.total_steps
            if s.eval_every > 0 and (st.step % s.eval_every == 0 or done):
                st.wall_time_s += time.perf_counter() - t0
                self._evaluate_and_log()
                self._checkpoint(st.step // s.eval_every + (st.step % s.eval_every > 0),
                                 -(-self.total_steps // s.eval_every))
                t0 = time.perf_counter()
            if self.dist.any(self._signal is not None):  # DDP: a signal on any rank stops all
                st.wall_time_s += time.perf_counter() - t0
                self.save()
                raise Interrupted(self._signal or signal.SIGTERM)
            if done:
                break
        st.wall_time_s += time.perf_counter() - t0

    def _step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float | None, dict, int, dict]:
        """One optimizer step: (the global batch's loss or None if skipped, task sums, size, batch metrics)."""
        s, st = self.s, self.state
        factor = self.lr_at(st.step)
        for g, base in zip(self.optimizer.param_groups, self.base_lrs):
            g["lr"] = base * factor
        for h in self.hooks:
            h.before_step(st.step)
        # a numerics-probe step measures inside the quantized layers: eager, as the probe writes Python objects
        eager = self.step_model is self.train_model or any(r.probe for r in self._records)
        try:  # a quantizer meeting NaN/inf in a layer's input, weights or dY raises NonFiniteError
            loss, value, sums, n, batch = self._forward_backward(self.train_model if eager else self.step_model, x, y)
        except NonFiniteError as err:
            self.optimizer.zero_grad(set_to_none=True)  # a backward stopped midway leaves partial gradients
            if not eager:  # compiled ops cannot say where: the same step eager (the same noise) names the layer
                err = self._eager_error(x, y) or err
            return self._non_finite(str(err), "lower optim.lr, check the data for NaN/inf", {})
        if loss is None:
            return self._non_finite(f"loss is {value}", "lower optim.lr, raise the bits", batch)
        for h in self.hooks:
            h.after_backward(st.step)
        if s.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.model.parameters(), s.grad_clip)
        self.optimizer.step()
        st.last_train_loss = value
        return value, sums, n, batch

    def _forward_backward(self, model: Callable, x: torch.Tensor, y: torch.Tensor) -> tuple:
        """(loss or None when not finite, its value, task sums, size, batch metrics), gradients in place."""
        s, st = self.s, self.state
        out = model(x)
        global_n = min(s.batch_size, len(self.train_set) - st.batch * s.batch_size)  # this step's batch
        loss, value, sums, n = self.dist.batch_loss(self.task, out, y, global_n)
        batch = {**self.task.metrics(value * n, sums, n), "loss": value}
        self.optimizer.zero_grad(set_to_none=True)
        if not math.isfinite(value):
            return None, value, sums, n, batch
        loss.backward()
        return loss, value, sums, n, batch

    def _eager_error(self, x: torch.Tensor, y: torch.Tensor) -> NonFiniteError | None:
        """The NonFiniteError of this step run eager (it names the layer and slot), or None if none comes."""
        try:
            self._forward_backward(self.train_model, x, y)
        except NonFiniteError as err:
            return err
        finally:
            self.optimizer.zero_grad(set_to_none=True)
        return None

    def _non_finite(self, what: str, fix: str, batch: dict) -> tuple[None, dict, int, dict]:
        """nan_policy on a step that met NaN/inf: skip (count it, no optimizer step) or stop with one line
        naming the step as metrics.jsonl numbers it (1-based)."""
        st = self.state
        if self.s.nan_policy == "skip":
            st.skipped_steps += 1
            return None, {}, 0, batch
        raise TrainingError(f"{what} at step {st.step + 1} (epoch {st.epoch}); last good checkpoint: "
                            f"{self.last_checkpoint or 'none written yet'}; {fix}, or set nan_policy=skip")

    def _log_train(self, extra: dict) -> None:
        st = self.state
        metrics = self.task.metrics(st.window_loss, st.window_sums, st.window_n)
        self.log({"step": st.step, "epoch": st.epoch, "split": "train", **metrics,
                  "lr": self.optimizer.param_groups[0]["lr"], **extra})
        st.window_loss, st.window_sums, st.window_n = 0.0, {}, 0

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """The task's evaluation metrics on the test split, with the hooks' stated evaluation settings."""
        for h in self.hooks:
            h.before_eval()
        was_training = self.model.training
        try:
            metrics = self.task.evaluate(self.model, self.test_set, self.s.eval_batch_size, self.device)
        except NonFiniteError as err:  # no step to skip: evaluation stops under either nan_policy
            raise TrainingError(f"{err} while evaluating after step {self.state.step}; last good checkpoint: "
                                f"{self.last_checkpoint or 'none written yet'}; lower optim.lr (the weights "
                                "may have blown up) or check the data for NaN/inf") from None
        self.model.train(was_training)
        for h in self.hooks:
            h.after_eval()
        return metrics

    def _evaluate_and_log(self) -> None:
        if self.test_set is None:  # e.g. the precision range test: training only
            return
        st = self.state
        metrics = self.evaluate()
        st.last_eval = metrics
        value = metrics[self.task.headline]
        if self.task.better(value, st.best):
            st.best = value
        self.log({"step": st.step, "epoch": st.epoch, "split": "test", **metrics})
        shown = "  ".join(f"test {k} {v:.4f}" for k, v in metrics.items())
        done, unit = self.progress_at()
        self.progress.epoch(done, self.progress_total(), f"train loss {st.last_train_loss:.4f}  {shown}", unit)

    def progress_total(self) -> int:
        return -(-self.total_steps // self.steps_per_epoch) if self.s.eval_every == 0 else self.total_steps

    def progress_at(self) -> tuple[int, str]:
        """(units done, unit): epochs, or steps when the run evaluates every trainer.eval_every steps."""
        return (self.state.step, "step") if self.s.eval_every > 0 else (self.state.epoch, "epoch")


def steps_per_epoch(train_set, batch_size: int) -> int:
    """Optimizer steps per epoch (the last batch may be partial)."""
    return len(make_loader(train_set, batch_size, shuffle=False, seed=0))
