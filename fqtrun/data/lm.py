"""What the language-model datasets share: next-token windows over token ids, and their bundle.

Windows come from a 1-D array of ids in memory, or a token file read window by window.

Training: an epoch is (n - 1) // block_size windows of block_size + 1 tokens, window i starting at a
random offset in [i * block_size, (i + 1) * block_size), a pure function of the loader's epoch seed
and i (data/loader.py, BatchDataset): every epoch covers the split about once at new offsets, the
same ones on a resume. Validation: consecutive non-overlapping windows, at most `most` of them
(evenly spaced), the same in every evaluation. A sample is (tokens t..t+T-1, tokens t+1..t+T).
Only the windows drawn are read, so a token file larger than RAM is never loaded.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import TensorDataset

from fqtrun.data.base import DataBundle
from fqtrun.data.loader import BatchDataset, sample_seed
from fqtrun.data.tokenizer import Tokenizer


@dataclass
class LanguageBundle(DataBundle):
    """Next-token windows (num_classes: the model's vocabulary; input_shape: (block_size,)) and the
    tokenizer that reads and writes their text (None when the ids came without one)."""

    tokenizer: Tokenizer | None
    task = "language_model"

    @property
    def block_size(self) -> int:
        return self.input_shape[0]

    def task_options(self) -> dict:
        """UTF-8 bytes per id, so the task reports bits per byte (none when the tokenizer's are unknown)."""
        table = self.tokenizer.token_bytes() if self.tokenizer is not None else None
        if table is None:
            return {}
        out = np.zeros(self.num_classes, dtype=np.int64)
        out[:len(table)] = table[:self.num_classes]
        return {"token_bytes": torch.from_numpy(out)}


class RandomWindows(BatchDataset):
    """An epoch of training windows: window i starts at a random offset in [i T, (i + 1) T)
    (sample_seed(seed, i) mod T, the last one clipped to the split)."""

    def __init__(self, tokens, block_size: int):
        self.tokens, self.block_size = tokens, block_size  # a 1-D integer array, or a TokenFile (read per window)
        self.last_start = len(tokens) - block_size - 1

    def __len__(self) -> int:
        return (len(self.tokens) - 1) // self.block_size

    def batch(self, indices: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(windows, their next tokens), each (len(indices), T) int64."""
        t = self.block_size
        starts = [min(i * t + sample_seed(seed, i) % t, self.last_start) for i in indices.tolist()]
        windows = torch.from_numpy(np.stack([self.tokens[s:s + t + 1] for s in starts]).astype(np.int64))  # (B, T + 1)
        return windows[:, :-1], windows[:, 1:]


def fixed_windows(tokens, block_size: int, most: int) -> TensorDataset:
    """Consecutive non-overlapping windows (x, next tokens), at most `most`, evenly spaced, as int64 tensors.

    tokens: a 1-D array, or anything sliced like one (data/token_files.TokenFile reads each window).
    """
    n = (len(tokens) - 1) // block_size
    starts = (np.arange(n) * block_size).tolist()
    if n > most:
        starts = [starts[i] for i in torch.linspace(0, n - 1, most).round().long().tolist()]  # torch's rounding
    windows = torch.from_numpy(np.stack([tokens[s:s + block_size + 1] for s in starts]).astype(np.int64))  # (n, T+1)
    return TensorDataset(windows[:, :-1].contiguous(), windows[:, 1:].contiguous())
