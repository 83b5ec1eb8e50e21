"""Classification: cross-entropy over a label, accuracy."""

from __future__ import annotations

import torch
from torch import nn

from fqtrun.tasks.base import Task, outputs

Tensor = torch.Tensor


class Classification(Task):
    """Cross-entropy (with optional label smoothing) and top-1 accuracy."""

    headline = "acc"
    higher_is_better = True

    def __init__(self, label_smoothing: float = 0.0):
        self.label_smoothing = float(label_smoothing)

    def loss(self, output: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
        return nn.functional.cross_entropy(output, target, label_smoothing=self.label_smoothing,
                                           reduction=reduction)

    def eval_loss(self, output: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
        """Plain cross-entropy: label smoothing regularises training, it is not the test loss."""
        return nn.functional.cross_entropy(output, target, reduction=reduction)

    def batch_sums(self, output: Tensor, target: Tensor) -> dict[str, float]:
        return {"correct": int((output.argmax(-1) == target).sum())}

    def metrics(self, loss_sum: float, sums: dict[str, float], n: int) -> dict[str, float]:
        return {"loss": loss_sum / max(n, 1), "acc": sums.get("correct", 0) / max(n, 1)}

    def random_batch(self, n, input_shape, num_classes, generator):
        """Gaussian inputs and uniform labels."""
        return (torch.randn(n, *input_shape, generator=generator),
                torch.randint(0, num_classes, (n,), generator=generator))

    @torch.no_grad()
    def predict(self, model: nn.Module, dataset, batch_size: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """(predicted classes, labels) over the dataset, in order, in eval mode."""
        model.eval()
        preds, labels = [], []
        for out, y in outputs(model, dataset, batch_size, device):
            preds.append(out.argmax(-1))
            labels.append(y)
        return torch.cat(preds), torch.cat(labels)
