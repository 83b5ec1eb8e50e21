"""Multi-process data-parallel training (DDP) under torchrun, and its one-process stand-in.

    torchrun --nproc_per_node=2 -m fqtrun train trainer.strategy=ddp hydra.run.dir=runs/ddp ...

trainer.strategy picks the process layout (training/processes.py): none (one process), ddp (this
module; the older spelling trainer.distributed=true still means ddp) or fsdp (training/fsdp.py: DDP's
data layout with sharded parameters). The trainer talks to a `SingleProcess`, a `Distributed` or a
`Sharded` through the same small interface (loader, prepare, batch_loss, save, load, any, is_main),
so the loop has no distributed branches.

What a distributed run does:
- Data: every step takes the same global batch a single process would (the seeded per-epoch
  permutation cut into `batch_size` pieces); rank r gets its own disjoint slice of it, so the
  per-rank batch is batch_size / world_size and the global batch stays batch_size.
- Loss: each rank's summed loss (the task's, fqtrun/tasks) is scaled by world_size / (global
  batch size) so that DDP's gradient average is exactly the global-batch mean, also when the
  last batch splits unevenly. The logged loss and the task's batch sums (correct predictions)
  are all-reduced over the ranks: they are the global batch's.
- Gradient quantization (FQT) happens inside each rank's backward, on its own slice, before
  DDP all-reduces the (already quantized-and-dequantized) parameter gradients; stochastic
  rounding noise is drawn per rank (`noise_seed`), so the ranks' rounding errors are independent.
- Only rank 0 logs, checkpoints and writes summary.json; every rank evaluates the full test set
  (keeps the ranks in lockstep); resume loads rank 0's last.pt on every rank.
- All ranks use rank 0's Hydra run folder (`shared_dir`); pass hydra.run.dir=<folder> to name it.
- BatchNorm statistics are per rank (over batch_size / world_size samples), as in plain DDP.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from fqtrun.data.loader import Loader, make_loader
from fqtrun.errors import CheckpointError, ConfigError
from fqtrun.quant.grid import mix_seed
from fqtrun.training.checkpoint import model_signature, save_checkpoint


def launch(strategy: str) -> str:
    """The torchrun command line of a multi-process strategy (for error messages)."""
    return (f"torchrun --nproc_per_node=<N> -m fqtrun train trainer.strategy={strategy} "
            "hydra.run.dir=<folder> ...")


class ShardedLoader(Loader):
    """The single-process batches, each cut into world_size disjoint slices; yields slice `rank`."""

    def __init__(self, dataset, batch_size: int, shuffle: bool, seed: int, rank: int, world_size: int,
                 skip_batches: int = 0):
        super().__init__(dataset, batch_size, shuffle, seed, skip_batches=skip_batches)
        tail = len(dataset) % batch_size
        if 0 < tail < world_size:
            raise ConfigError(f"batch_size={batch_size}: the last batch of an epoch has {tail} samples, "
                              f"fewer than the {world_size} ranks: pick a batch_size with "
                              f"len(train)={len(dataset)} % batch_size = 0 or >= {world_size}")
        self.rank, self.world_size = rank, world_size

    def _batch_indices(self) -> list[torch.Tensor]:
        return [idx.tensor_split(self.world_size)[self.rank] for idx in super()._batch_indices()]


class SingleProcess:
    """One process: plain loader, unwrapped model, batch-mean loss."""

    rank, world_size, is_main = 0, 1, True
    strategy = "none"
    device: torch.device | None = None  # None: the device setting decides (pick_device)

    def loader(self, dataset, batch_size: int, seed: int, skip_batches: int = 0) -> Loader:
        return make_loader(dataset, batch_size, shuffle=True, seed=seed, skip_batches=skip_batches)

    def prepare(self, model: nn.Module,
                optimizer: torch.optim.Optimizer) -> tuple[nn.Module, torch.optim.Optimizer]:
        """(the module the loop calls forward on, the optimizer over the parameters the ranks hold)."""
        return model, optimizer

    def save(self, path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
             run_state: Callable[[], dict]) -> Path | None:
        """Write a checkpoint of model, optimizer and `run_state()` (step, hooks, RNG, ...) to `path`;
        the path on the rank that wrote it, None on the others (rank 0 alone writes)."""
        if not self.is_main:
            return None
        return save_checkpoint(path, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                      "signature": model_signature(model), **run_state()})

    def load(self, ckpt: dict, path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Model and optimizer state from a checkpoint (read from `path`) this strategy wrote."""
        if ckpt.get("sharded"):
            raise CheckpointError(f"checkpoint {path} was written by a trainer.strategy=fsdp run (its "
                                  f"optimizer state is sharded in {ckpt['sharded']}): resume it with "
                                  f"{launch('fsdp')}")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])

    def batch_loss(self, task, output: torch.Tensor, y: torch.Tensor,
                   global_n: int) -> tuple[torch.Tensor, float, dict, int]:
        """(loss to backpropagate, its value, the task's batch sums, samples) of the step's batch."""
        loss = task.loss(output, y)
        return loss, loss.item(), task.batch_sums(output, y), len(y)

    def any(self, flag: bool) -> bool:
        """True when `flag` is true on any rank (a signal seen by one rank stops all)."""
        return flag

    def noise_seed(self, seed: int) -> int:
        return seed

    def shared_dir(self, out_dir: Path) -> Path:
        return out_dir

    def close(self) -> None:
        pass


class Distributed(SingleProcess):
    """One of world_size processes started by torchrun; see the module docstring."""

    strategy = "ddp"

    def __init__(self, device_setting: str):
        missing = [k for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK") if k not in os.environ]
        if missing:
            raise ConfigError(f"trainer.strategy={self.strategy} but {missing[0]} is not set: start the "
                              f"ranks with torchrun ({launch(self.strategy)})")
        self.rank, self.world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        self.local_rank = int(os.environ["LOCAL_RANK"])
        self.is_main = self.rank == 0
        use_cuda = device_setting == "cuda" or (device_setting == "auto" and torch.cuda.is_available())
        if use_cuda and not torch.cuda.is_available():
            raise ConfigError("device=cuda but no CUDA device is visible: use device=cpu or device=auto")
        if use_cuda:
            self.device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(self.device)
            dist.init_process_group("nccl", device_id=self.device)
        else:
            self.device = torch.device("cpu")
            dist.init_process_group("gloo")

    def loader(self, dataset, batch_size: int, seed: int, skip_batches: int = 0) -> Loader:
        return ShardedLoader(dataset, batch_size, True, seed, self.rank, self.world_size, skip_batches)

    def prepare(self, model, optimizer):
        """DDP around the model (rank 0's weights are broadcast to all ranks here); the same optimizer."""
        ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids), optimizer

    def batch_loss(self, task, output, y, global_n):
        summed = task.loss(output, y, reduction="sum")
        loss = summed * (self.world_size / global_n)  # DDP averages over ranks -> global-batch mean
        sums = task.batch_sums(output, y)
        totals = torch.tensor([float(summed.detach()), *sums.values()], dtype=torch.float64, device=summed.device)
        dist.all_reduce(totals)
        return loss, float(totals[0]) / global_n, dict(zip(sums, totals[1:].tolist())), global_n

    def any(self, flag: bool) -> bool:
        t = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def noise_seed(self, seed: int) -> int:
        """Rank 0 keeps the run seed; other ranks draw independent stochastic-rounding noise."""
        return seed if self.rank == 0 else mix_seed(seed, self.rank)

    def shared_dir(self, out_dir: Path) -> Path:
        """Rank 0's run folder, on every rank; a rank's own differing Hydra folder is removed."""
        box = [str(out_dir)]
        dist.broadcast_object_list(box, src=0)
        shared = Path(box[0])
        if shared.resolve() != Path(out_dir).resolve():
            _remove_stray(Path(out_dir))
        return shared

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def _remove_stray(folder: Path) -> None:
    """A rank's own Hydra folder (when its clock gave another name): delete it if Hydra alone wrote it."""
    if all(p.name == ".hydra" or p.suffix == ".log" for p in folder.iterdir()):
        shutil.rmtree(folder, ignore_errors=True)


class NullLogger:
    """What a rank other than 0 logs to: nothing (rank 0 alone writes metrics.jsonl)."""

    def log(self, record: dict) -> None:
        pass

    def offset(self) -> int:
        return 0

    def truncate(self, offset: int) -> None:
        pass

    def close(self) -> None:
        pass
