"""Checkpoints: atomic writes (temp file + rename) and safe loads (weights_only=True)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from fqtrun.errors import CheckpointError
from fqtrun.files import atomic_open

FORMAT = "fqtrun-checkpoint-v1"


def model_signature(model: nn.Module) -> dict[str, list[int]]:
    """Parameter/buffer names and shapes: what a checkpoint must match to load into `model`."""
    return {k: list(v.shape) for k, v in model.state_dict().items()}


def save_checkpoint(path: str | Path, state: dict) -> Path:
    """Write `state` to `path` atomically: a crash leaves the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path) as f:
        torch.save({"format": FORMAT, **state}, f)
    return path


def load_checkpoint(path: str | Path) -> dict:
    """Load a fqtrun checkpoint; one-line CheckpointError when missing, corrupt or foreign."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist: point to a run folder that has last.pt")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for truncated/garbage files
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {path} is corrupt or unreadable ({first[:120]}): "
                              "delete it and resume from an earlier one, or start a new run") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} is not a fqtrun checkpoint (format {FORMAT} expected)")
    return state


def check_matches(state: dict, model: nn.Module, model_name: str, path: str | Path) -> None:
    """Refuse a checkpoint written for another architecture, naming both."""
    theirs, ours = state.get("signature", {}), model_signature(model)
    if theirs == ours:
        return
    their_name = state.get("model_name", "unknown")
    diff = sorted(set(theirs) ^ set(ours)) or [k for k in ours if theirs.get(k) != ours[k]]
    raise CheckpointError(
        f"checkpoint {path} was written for model={their_name}, this run builds model={model_name} "
        f"(first mismatch: {diff[0]}): use the same model settings or another checkpoint")
