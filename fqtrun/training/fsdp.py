"""Sharded data-parallel training (FSDP2, `fully_shard`) under torchrun: trainer.strategy=fsdp.

    torchrun --nproc_per_node=2 -m fqtrun train trainer.strategy=fsdp hydra.run.dir=runs/fsdp ...

The data layout is DDP's (training/distributed.py: each step's global batch cut over the ranks, the
loss scaled to the global-batch mean, per-rank rounding noise, rank 0 logs); what differs:
- Parameters: every entry of the model's `blocks` (GPT, Llama) is sharded as one unit, then the root
  (the rest: embeddings, norms, head; a model without `blocks` is one unit). Each rank holds
  1/world_size of every parameter, gradient and optimizer state; a unit's full weights are gathered
  for its forward and backward only. The optimizer is rebuilt over the sharded parameters. Each rank
  builds the whole model before sharding it (no meta-device init): the parameters alone must fit one device.
- Layers run unchanged: inside forward a quantized layer sees its full weight as a plain tensor, so
  quantizers, bits set by schedules and weight_mask buffers (full size, not sharded) work as in one
  process. Between steps a weight is a DTensor shard: the sparsity policy gathers it to recompute a
  mask (sparsity/policy.py).
- BatchNorm statistics are per rank; rank 0's count (it logs the evaluation, DDP broadcasts them) and
  are the ones a checkpoint holds.
- Checkpoints go through torch.distributed.checkpoint (training/checkpoint.py save_sharded): each rank
  writes its shards (model and optimizer) into one folder; rank 0 writes last.pt with the consolidated
  weights, so `fqtrun sample` and the other readers load an FSDP run like any other.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from fqtrun.errors import CheckpointError
from fqtrun.training.checkpoint import load_sharded, save_sharded
from fqtrun.training.distributed import Distributed


class Sharded(Distributed):
    """One of world_size torchrun processes holding a shard of the model; see the module docstring."""

    strategy = "fsdp"

    def __init__(self, device_setting: str):
        from torch.distributed.device_mesh import init_device_mesh  # here: a second of imports only FSDP pays

        super().__init__(device_setting)
        self.mesh = init_device_mesh(self.device.type, (self.world_size,))

    def prepare(self, model: nn.Module,
                optimizer: torch.optim.Optimizer) -> tuple[nn.Module, torch.optim.Optimizer]:
        """Shard the model in place (it stays the module the hooks hold) and rebuild the optimizer over the
        sharded parameters, which are new Parameter objects."""
        names = {id(p): name for name, p in model.named_parameters()}
        shard(model, self.mesh)
        return model, rebuild_optimizer(optimizer, names, dict(model.named_parameters()))

    def save(self, path, model, optimizer, run_state):
        broadcast_buffers(model)  # DCP saves a replicated buffer from any one rank: make it rank 0's
        return save_sharded(path, model, optimizer, run_state, self.is_main)

    def load(self, ckpt: dict, path: Path, model, optimizer) -> None:
        if not ckpt.get("sharded"):
            raise CheckpointError(f"checkpoint {path} was written by a trainer.strategy=none or ddp run (no "
                                  "sharded state): resume it with that strategy, or start a new fsdp run")
        load_sharded(ckpt, path, model, optimizer)


def shard(model: nn.Module, mesh) -> None:
    """fully_shard each of the model's `blocks` (if it has them), then the root."""
    from torch.distributed.fsdp import fully_shard

    for block in getattr(model, "blocks", None) or ():
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


def rebuild_optimizer(optimizer: torch.optim.Optimizer, names: dict[int, str],
                      params: dict[str, nn.Parameter]) -> torch.optim.Optimizer:
    """The same optimizer (class, groups, hyper-parameters) over `params`, matched by parameter name."""
    groups = [{**{k: v for k, v in g.items() if k != "params"},
               "params": [params[names[id(p)]] for p in g["params"]]} for g in optimizer.param_groups]
    optimizer.param_groups.clear()  # the old one held the whole unsharded parameters: let them be freed
    optimizer.state.clear()
    return type(optimizer)(groups)


@torch.no_grad()
def broadcast_buffers(model: nn.Module) -> None:
    """Rank 0's BatchNorm running statistics on every rank."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._NormBase):
            for buffer in module.buffers():
                torch.distributed.broadcast(buffer, src=0)

