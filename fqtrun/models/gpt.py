"""A decoder-only, pre-LayerNorm transformer language model (GPT-2's layout, nanoGPT's initialisation).

Token embedding + learned positions -> n_layer causal blocks (models/transformer.py: explicit
q/k/v/out Linear layers, so every projection is a quantizable layer; GELU MLP of width 4 n_embd)
-> LayerNorm -> Linear head over the vocabulary, optionally tied to the token embedding.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from fqtrun.models import shape_of
from fqtrun.models.transformer import Block


class GPT(nn.Module):
    """(B, T) token ids -> (B, T, vocab) next-token logits; position t sees tokens 0..t only.

    num_classes is the vocabulary (the dataset's tokenizer size) and input_shape (T,) the window
    the dataset feeds, at most block_size tokens (the positions the model learns).
    """

    task = "language_model"  # the objective this model is built for (fqtrun.tasks.TASKS)
    # quant.keep_first / keep_last when the recipe leaves them null: the output head stays in full
    # precision, as in the LM quantization literature (the token embedding is a lookup, never quantized)
    quant_keep = {"keep_first": False, "keep_last": True}

    def __init__(self, num_classes: int, input_shape: Sequence[int], n_layer: int = 4, n_head: int = 4,
                 n_embd: int = 64, block_size: int = 64, dropout: float = 0.0, bias: bool = True,
                 tie_weights: bool = False):
        super().__init__()
        (window,) = shape_of(input_shape, "gpt", (1,))
        for name, v in (("n_layer", n_layer), ("n_head", n_head), ("n_embd", n_embd), ("block_size", block_size)):
            if v < 1:
                raise ValueError(f"model.{name}={v} must be >= 1")
        if n_embd % n_head:
            raise ValueError(f"model.n_embd={n_embd} is not divisible by model.n_head={n_head}: pick n_embd a "
                             f"multiple of n_head (e.g. model.n_embd={n_head * max(1, round(n_embd / n_head))})")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"model.dropout={dropout} must be in [0, 1)")
        if window > block_size:
            raise ValueError(f"the dataset's windows of {window} tokens exceed model.block_size={block_size}: "
                             f"raise model.block_size or lower dataset.block_size")
        self.block_size = block_size
        self.tok = nn.Embedding(int(num_classes), n_embd)
        self.pos = nn.Embedding(block_size, n_embd)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.Sequential(*(Block(n_embd, n_head, 4.0, bias, causal=True, dropout=dropout)
                                      for _ in range(n_layer)))
        self.ln = nn.LayerNorm(n_embd, bias=bias)
        self.head = nn.Linear(n_embd, int(num_classes), bias=False)
        init_gpt2(self, [p for block in self.blocks for p in (block.attn.out, block.fc2)], n_layer, tie_weights)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = check_length(idx, self.block_size)
        h = self.drop(self.tok(idx) + self.pos(torch.arange(t, device=idx.device)))  # (B, T, n_embd)
        return self.head(self.ln(self.blocks(h)))  # (B, T, vocab)

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """idx (B, t) followed by new_tokens sampled one at a time from the last block_size tokens'
        next-token distribution at `temperature`, restricted to the top_k most likely (None: all)."""
        for _ in range(new_tokens):
            logits = self(idx[:, -self.block_size:])[:, -1, :] / temperature  # (B, vocab)
            if top_k is not None and top_k < logits.shape[-1]:
                kth = torch.topk(logits, top_k).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            nxt = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)
            idx = torch.cat([idx, nxt], dim=1)
        return idx


def init_gpt2(model: nn.Module, residual: list[nn.Linear], n_layer: int, tie_weights: bool) -> None:
    """GPT-2's initialisation (also the Llama model's): N(0, 0.02) weights and zero biases, the residual
    projections at 0.02 / sqrt(2 n_layer), then the head tied to the token embedding `tok` if asked."""
    model.apply(_init)
    for proj in residual:
        nn.init.normal_(proj.weight, std=0.02 / math.sqrt(2 * n_layer))
    if tie_weights:
        model.head.weight = model.tok.weight


def check_length(idx: torch.Tensor, block_size: int) -> int:
    """The length T of idx (B, T); ValueError when it exceeds the model's block_size."""
    t = idx.shape[1]
    if t > block_size:
        raise ValueError(f"a sequence of {t} tokens exceeds model.block_size={block_size}")
    return t


def _init(m: nn.Module) -> None:
    """N(0, 0.02) weights, zero biases (GPT-2)."""
    if isinstance(m, (nn.Linear, nn.Embedding)):
        nn.init.normal_(m.weight, std=0.02)
    if isinstance(m, nn.Linear) and m.bias is not None:
        nn.init.zeros_(m.bias)
