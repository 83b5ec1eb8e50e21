"""What every command shares: error reporting, run folders, device choice, JSON writing."""

from __future__ import annotations

import json
import os
import sys
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from omegaconf import DictConfig
from omegaconf.errors import MissingMandatoryValue

from fqtrun.errors import FqtrunError
from fqtrun.files import atomic_open


def user_error(exc: BaseException) -> BaseException | None:
    """The user-facing error inside `exc` (unwrapping hydra's InstantiationException), or None.

    Bad settings raise FqtrunError or ValueError with a one-line message naming the setting.
    """
    while isinstance(exc, InstantiationException) and exc.__cause__ is not None:
        exc = exc.__cause__
    if isinstance(exc, MissingMandatoryValue):
        return FqtrunError(f"{exc.full_key} is required and not set: pass {exc.full_key}=<value>")
    return exc if isinstance(exc, (FqtrunError, ValueError)) else None


def run_reporting_errors(task: Callable[[DictConfig, Path], object], cfg: DictConfig) -> object:
    """Run a command's task in Hydra's output folder; user errors become one line and exit 2.

    In a multirun (sweep) job any error is instead recorded in the job folder's failed.json and
    the job returns None, so one bad job does not take the sweep down (`fqtrun report` lists it).
    FQTRUN_DEBUG=1 re-raises errors with the traceback.
    """
    out = None
    try:
        out = run_dir()
        result = task(cfg, out)
    except Exception as e:
        err = user_error(e)
        if os.environ.get("FQTRUN_DEBUG") or (err is None and not in_multirun()):
            raise
        line = " ".join(str(err if err is not None else f"{type(e).__name__}: {e}").split())
        if not in_multirun():
            print(f"error: {line}", file=sys.stderr)
            sys.exit(2)
        record_failure(out, e, line, user=err is not None)
        print(f"error: job {out}: {line} (recorded in failed.json; the sweep goes on)", file=sys.stderr)
        return None
    (out / "failed.json").unlink(missing_ok=True)  # a re-run that succeeds clears an earlier failure
    return result


def in_multirun() -> bool:
    """True inside a Hydra multirun job (fqtrun <command> -m ...)."""
    try:
        return HydraConfig.get().mode == RunMode.MULTIRUN
    except ValueError:  # not running under Hydra
        return False


def record_failure(out: Path | None, exc: BaseException, line: str, user: bool) -> None:
    """failed.json in the job folder: the one-line error, its type, the overrides and the traceback."""
    if out is None:
        return
    data = {"error": line, "type": type(exc).__name__, "user_error": user, "overrides": task_overrides(),
            "traceback": traceback.format_exc()}
    try:
        write_json(out / "failed.json", data)
    except OSError:
        pass


def done_summary(out_dir: Path) -> dict | None:
    """The summary of a finished run in out_dir (skip_done), or None when there is none.

    Refuses a finished run made with other overrides: a re-run sweep numbers its jobs in the
    same order only when it has the same overrides (and the same hydra.sweep.dir).
    """
    path = out_dir / "summary.json"
    if not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # unreadable: run again
    ignore = ("skip_done=", "resume=")
    theirs = sorted(o for o in summary.get("overrides", []) if not o.startswith(ignore))
    ours = sorted(o for o in task_overrides() if not o.startswith(ignore))
    if theirs != ours:
        raise FqtrunError(f"skip_done=true but {out_dir} holds a finished run with other overrides "
                          f"({' '.join(theirs) or 'none'}): re-run a sweep with the same overrides, "
                          "or pick a new hydra.sweep.dir")
    return summary


def run_dir() -> Path:
    """The Hydra run (or multirun job) folder, created and checked writable."""
    out = Path(HydraConfig.get().runtime.output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        raise FqtrunError(f"output folder {out} cannot be written ({e.strerror}): "
                          "pass hydra.run.dir=<a writable folder>") from None
    return out


def hydra_choices() -> dict[str, str]:
    try:
        return {k: str(v) for k, v in HydraConfig.get().runtime.choices.items() if v is not None}
    except ValueError:  # not running under Hydra (tests calling run() directly)
        return {}


def task_overrides() -> list[str]:
    try:
        return list(HydraConfig.get().overrides.task)
    except ValueError:
        return []


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise FqtrunError("device=cuda but no CUDA device is visible: use device=cpu or device=auto")
    return torch.device(name)


def write_json(path: Path, data: dict) -> None:
    """Atomic JSON write (temp file + rename)."""
    with atomic_open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, default=str)


def checkpoint_path(value: str) -> Path:
    """A checkpoint setting as a file: a run folder means its last.pt."""
    path = Path(value).expanduser()
    return path / "last.pt" if path.is_dir() else path


def load_weights(model: torch.nn.Module, ckpt: dict, name: str, path: Path) -> None:
    """A checkpoint's weights into `model`, with one-line errors on a mismatch (check_matches).

    A sparse run's checkpoint holds weight masks: they are put on the quantized layers first (as
    their weight_mask buffers), so the model's forward matches the run's.
    """
    from fqtrun.quant.layers import QuantLayerMixin
    from fqtrun.training.checkpoint import check_matches

    for key, value in ckpt["model"].items():
        owner, _, leaf = key.rpartition(".")
        if leaf != "weight_mask" or not isinstance(value, torch.Tensor):
            continue
        try:
            layer = model.get_submodule(owner)
        except AttributeError:
            continue  # check_matches names the mismatch
        if isinstance(layer, QuantLayerMixin):
            layer.weight_mask = torch.zeros_like(value)
    check_matches(ckpt, model, name, path)
    model.load_state_dict(ckpt["model"])


def load_train_run(checkpoint: str, command: str, require: Callable | None = None
                   ) -> tuple[DictConfig, dict, torch.nn.Module, object, str]:
    """Rebuild a `fqtrun train` run's model from its folder: (run cfg, checkpoint, model in eval mode, data, name).

    `checkpoint` is a run folder's last.pt (or the folder); the model, dataset and quant/sparsity
    recipe come from the folder's .hydra/config.yaml; the weights load through load_weights
    (sparse runs' masks included). `command` names the caller in the error messages;
    `require(cfg, model, name)` may refuse the run (one-line error) before the weights are loaded.
    """
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from fqtrun.commands.train import build_model, quantize_model  # train imports this module
    from fqtrun.config import TrainConfig
    from fqtrun.errors import CheckpointError, ConfigError
    from fqtrun.quant.layers import NoiseContext
    from fqtrun.training.checkpoint import load_checkpoint

    path = checkpoint_path(checkpoint)
    ckpt = load_checkpoint(path)  # one-line CheckpointError when missing or corrupt
    cfg_path = path.parent / ".hydra" / "config.yaml"
    if not cfg_path.is_file():
        raise CheckpointError(f"{cfg_path} does not exist: {command} rebuilds the model from the run folder's "
                              "config; pass checkpoint=<a fqtrun train run folder>/last.pt")
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(TrainConfig), OmegaConf.load(cfg_path))
    except Exception as e:
        raise ConfigError(f"{cfg_path} does not match this fqtrun's train schema "
                          f"({' '.join(str(e).split())[:160]})") from None
    name = ckpt.get("model_name", "unknown")
    bundle = instantiate(cfg.dataset)
    model = build_model(cfg, bundle)
    if require is not None:
        require(cfg, model, name)
    quantize_model(cfg, model, NoiseContext(seed=cfg.seed))
    load_weights(model, ckpt, name, path)
    return cfg, ckpt, model.eval(), bundle, name
