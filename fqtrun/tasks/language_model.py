"""Language modelling: next-token cross-entropy over every position, in nats, bits per token, bits per byte
and perplexity."""

from __future__ import annotations

import math

import torch
from torch import nn

from fqtrun.tasks.base import Task

Tensor = torch.Tensor


class LanguageModel(Task):
    """Output (B, T, vocab) logits, target (B, T) next tokens.

    A sample is one window: its loss is the mean over its T positions, so with windows of equal
    length the batch mean is the mean over tokens (nats per token) and the trainer's and DDP's
    per-sample bookkeeping applies unchanged. Metrics: loss (nats per token), bpc (bits per token:
    per character with the char tokenizer, per byte with the byte one), ppl = exp(loss), acc, the
    next-token accuracy (what the precision range test measures), and, given `token_bytes` (the UTF-8
    bytes each id stands for, from the data's tokenizer), bpb: bits per byte of the predicted text,
    total nats / (ln 2 * total bytes), which compares runs whatever their tokenizers.
    """

    headline = "loss"
    higher_is_better = False

    def __init__(self, label_smoothing: float = 0.0, token_bytes: Tensor | None = None):
        self.label_smoothing = float(label_smoothing)
        self.token_bytes = token_bytes  # (vocab,) int64, or None: bpb is not reported
        self._on: dict[torch.device, Tensor] = {}  # token_bytes on each device a batch came from

    def loss(self, output: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
        return _window_loss(output, target, self.label_smoothing, reduction)

    def eval_loss(self, output: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
        """Plain cross-entropy: label smoothing regularises training, it is not the validation loss."""
        return _window_loss(output, target, 0.0, reduction)

    def batch_sums(self, output: Tensor, target: Tensor) -> dict[str, float]:
        sums = {"correct": int((output.argmax(-1) == target).sum()), "tokens": target.numel()}
        if self.token_bytes is not None:
            table = self._on.get(target.device)
            if table is None:
                table = self._on[target.device] = self.token_bytes.to(target.device)
            sums["bytes"] = int(table[target].sum())
        return sums

    def metrics(self, loss_sum: float, sums: dict[str, float], n: int) -> dict[str, float]:
        loss = loss_sum / max(n, 1)  # nats per token: every window has the same number of tokens
        out = {"loss": loss, "bpc": loss / math.log(2), "ppl": math.exp(loss) if loss < 700 else math.inf,
               "acc": sums.get("correct", 0) / max(sums.get("tokens", 0), 1)}
        if sums.get("bytes"):
            out["bpb"] = loss * sums["tokens"] / (math.log(2) * sums["bytes"])
        return out

    def random_batch(self, n, input_shape, num_classes, generator):
        """Uniform token windows and uniform next tokens (num_classes = the vocabulary)."""
        return (torch.randint(0, num_classes, (n, *input_shape), generator=generator),
                torch.randint(0, num_classes, (n, *input_shape), generator=generator))


def _window_loss(output: Tensor, target: Tensor, label_smoothing: float, reduction: str) -> Tensor:
    """Cross-entropy per window (mean over its positions), then the mean or sum over the windows."""
    per_token = nn.functional.cross_entropy(output.transpose(1, 2), target, reduction="none",
                                            label_smoothing=label_smoothing)  # (B, T)
    per_window = per_token.mean(1)
    return per_window.mean() if reduction == "mean" else per_window.sum()
