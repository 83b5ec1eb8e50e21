"""The interface the trainer, the analyses and the commands use to turn model outputs into losses."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from fqtrun.data.loader import make_loader

Tensor = torch.Tensor


class Task:
    """A training objective with its metrics.

    `loss(output, target, reduction)` is what the optimizer minimises; `batch_sums(output, target)`
    gives additive counts (e.g. correct predictions) that `metrics(sums, n)` turns into the train
    record; `evaluate(model, dataset, batch_size, device)` gives the evaluation record.
    `headline` is the evaluation metric summaries and reports lead with; `higher_is_better` says
    which way "best" goes.
    """

    headline: str = "acc"
    higher_is_better: bool = True

    def loss(self, output: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
        raise NotImplementedError

    def eval_loss(self, output: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
        """The loss evaluation reports (the training loss unless a task regularises it)."""
        return self.loss(output, target, reduction)

    def batch_sums(self, output: Tensor, target: Tensor) -> dict[str, float]:
        return {}

    def metrics(self, loss_sum: float, sums: dict[str, float], n: int) -> dict[str, float]:
        """The record of n samples from their summed loss and batch_sums."""
        return {"loss": loss_sum / max(n, 1)}

    def evaluate(self, model: nn.Module, dataset, batch_size: int, device: torch.device) -> dict[str, float]:
        """Evaluation metrics over the whole dataset in eval mode (the caller restores the mode)."""
        model.eval()
        loss_sum, sums, n = 0.0, {}, 0
        with torch.no_grad():
            for out, y in outputs(model, dataset, batch_size, device):
                loss_sum += self.eval_loss(out, y, reduction="sum").item()
                for k, v in self.batch_sums(out, y).items():
                    sums[k] = sums.get(k, 0) + v
                n += len(y)
        return self.metrics(loss_sum, sums, n)

    def random_batch(self, n: int, input_shape: tuple[int, ...], num_classes: int,
                     generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """n random (input, target) pairs of this task's form: what a benchmark times a model on."""
        raise NotImplementedError

    def better(self, new: float, best: float | None) -> bool:
        return best is None or (new > best if self.higher_is_better else new < best)


def outputs(model: nn.Module, dataset, batch_size: int, device: torch.device) -> Iterator[tuple[Tensor, Tensor]]:
    """(model output, target) per batch of the dataset, in order (no shuffling)."""
    for x, y in make_loader(dataset, batch_size, shuffle=False, seed=0):
        x, y = x.to(device), y.to(device)
        yield model(x), y
