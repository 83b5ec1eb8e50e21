"""A decoder-only Llama-style transformer language model (the shape the FP8/FP4 training papers study).

Token embedding -> n_layer pre-norm blocks -> RMSNorm -> Linear head over the vocabulary. Each block:
x + o(attention(rope(q(n(x))), rope(k(n(x))), v(n(x)))), then x + down(silu(gate(n(x))) * up(n(x))), with
RMSNorm n, rotary positions instead of learned ones, optional grouped-query attention (n_kv_head key/value
heads shared by n_head query heads) and no biases anywhere. Every projection (q, k, v, o, gate, up, down,
head) is a plain nn.Linear, so quant/convert.py turns each into a quantizable layer.

Rotary pairs are the two halves of a head (dimension i with i + head_dim/2), the layout of HuggingFace's
LlamaForCausalLM, so its weights and ours copy across unchanged (tests/models/test_llama.py compares them).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fqtrun.errors import ConfigError
from fqtrun.models import shape_of
from fqtrun.models.gpt import GPT, check_length, init_gpt2


def swiglu_hidden(dim: int, multiple_of: int) -> int:
    """Llama's MLP width: 2/3 of 4 dim (so the three matrices hold as many weights as a 4 dim GELU MLP's two),
    rounded up to a multiple of multiple_of."""
    return multiple_of * -(-int(8 * dim / 3) // multiple_of)


def rope_tables(head_dim: int, block_size: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotation angle pos * theta^(-2i / head_dim), each (block_size, head_dim / 2)."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)  # (hs/2,)
    angles = torch.outer(torch.arange(block_size, dtype=torch.float64), inv_freq)  # (T, hs/2)
    return angles.cos().float(), angles.sin().float()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each pair (x_i, x_{i + hs/2}) of x (B, h, T, hs) by its position's angle (cos, sin: (T, hs/2))."""
    x1, x2 = x.chunk(2, dim=-1)  # (B, h, T, hs/2) each
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight over the last dim: LayerNorm without the mean and the bias."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class Attention(nn.Module):
    """Causal self-attention, rotary positions on q and k; n_kv_head < n_head shares each k/v head among
    n_head / n_kv_head consecutive query heads (grouped-query attention)."""

    def __init__(self, dim: int, n_head: int, n_kv_head: int):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = n_head, n_kv_head, dim // n_head
        self.q = nn.Linear(dim, n_head * self.head_dim, bias=False)
        self.k = nn.Linear(dim, n_kv_head * self.head_dim, bias=False)
        self.v = nn.Linear(dim, n_kv_head * self.head_dim, bias=False)
        self.o = nn.Linear(n_head * self.head_dim, dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q(x).view(b, t, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k(x).view(b, t, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        v = self.v(x).view(b, t, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        # the causal mask makes a later token's key and value weigh exactly 0 for earlier queries
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           enable_gqa=self.n_kv_head != self.n_head)  # (B, nh, T, hs)
        return self.o(y.transpose(1, 2).reshape(b, t, -1))  # (B, T, dim)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)): a gated MLP of width hidden."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))  # (B, T, hidden) inside, (B, T, dim) out


class Block(nn.Module):
    """x + attn(attn_norm(x)), then x + mlp(mlp_norm(x))."""

    def __init__(self, dim: int, n_head: int, n_kv_head: int, hidden: int, eps: float):
        super().__init__()
        self.attn_norm, self.attn = RMSNorm(dim, eps), Attention(dim, n_head, n_kv_head)
        self.mlp_norm, self.mlp = RMSNorm(dim, eps), SwiGLU(dim, hidden)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class Llama(nn.Module):
    """(B, T) token ids -> (B, T, vocab) next-token logits; position t sees tokens 0..t only.

    num_classes is the vocabulary (the dataset's tokenizer size) and input_shape (T,) the window the
    dataset feeds, at most block_size tokens (the positions the rotary tables cover).
    """

    task = "language_model"  # the objective this model is built for (fqtrun.tasks.TASKS)
    # quant.keep_first / keep_last when the recipe leaves them null: the output head stays in full precision,
    # as for model=gpt (the token embedding is a lookup, never quantized)
    quant_keep = {"keep_first": False, "keep_last": True}
    generate = GPT.generate  # the same sampling loop: it needs only block_size and forward

    def __init__(self, num_classes: int, input_shape: Sequence[int], n_layer: int = 4, n_head: int = 4,
                 n_kv_head: int | None = None, dim: int = 64, ffn_hidden: int | None = None, multiple_of: int = 32,
                 norm_eps: float = 1e-5, rope_theta: float = 10000.0, block_size: int = 64,
                 tie_weights: bool = False):
        super().__init__()
        (window,) = shape_of(input_shape, "llama", (1,))
        n_kv_head = n_head if n_kv_head is None else n_kv_head
        _check(window, n_layer, n_head, n_kv_head, dim, ffn_hidden, multiple_of, norm_eps, rope_theta, block_size)
        hidden = swiglu_hidden(dim, multiple_of) if ffn_hidden is None else ffn_hidden
        self.block_size = block_size
        self.tok = nn.Embedding(int(num_classes), dim)
        self.blocks = nn.ModuleList(Block(dim, n_head, n_kv_head, hidden, norm_eps) for _ in range(n_layer))
        self.norm = RMSNorm(dim, norm_eps)
        self.head = nn.Linear(dim, int(num_classes), bias=False)
        cos, sin = rope_tables(dim // n_head, block_size, rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)  # derived from the settings: not checkpointed
        self.register_buffer("rope_sin", sin, persistent=False)
        init_gpt2(self, [p for block in self.blocks for p in (block.attn.o, block.mlp.down)], n_layer, tie_weights)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = check_length(idx, self.block_size)
        cos, sin = self.rope_cos[:t], self.rope_sin[:t]  # (T, hs/2)
        h = self.tok(idx)  # (B, T, dim)
        for block in self.blocks:
            h = block(h, cos, sin)
        return self.head(self.norm(h))  # (B, T, vocab)


def _check(window: int, n_layer: int, n_head: int, n_kv_head: int, dim: int, ffn_hidden: int | None,
           multiple_of: int, norm_eps: float, rope_theta: float, block_size: int) -> None:
    """One-line ConfigError for the first bad setting."""
    for name, v in (("n_layer", n_layer), ("n_head", n_head), ("n_kv_head", n_kv_head), ("dim", dim),
                    ("multiple_of", multiple_of), ("block_size", block_size)):
        if v < 1:
            raise ConfigError(f"model.{name}={v} must be >= 1")
    if ffn_hidden is not None and ffn_hidden < 1:
        raise ConfigError(f"model.ffn_hidden={ffn_hidden} must be >= 1 (or null: Llama's 8/3 dim rule)")
    if dim % n_head:
        raise ConfigError(f"model.dim={dim} is not divisible by model.n_head={n_head}: pick dim a multiple of n_head "
                          f"(e.g. model.dim={n_head * max(1, round(dim / n_head))})")
    if (dim // n_head) % 2:
        raise ConfigError(f"model.dim / model.n_head = {dim // n_head} is odd: rotary positions rotate pairs of "
                          "dimensions, so pick a head size (dim / n_head) that is even")
    if n_head % n_kv_head:
        divisors = ", ".join(str(d) for d in range(1, n_head + 1) if n_head % d == 0)
        raise ConfigError(f"model.n_kv_head={n_kv_head} does not divide model.n_head={n_head}: each key/value head "
                          f"serves n_head / n_kv_head query heads, so pick n_kv_head among {divisors}")
    if norm_eps <= 0:
        raise ConfigError(f"model.norm_eps={norm_eps} must be > 0")
    if rope_theta <= 0:
        raise ConfigError(f"model.rope_theta={rope_theta} must be > 0")
    if window > block_size:
        raise ConfigError(f"the dataset's windows of {window} tokens exceed model.block_size={block_size}: "
                          "raise model.block_size or lower dataset.block_size")
