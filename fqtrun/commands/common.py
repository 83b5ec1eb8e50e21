"""What every command shares at the command-line layer: one-line errors, run folders, sweep bookkeeping.

Library code never imports this module: it takes what it needs (an output folder, the overrides)
as arguments.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from omegaconf import DictConfig
from omegaconf.errors import MissingMandatoryValue

from fqtrun.errors import FqtrunError
from fqtrun.files import write_json
from fqtrun.quant.numerics import NonFiniteError


def user_error(exc: BaseException) -> BaseException | None:
    """The user-facing error inside `exc` (unwrapping hydra's InstantiationException), or None.

    Bad settings raise FqtrunError or ValueError with a one-line message naming the setting; a quantizer
    that met NaN/inf (NonFiniteError, naming the layer and slot) where no command turned it into one of
    those is reported the same way.
    """
    if isinstance(exc, InstantiationException):
        return construction_error(exc)
    if isinstance(exc, MissingMandatoryValue):
        return FqtrunError(f"{exc.full_key} is required and not set: pass {exc.full_key}=<value>")
    return exc if isinstance(exc, (FqtrunError, ValueError, NonFiniteError)) else None


def construction_error(exc: InstantiationException) -> BaseException | None:
    """The user error inside Hydra's multi-line "Error in call to target ..." (user_error's rules), or, for a
    component that does not take its settings (a keyword it has no parameter for, a wrong type), one line
    naming the config node, its class and the fix."""
    outer, cause = exc, exc
    while isinstance(cause, InstantiationException) and cause.__cause__ is not None:
        cause = cause.__cause__
    if not isinstance(cause, TypeError):
        return None if isinstance(cause, InstantiationException) else user_error(cause)
    key = re.search(r"full_key: (\S+)", str(outer))
    target = re.search(r"target '([^']+)'", str(outer))
    node = key.group(1) if key else "a component"
    built = f" ({target.group(1)})" if target else ""
    return FqtrunError(f"{node}{built} cannot be built from its settings: {' '.join(str(cause).split())}: "
                       "fix or drop that setting")


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
    """The config-group options this command was composed with (model=cnn1d, ...); {} outside Hydra."""
    try:
        return {k: str(v) for k, v in HydraConfig.get().runtime.choices.items() if v is not None}
    except ValueError:  # not running under Hydra (tests calling a command's function directly)
        return {}


def task_overrides() -> list[str]:
    """The command line's overrides of this job; [] outside Hydra."""
    try:
        return list(HydraConfig.get().overrides.task)
    except ValueError:
        return []


# Hydra flags whose next argument is their value, not a positional argument.
_VALUE_FLAGS = {"-c", "--cfg", "-p", "--package", "-cp", "--config-path", "-cn", "--config-name",
                "-cd", "--config-dir", "--experimental-rerun"}


def split_positionals(args: list[str]) -> tuple[list[str], list[str]]:
    """(positional arguments, Hydra flags and overrides), each in order: what a command's prepare_argv
    turns into overrides (report's folders, reproduce's experiment name). A path holding '=' that
    exists is positional."""
    positionals, rest, value_next = [], [], False
    for a in args:
        if value_next or a.startswith("-") or ("=" in a and not Path(a).exists()):
            rest.append(a)
            value_next = a in _VALUE_FLAGS
        else:
            positionals.append(a)
    return positionals, rest
