"""Checkpoints: atomic writes (temp file + rename) and safe loads (weights_only=True).

A sharded run (trainer.strategy=fsdp) writes two things per checkpoint: its model and optimizer shards
through torch.distributed.checkpoint (DCP) into a folder `<name>.dcp-<tag>` beside the file, and the
plain checkpoint file `<name>` (rank 0) holding the consolidated weights, the run state and the folder's
name ("sharded"). The file is written last, so it always names a complete folder: readers (fqtrun
sample, variance, ...) load the file as for any run; resume loads the shards.
"""

from __future__ import annotations

import secrets
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
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


# ----- sharded checkpoints (trainer.strategy=fsdp; every rank calls these together) ----------------------
def save_sharded(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                 run_state: Callable[[], dict], is_main: bool) -> Path | None:
    """Write the shards of every rank into a new folder (temp name, renamed when complete), then rank 0's
    plain checkpoint at `path` naming it, then remove the folders of this name's earlier checkpoints.

    A crash at any point leaves `path` naming a complete folder (the old one or the new one). Returns
    `path` on rank 0, None elsewhere.
    """
    import torch.distributed.checkpoint as dcp  # here: a second of imports only sharded runs pay
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict

    path = Path(path)
    box = [secrets.token_hex(4)]  # one fresh folder name for all ranks
    dist.broadcast_object_list(box, src=0)
    folder = path.with_name(f"{path.stem}.dcp-{box[0]}")
    tmp = folder.with_name(folder.name + ".tmp")
    model_state, optim_state = get_state_dict(model, optimizer)  # this rank's shards, keyed by parameter name
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=tmp)
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if is_main:
        tmp.rename(folder)
        save_checkpoint(path, {"model": full, "signature": model_signature(model), "sharded": folder.name,
                               **run_state()})
        for old in path.parent.glob(f"{path.stem}.dcp-*"):
            if old != folder:
                shutil.rmtree(old, ignore_errors=True)
    dist.barrier()  # no rank leaves (an interrupted run exits next) before rank 0 has written the file
    return path if is_main else None


def load_sharded(ckpt: dict, path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Model and optimizer shards from the folder that the checkpoint read from `path` names; one-line
    CheckpointError when the folder is missing or incomplete."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    folder = Path(path).parent / ckpt["sharded"]
    if not (folder / ".metadata").is_file():
        raise CheckpointError(f"checkpoint {path} names the sharded state {folder}, which is missing or "
                              "incomplete: copy the run folder whole, or start a new run")
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    dcp.load(state, checkpoint_id=folder)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
