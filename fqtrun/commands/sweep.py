"""Sweep bookkeeping: a Hydra callback that makes a sweep with failed jobs exit non-zero."""

from __future__ import annotations

import sys
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig


class FailedJobs(Callback):
    """After a multirun: name the jobs that wrote failed.json and exit 1 (the others finished)."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep = Path(config.hydra.sweep.dir)
        failed = sorted(p.parent.name for p in sweep.glob("*/failed.json"))
        if failed:
            print(f"error: {len(failed)} job(s) of the sweep in {sweep} failed ({', '.join(failed)}): see their "
                  f"failed.json or `fqtrun report {sweep}`; re-run with skip_done=true hydra.sweep.dir={sweep}",
                  file=sys.stderr)
            sys.exit(1)
