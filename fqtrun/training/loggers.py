"""Where metrics go: metrics.jsonl (always), wandb (offline by default), and the terminal."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table


def _clean(v):
    """JSON has no NaN/inf: write them as strings so the file stays parseable."""
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


class JsonlLogger:
    """Appends one JSON object per line; `offset()` and `truncate()` make resume exact."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._f = open(self.path, "a", encoding="utf-8")

    def log(self, record: dict) -> None:
        self._f.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")
        self._f.flush()

    def offset(self) -> int:
        return self._f.tell()

    def truncate(self, offset: int) -> None:
        """Drop records written after the checkpoint being resumed from."""
        self._f.flush()
        self._f.truncate(offset)
        self._f.seek(offset)

    def close(self) -> None:
        self._f.close()


def wandb_key(record: dict) -> dict:
    """metrics.jsonl keys -> namespaced wandb keys (train/loss, test/acc, quant/bits_w, ...)."""
    split = record.get("split", "train")
    out = {}
    for k, v in record.items():
        if k in ("split", "step") or not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        if k.startswith("bits_"):
            out[f"quant/{k}"] = v
        elif "/" in k:
            out[k] = v
        else:
            out[f"{split}/{k}"] = v
    return out


class WandbLogger:
    """A real wandb run under the run folder; offline by default, syncable with `wandb sync`."""

    def __init__(self, run_dir: Path, mode: str, project: str, entity: str | None, tags: list[str],
                 config: dict, name: str, resume_id: str | None = None):
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        self.run = wandb.init(
            mode=mode, dir=str(run_dir), project=project, entity=entity, tags=list(tags), config=config,
            name=name, id=resume_id, resume="allow" if resume_id else None,
            settings=wandb.Settings(console="off", x_disable_stats=True),
        )
        self.id = self.run.id

    def log(self, record: dict) -> None:
        data = wandb_key(record)
        if data:
            self.run.log(data, step=int(record.get("step", 0)))

    def close(self, summary: dict | None = None) -> None:
        if summary:
            for k, v in summary.items():
                if isinstance(v, (int, float, str)):
                    self.run.summary[k] = v
        self.run.finish()


class ProgressView:
    """Epoch and step progress: a rich bar on a terminal, one plain line per epoch elsewhere."""

    def __init__(self, mode: str, console: Console):
        self.console = console
        self.rich = mode == "rich" or (mode == "auto" and console.is_terminal)
        self.quiet = mode == "none"
        self._p = None

    def start(self, epochs: int, steps_per_epoch: int, first_epoch: int, unit: str = "epoch") -> None:
        """Bars for the run (`epochs` units: epochs, or steps for runs sized in steps) and the epoch's steps."""
        if not self.rich:
            return
        self._p = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                           TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=self.console)
        self._p.start()
        self._epochs = self._p.add_task(f"{unit}s", total=epochs, completed=first_epoch, info="")
        self._steps = self._p.add_task("steps" if unit == "epoch" else "epoch steps", total=steps_per_epoch, info="")

    def step(self, done: int, info: str) -> None:
        if self._p is not None:
            self._p.update(self._steps, completed=done, info=info)

    def epoch(self, epoch: int, epochs: int, info: str, unit: str = "epoch") -> None:
        """An evaluation after `epoch` of `epochs` units (epochs, or steps for runs sized in steps)."""
        if self._p is not None:
            self._p.update(self._epochs, completed=epoch, info=info)
            self._p.reset(self._steps)
        elif not self.quiet:
            self.console.print(f"{unit} {epoch}/{epochs}  {info}", highlight=False)

    def stop(self) -> None:
        if self._p is not None:
            self._p.stop()
            self._p = None


def summary_table(title: str, rows: list[tuple[str, str]]) -> Table:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for k, v in rows:
        table.add_row(k, v)
    return table


def make_console() -> Console:
    return Console(file=sys.stdout, highlight=False)
