"""Per-layer mask quality report: what N:M / transposable N:M costs in kept magnitude.

For every linear / conv layer: the kept-|w| ratio of the structured mask against unstructured
top-k at the same density (how much the structure costs), the greedy / exact ratio for
transposable masks (how much the cheap search loses), and the time each mask took.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from fqtrun.sparsity.diversity import check_nm
from fqtrun.sparsity.masks import nm_mask, transposable_mask

_LAYER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d)


def topk_mask(w: torch.Tensor, density: float) -> torch.Tensor:
    """Unstructured magnitude mask keeping round(density * numel) weights."""
    k = max(1, round(density * w.numel()))
    idx = w.detach().abs().flatten().topk(k).indices
    return torch.zeros(w.numel(), dtype=torch.bool, device=w.device).index_fill_(0, idx, True).view_as(w)


def _kept(w: torch.Tensor, mask: torch.Tensor) -> float:
    return float((w.detach().abs() * mask).sum())


def _timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def mask_report(model: nn.Module, n: int, m: int, kind: str = "transposable") -> list[dict]:
    """One row per linear/conv layer: kept-|w| ratios and mask times (kind: "nm" | "transposable")."""
    check_nm(n, m)
    if kind not in ("nm", "transposable"):
        raise ValueError(f"sparsity.kind={kind!r} must be 'nm' or 'transposable'")
    rows = []
    for name, mod in model.named_modules():
        if not isinstance(mod, _LAYER_TYPES):
            continue
        w = mod.weight.detach()
        if kind == "nm":
            mask, t = _timed(nm_mask, w, n, m)
            greedy, t_greedy = None, None
        else:
            mask, t = _timed(transposable_mask, w, n, m, "exact")
            greedy, t_greedy = _timed(transposable_mask, w, n, m, "greedy")
        density = float(mask.float().mean())
        kept = _kept(w, mask)
        top = _kept(w, topk_mask(w, density))
        rows.append(
            {
                "layer": name,
                "shape": list(w.shape),
                "density": density,
                "kept_vs_unstructured": kept / top if top > 0 else 1.0,
                "greedy_vs_exact": (_kept(w, greedy) / kept if kept > 0 else 1.0)
                if greedy is not None
                else None,
                "mask_ms": 1e3 * t,
                "greedy_ms": None if t_greedy is None else 1e3 * t_greedy,
            }
        )
    return rows
