"""Which process layout a run uses (trainer.strategy): one process, DDP or FSDP ranks under torchrun.

    none  one process (training/distributed.py SingleProcess)
    ddp   DistributedDataParallel ranks (training/distributed.py); trainer.distributed=true, the older
          spelling, still means ddp
    fsdp  ranks holding shards of the parameters (training/fsdp.py)
"""

from __future__ import annotations

import os

from fqtrun.errors import ConfigError
from fqtrun.training.distributed import Distributed, SingleProcess
from fqtrun.training.fsdp import Sharded

STRATEGIES: dict[str, type[SingleProcess]] = {"none": SingleProcess, "ddp": Distributed, "fsdp": Sharded}


def strategy_of(cfg) -> str:
    """A train config's strategy; one line for an unknown one or a setting the layout cannot honour."""
    strategy = cfg.trainer.strategy
    if strategy not in STRATEGIES:
        raise ConfigError(f"trainer.strategy={strategy!r} is unknown: use none (one process), ddp or fsdp "
                          "(several processes under torchrun)")
    if strategy == "fsdp" and cfg.variance.every > 0:
        raise ConfigError(f"variance.every={cfg.variance.every}: the gradient-variance probe runs on rank 0 "
                          "alone, which a sharded model cannot (every rank takes part in each forward): drop "
                          "variance.every, or use trainer.strategy=ddp")
    return "ddp" if strategy == "none" and cfg.trainer.distributed else strategy


def setup(strategy: str, device_setting: str) -> SingleProcess:
    """This process's part of the layout (strategy_of's value); refuses torchrun without a multi-process
    strategy (and a multi-process strategy refuses to start without torchrun)."""
    if strategy != "none":
        return STRATEGIES[strategy](device_setting)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError(f"started by torchrun with WORLD_SIZE={os.environ['WORLD_SIZE']} but "
                          "trainer.strategy=none: add trainer.strategy=ddp (or trainer.distributed=true) or "
                          "trainer.strategy=fsdp")
    return SingleProcess()
