"""trainer.compile: the model's forward and backward through torch.compile, quantizers included.

The quantized layers call their quantizers as torch custom ops while dynamo traces (quant/ops.py), so the
whole model is one graph (tests/training/test_compiled.py counts the breaks: zero for the GPT's FQT step
and a format recipe); AOTAutograd compiles the backward from the same trace. The noise counter is a
graph input, so a new step does not recompile; a precision schedule's new bits do (once per bit-width).
"""

from __future__ import annotations

import torch
from torch import nn

RECOMPILE_LIMIT = 64  # graphs per model: one per combination of bits a schedule visits (CPT 3..8: 6)


def compiled_model(model: nn.Module):
    """model's forward compiled with inductor (the first step of each bit-width compiles, later ones reuse
    it), called under a recompile limit that holds every bit-width (dynamo's default keeps 8 graphs)."""
    compiled = torch.compile(model)

    def forward(*args, **kwargs):
        with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
            return compiled(*args, **kwargs)

    return forward
