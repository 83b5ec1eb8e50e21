"""Per-layer mask quality report: what N:M / transposable N:M costs in kept magnitude.

For every linear / conv layer: the kept-|w| ratio of the structured mask against unstructured
top-k at the same density (how much the structure costs), the greedy / exact ratio for
transposable masks (how much the cheap search loses), and the time each mask took;
`masked_layer_rows` adds the mask diversity of the layers a MaskPolicy masks, `kept_dense` says
why every other layer stayed dense.
"""

from __future__ import annotations

import math
import time

import torch
from torch import nn

from fqtrun.sparsity.diversity import check_nm, log10_mask_diversity
from fqtrun.sparsity.masks import nm_mask, transposable_mask
from fqtrun.sparsity.policy import LAYER_TYPES, MaskPolicy


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
        if not isinstance(mod, LAYER_TYPES):
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


def masked_layer_rows(model: nn.Module, policy: MaskPolicy) -> list[dict]:
    """mask_report rows of the layers the (attached) policy masks, with log10 mask diversity of the
    constraint (log10_md) and of unstructured at the same density (log10_md_unstructured).

    The constraint's diversity is given where the layer tiles exactly (input channels a multiple of M,
    and output channels too for transposable); padded edge groups keep more and follow no formula.
    """
    rows = [r for r in mask_report(model, policy.n, policy.m, policy.kind) if r["layer"] in policy.names]
    for r in rows:
        out, cin = r["shape"][:2]
        t = math.prod(r["shape"])
        tiles = cin % policy.m == 0 and (policy.kind == "nm" or out % policy.m == 0)
        r["log10_md"] = log10_mask_diversity(policy.kind, t, policy.n, policy.m) if tiles else None
        r["log10_md_unstructured"] = log10_mask_diversity("unstructured", t, policy.n, policy.m)
    return rows


def kept_dense(model: nn.Module, policy: MaskPolicy) -> dict[str, str]:
    """Every conv/linear the (attached) policy left dense, with the reason."""
    layers = [n for n, m in model.named_modules() if isinstance(m, LAYER_TYPES)]
    out = {}
    for name in layers:
        if name in policy.names:
            continue
        if policy.keep_last and name == layers[-1]:
            out[name] = "classifier (sparsity.keep_last)"
        elif not hasattr(model.get_submodule(name), "weight_mask"):
            out[name] = "not sparse-capable: the run's quant settings kept it a plain layer"
        else:
            out[name] = "matches sparsity.exclude"
    return out
