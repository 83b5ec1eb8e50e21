"""Dense -> N:M with little or no training: per-layer reconstruction, then BN re-estimation.

Spec sparsity.md, "Training with masks" (last point). With the magnitude mask S of a layer fixed,
the kept weights are refitted on a few calibration batches to

    min_{W'}  || W X - (S ⊙ W') X ||_F^2          X: the layer's GEMM input (fan_in, samples)

which separates into one least-squares problem per output row on that row's kept inputs:
    (H_KK + λ I) w'_K = (H w)_K,   H = X X^T,  λ = damping * mean(diag H).
A conv's X is its unfolded input (Conv1d / Conv2d via F.unfold), so the same solve serves both.
A bias is refitted too (X gets a row of ones, always kept), absorbing the mean shift of the output.
Layers are done in module order and X is taken in the partly converted model, so each layer is
fitted to the inputs it will really see. A row whose refit is worse than its magnitude-only
weights on these batches (possible only through the damping) keeps the magnitude-only weights.
Quantized layers are refitted in float (on their unquantized input); their forward still quantizes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

Tensor = torch.Tensor
_CHUNK_BYTES = 1 << 27  # per batched solve: (rows, d, d) float64 systems stay near 128 MB
BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class _Captured(Exception):
    """Raised by the capture hook once the layer's input is recorded: the rest of the forward is skipped."""


def gemm_input(layer: nn.Module, x: Tensor) -> Tensor:
    """The layer's GEMM operand as (samples, fan_in), fan_in ordered like weight.reshape(out, -1)."""
    if isinstance(layer, nn.Linear):
        return x.reshape(-1, layer.in_features)
    if not isinstance(layer, (nn.Conv1d, nn.Conv2d)):
        raise ValueError(f"reconstruction handles Linear / Conv1d / Conv2d, not {type(layer).__name__}")
    if layer.groups != 1 or layer.padding_mode != "zeros" or isinstance(layer.padding, str):
        raise ValueError(f"conv {layer} cannot be unfolded for reconstruction (needs groups=1 and numeric "
                         "zero padding): leave it dense with sparsity.exclude=[<its name>]")
    if isinstance(layer, nn.Conv1d):  # as a 2-D conv of height 1
        x = x.unsqueeze(2)
        k, d, s = [(1, v[0]) for v in (layer.kernel_size, layer.dilation, layer.stride)]
        p = (0, layer.padding[0])
    else:
        k, d, p, s = layer.kernel_size, layer.dilation, layer.padding, layer.stride
    cols = F.unfold(x, k, dilation=d, padding=p, stride=s)  # (B, C*k, positions), channel-major like W
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def _augmented(layer: nn.Module, w2d: Tensor) -> Tensor:
    """(out, fan_in [+1]): the weight with the bias as a last column when the layer has one."""
    if layer.bias is None:
        return w2d
    return torch.cat([w2d, layer.bias.detach().reshape(-1, 1).to(w2d.dtype)], dim=1)


@torch.no_grad()
def input_gram(model: nn.Module, layer: nn.Module, batches: list[Tensor]) -> Tensor:
    """H = X X^T (float64) of the layer's GEMM input over the batches, with a ones row when it has a bias."""
    acc: dict[str, Tensor] = {}

    def hook(_mod, args):
        cols = gemm_input(layer, args[0]).double()
        if layer.bias is not None:
            cols = torch.cat([cols, cols.new_ones(cols.shape[0], 1)], dim=1)
        h = cols.T @ cols
        acc["h"] = h if "h" not in acc else acc["h"] + h
        raise _Captured

    handle = layer.register_forward_pre_hook(hook)
    try:
        for x in batches:
            try:
                model(x)
            except _Captured:
                pass
    finally:
        handle.remove()
    if "h" not in acc:
        raise ValueError("the layer was not called in the model's forward: it cannot be reconstructed")
    return acc["h"]


def row_errors(h: Tensor, w: Tensor, w_new: Tensor) -> Tensor:
    """Per output row, ||w X - w_new X||^2 = (w - w_new) H (w - w_new)^T, from the Gram matrix."""
    diff = (w - w_new).double()
    return ((diff @ h) * diff).sum(dim=1)


def solve_rows(h: Tensor, w: Tensor, keep: Tensor, damping: float) -> Tensor:
    """Least squares per row: argmin ||w_i X - w'_i X|| over w'_i zero outside keep_i (float64, batched).

    h (d, d) Gram matrix, w (rows, d) targets, keep (rows, d) bool. Each row's system is written in
    full size, D H D + λ D + (I - D) with D = diag(keep_i), so dropped entries solve to exactly 0.
    """
    if damping <= 0:
        raise ValueError(f"convert.damping={damping} must be > 0: it keeps the per-row systems invertible")
    h = h.double()
    w = w.double()
    d = h.shape[0]
    lam = damping * float(h.diagonal().mean().clamp_min(1e-12))
    hw = w @ h  # (rows, d): (H w_i)^T
    out = torch.empty_like(w)
    eye = torch.eye(d, dtype=h.dtype, device=h.device)
    step = max(1, _CHUNK_BYTES // (8 * d * d))
    for lo in range(0, w.shape[0], step):
        k = keep[lo : lo + step].to(h.dtype)  # (r, d)
        a = k.unsqueeze(2) * (h + lam * eye) * k.unsqueeze(1) + torch.diag_embed(1.0 - k)
        out[lo : lo + step] = torch.linalg.solve(a, (k * hw[lo : lo + step]).unsqueeze(2)).squeeze(2)
    return out


@torch.no_grad()
def reconstruct(model: nn.Module, names: list[str], batches: list[Tensor], damping: float = 0.01) -> list[dict]:
    """Refit the kept weights (and bias) of every named masked layer, in module order; report rows.

    Each layer's `weight_mask` stays fixed; its pruned weights keep their dense values (the forward
    masks them; later sparse training may regrow them). Rows: layer, calibration samples, relative
    output error ||W X - W' X||^2 / ||W X||^2 of the magnitude-only and of the refitted weights on
    the same X, and how many rows kept their magnitude-only weights.
    """
    order = [n for n, _ in model.named_modules() if n in set(names)]
    rows = []
    for name in order:
        layer = model.get_submodule(name)
        mask = getattr(layer, "weight_mask", None)
        if mask is None:
            raise ValueError(f"layer {name} has no weight_mask: set the masks before reconstructing")
        w = layer.weight.detach()
        dense = _augmented(layer, w.reshape(w.shape[0], -1).double())
        keep = mask.reshape(w.shape[0], -1)
        if layer.bias is not None:
            keep = torch.cat([keep, keep.new_ones(keep.shape[0], 1)], dim=1)
        h = input_gram(model, layer, batches)
        fitted = solve_rows(h, dense, keep, damping)
        magnitude = dense * keep
        err_mag, err_fit = row_errors(h, dense, magnitude), row_errors(h, dense, fitted)
        worse = err_fit > err_mag
        fitted[worse] = magnitude[worse]
        err_fit = torch.where(worse, err_mag, err_fit)
        total = float(((dense @ h) * dense).sum()) or 1.0
        k = w[0].numel()
        new_w = torch.where(keep[:, :k], fitted[:, :k], dense[:, :k])  # pruned entries keep dense values
        layer.weight.copy_(new_w.reshape(w.shape).to(w.dtype))
        if layer.bias is not None:
            layer.bias.copy_(fitted[:, k].to(layer.bias.dtype))
        rows.append({"layer": name, "rel_err_magnitude": float(err_mag.sum()) / total,
                     "rel_err_reconstructed": float(err_fit.sum()) / total,
                     "rows_kept_magnitude": int(worse.sum())})
    return rows


@torch.no_grad()
def reestimate_bn(model: nn.Module, batches: list[Tensor]) -> int:
    """Reset every BatchNorm's running statistics and re-estimate them on the batches; returns how many.

    Cumulative averages (momentum=None) over the batches, BN layers alone in train mode (dropout and
    the rest stay in eval); momentum and modes are restored afterwards.
    """
    bns = [m for m in model.modules() if isinstance(m, BN_TYPES) and m.track_running_stats]
    if not bns or not batches:
        return 0
    was_training = model.training
    saved = [(m, m.momentum) for m in bns]
    model.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    try:
        for x in batches:
            model(x)
    finally:
        for m, momentum in saved:
            m.momentum = momentum
        model.train(was_training)
    return len(bns)
