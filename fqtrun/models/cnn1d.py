"""The MNIST-1D paper's CNN (Greydanus 2020, ConvBase): three strided Conv1d + ReLU, then a linear head."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fqtrun.models import shape_of


def _conv_out(length: int, kernel: int, stride: int, pad: int) -> int:
    return (length + 2 * pad - kernel) // stride + 1


class CNN1D(nn.Module):
    """Conv1d(C,ch,5,s2,p1) -> Conv1d(ch,ch,3,s2,p1) -> Conv1d(ch,ch,3,s2,p1), ReLUs, flatten, Linear.

    Accepts input (L,) (one channel) or (C, L); with L=40, ch=25 the head sees 25*5 = 125 features.
    """

    def __init__(self, num_classes: int, input_shape: Sequence[int], channels: int = 25):
        super().__init__()
        shape = shape_of(input_shape, "cnn1d", (1, 2))
        in_ch, length = (1, shape[0]) if len(shape) == 1 else shape
        if channels < 1:
            raise ValueError(f"model.channels={channels} must be >= 1")
        for k in (5, 3, 3):
            length = _conv_out(length, k, 2, 1)
        if length < 1:
            raise ValueError(f"model=cnn1d: input length {shape[-1]} is too short for three stride-2 convs "
                             f"(need >= 6)")
        self.in_dims = len(shape)
        self.features = nn.Sequential(
            nn.Conv1d(in_ch, channels, 5, stride=2, padding=1), nn.ReLU(),
            nn.Conv1d(channels, channels, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv1d(channels, channels, 3, stride=2, padding=1), nn.ReLU(),
            nn.Flatten(),
        )
        self.head = nn.Linear(channels * length, int(num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_dims == 1:
            x = x.unsqueeze(1)  # (B, L) -> (B, 1, L)
        return self.head(self.features(x))
