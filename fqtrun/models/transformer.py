"""A small pre-LN transformer encoder over patches of 1-D signals or images.

Attention is written with four explicit nn.Linear layers (q, k, v, out) rather than
nn.MultiheadAttention, whose packed in_proj weight the quantizer's module conversion cannot see.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fqtrun.models import shape_of


class Attention(nn.Module):
    """Multi-head self-attention from explicit q/k/v/out projections; causal=True masks the future."""

    def __init__(self, dim: int, heads: int, bias: bool = True, causal: bool = False, dropout: float = 0.0):
        super().__init__()
        self.heads, self.causal, self.dropout = heads, causal, dropout
        self.q, self.k, self.v = (nn.Linear(dim, dim, bias=bias) for _ in range(3))
        self.out = nn.Linear(dim, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape

        def split(y: torch.Tensor) -> torch.Tensor:  # (B, T, D) -> (B, h, T, D/h)
            return y.view(b, t, self.heads, d // self.heads).transpose(1, 2)

        y = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)),
                                           dropout_p=self.dropout if self.training else 0.0, is_causal=self.causal)
        return self.out(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    """x + attn(ln(x)), then x + mlp(ln(x)) with a GELU MLP of width mlp_ratio * dim (dropout on both branches)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, bias: bool = True, causal: bool = False,
                 dropout: float = 0.0):
        super().__init__()
        hidden = max(1, round(dim * mlp_ratio))
        self.ln1, self.attn = nn.LayerNorm(dim, bias=bias), Attention(dim, heads, bias, causal, dropout)
        self.ln2 = nn.LayerNorm(dim, bias=bias)
        self.fc1, self.fc2 = nn.Linear(dim, hidden, bias=bias), nn.Linear(hidden, dim, bias=bias)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x)))
        return x + self.drop(self.fc2(F.gelu(self.fc1(self.ln2(x)))))


class Patchify(nn.Module):
    """(B, L) / (B, C, L) / (B, C, H, W) -> (B, T, C*patch^k) tokens; zero-pads to a multiple of patch."""

    def __init__(self, shape: tuple[int, ...], patch: int):
        super().__init__()
        self.patch = patch
        self.spatial = shape if len(shape) == 1 else shape[1:]  # (L,) or (L,) or (H, W)
        self.channels = 1 if len(shape) == 1 else shape[0]
        self.in_dims = len(shape)
        self.grid = tuple(math.ceil(s / patch) for s in self.spatial)
        self.num_tokens = math.prod(self.grid)
        self.token_size = self.channels * patch ** len(self.spatial)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p, b = self.patch, x.shape[0]
        if self.in_dims == 1:
            x = x.unsqueeze(1)  # (B, 1, L)
        pads = [g * p - s for g, s in zip(self.grid, self.spatial)]
        x = F.pad(x, [v for pad in reversed(pads) for v in (0, pad)])
        if len(self.spatial) == 1:
            (t,) = self.grid  # (B, C, T*p) -> (B, T, C*p)
            return x.reshape(b, self.channels, t, p).permute(0, 2, 1, 3).reshape(b, t, -1)
        gh, gw = self.grid  # (B, C, gh*p, gw*p) -> (B, gh*gw, C*p*p)
        x = x.reshape(b, self.channels, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(b, gh * gw, -1)


class Transformer(nn.Module):
    """Patch embedding (Linear) + learned positions -> depth pre-LN blocks -> LN -> mean-pool -> Linear."""

    def __init__(self, num_classes: int, input_shape: Sequence[int], dim: int = 64, depth: int = 2,
                 heads: int = 4, mlp_ratio: float = 4.0, patch: int = 4):
        super().__init__()
        shape = shape_of(input_shape, "transformer", (1, 2, 3))
        for name, v in (("dim", dim), ("depth", depth), ("heads", heads), ("patch", patch)):
            if v < 1:
                raise ValueError(f"model.{name}={v} must be >= 1")
        if dim % heads:
            raise ValueError(f"model.dim={dim} must be divisible by model.heads={heads}")
        if mlp_ratio <= 0:
            raise ValueError(f"model.mlp_ratio={mlp_ratio} must be > 0")
        self.patchify = Patchify(shape, int(patch))
        self.embed = nn.Linear(self.patchify.token_size, dim)
        self.pos = nn.Parameter(torch.randn(1, self.patchify.num_tokens, dim) * 0.02)
        self.blocks = nn.Sequential(*(Block(dim, heads, mlp_ratio) for _ in range(depth)))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, int(num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(self.patchify(x)) + self.pos  # (B, T, dim)
        h = self.ln(self.blocks(h))
        return self.head(h.mean(dim=1))
