"""Portable numerics: with numerics.portable=true a run's metrics and weights are the same to the last bit on
any x86-64 CPU (AMD or Intel, AVX2 or AVX-512) running the same torch build; false (the default but for
`fqtrun reproduce`) runs the machine's fastest kernels.

What makes CPUs disagree, and the pin for each (measured in tests/test_portable.py where one CPU can show it):
- ATen picks its vector kernels by the CPU (DEFAULT, AVX2, AVX512 round differently): ATEN_CPU_CAPABILITY=
  default, read once at torch's first dispatch, so set before torch is imported.
- MKL picks a GEMM code branch by the CPU: MKL_CBWR=COMPATIBLE, the one branch MKL keeps the same on Intel
  and AMD (its other branches exist on Intel CPUs only), read when MKL starts.
- oneDNN compiles its kernels for the CPU's ISA; NNPACK blocks its convolutions by the L1 cache size: both
  off while the run lasts.
- Parallel reductions split by the thread count: a fixed count (`threads`, 1 when 0); runs agree with
  runs at the same count.
- fqtrun's C kernels: built for x86-64-v3, not -march=native (FQTRUN_PORTABLE=1, quant/native/library.py).

The environment is a process's, so the CLI sets it before importing a command (cli.pin_portable_numerics)
and job processes inherit it; a portable run in a process that is not pinned refuses to start. This module
imports torch only inside its functions: the CLI reads it before torch is loaded.
"""

from __future__ import annotations

import functools
import os
import platform
import re
from collections.abc import Callable, Iterator, MutableMapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from fqtrun.errors import ConfigError

PORTABLE_ENV = "FQTRUN_PORTABLE"  # "1": quant/native/library.py (its PORTABLE_ENV) builds the portable flags
ENV = {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE", PORTABLE_ENV: "1"}
PORTABLE_BY_DEFAULT = frozenset({"reproduce"})  # commands whose schema sets numerics.portable=true
CPU_FLAGS = ("avx2", "fma", "avx512f")  # the CPU features that pick native kernels
_MKL_BRANCHES = {0: "OFF", 1: "OFF", 2: "AUTO", 3: "COMPATIBLE"}  # mkl_cbwr_get(MKL_CBWR_BRANCH) values
_TRUE = {"true", "yes", "on", "1"}  # what OmegaConf reads as a true bool


@dataclass
class NumericsModeConfig:
    """portable: the same bits on every x86-64 CPU with this torch build (slower), or native kernels."""

    portable: bool = False


def wanted(command: str, args: Sequence[str]) -> bool:
    """Whether `fqtrun <command> <args>` may run portable: its last numerics.portable override (any true value
    of a sweep's comma list), else the command's default."""
    value = None
    for arg in args:
        m = re.fullmatch(r"(~|\+{0,2})numerics\.portable(?:=(.*))?", arg)
        if m:
            value = None if m.group(1) == "~" else m.group(2)
    if value is None:
        return command in PORTABLE_BY_DEFAULT
    return any(v.strip().lower() in _TRUE for v in value.split(","))


def pin_environment(environ: MutableMapping[str, str] = os.environ) -> bool:
    """Set ENV in environ (os.environ: this process, before torch loads, and every process it starts);
    True when a value changed."""
    changed = False
    for key, value in ENV.items():
        if environ.get(key) != value:
            environ[key] = value
            changed = True
    return changed


def unpinned() -> str | None:
    """What keeps this process from running portable, in one line naming the fix; None when nothing does."""
    import torch

    fix = ("start it with `fqtrun ... numerics.portable=true` (or, from Python, set "
           + " ".join(f"{k}={v}" for k, v in ENV.items()) + " before importing torch)")
    capability = torch.backends.cpu.get_cpu_capability()
    if capability != "DEFAULT":
        return f"numerics.portable=true but this process runs ATen's {capability} kernels: {fix}"
    branch = mkl_branch()
    if branch not in (None, "COMPATIBLE"):
        return f"numerics.portable=true but MKL runs its {branch} code branch: {fix}"
    if os.environ.get(PORTABLE_ENV) != "1":
        return f"numerics.portable=true but fqtrun's C kernels are built for this CPU ({PORTABLE_ENV}): {fix}"
    return None


@contextmanager
def numerics(portable: bool, threads: int = 0) -> Iterator[None]:
    """The body run portable (oneDNN and NNPACK off, `threads` or 1 torch threads, all restored afterwards),
    or as it is when portable is false; ConfigError when the process is not pinned (unpinned)."""
    if not portable:
        yield
        return
    if (problem := unpinned()) is not None:
        raise ConfigError(problem)
    import torch

    mkldnn, count = torch.backends.mkldnn.enabled, torch.get_num_threads()
    nnpack = torch.backends.nnpack.set_flags(False)[0]
    torch.backends.mkldnn.enabled = False
    torch.set_num_threads(threads if threads > 0 else 1)
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = mkldnn
        torch.backends.nnpack.set_flags(nnpack)
        torch.set_num_threads(count)


def check_cpu(device: str) -> None:
    """A portable run computes on the CPU: device=cuda (or auto where CUDA is there) is a ConfigError."""
    import torch

    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        raise ConfigError(f"numerics.portable=true pins the CPU's kernels, not the GPU's, and device={device} "
                          "would run on the GPU: pass device=cpu, or numerics.portable=false")


def portable_scope(run: Callable) -> Callable:
    """Decorator of a runs/ function `run(cfg, ...)`: its body inside numerics(cfg.numerics.portable,
    cfg.threads), on the CPU (check_cpu); a config without those settings runs as it is."""

    @functools.wraps(run)
    def scoped(cfg, *args, **kwargs):
        node = cfg.get("numerics")
        portable = bool(node is not None and node.get("portable"))
        if portable:
            check_cpu(cfg.get("device", "cpu"))
        with numerics(portable, int(cfg.get("threads") or 0)):
            return run(cfg, *args, **kwargs)

    return scoped


# ----- what a run ran on -----------------------------------------------------------------------------------
@functools.cache
def _cpu() -> tuple[str, tuple[str, ...]]:
    """(CPU model, its flags among CPU_FLAGS) from /proc/cpuinfo (platform's names elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine(), ()
    fields = dict(line.split(":", 1) for line in text.splitlines()[:40] if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = set(fields.get("flags", "").split())
    return fields.get("model name", platform.machine()), tuple(f for f in CPU_FLAGS if f in flags)


def mkl_branch() -> str | None:
    """MKL's conditional-reproducibility branch (OFF, AUTO, COMPATIBLE, ...), or None where torch has no MKL
    or its library does not say."""
    import ctypes

    import torch

    if not torch.backends.mkl.is_available():
        return None
    try:
        lib = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"))
        get = lib.mkl_serv_cbwr_get  # mkl_cbwr_get's exported name in torch's statically linked MKL
    except (OSError, AttributeError):
        return None
    get.restype, get.argtypes = ctypes.c_int, [ctypes.c_int]
    code = get(1)  # MKL_CBWR_BRANCH
    return _MKL_BRANCHES.get(code, f"branch {code}")


def _mkl_version() -> str | None:
    import torch

    m = re.search(r"Math Kernel Library Version ([0-9.]+)", torch.__config__.show())
    return m.group(1) if m else None


def machine_info(portable: bool) -> dict:
    """What decides a run's bits: CPU, its vector flags, ATen's kernels, torch, MKL (version, branch),
    threads, fqtrun's kernel build, and whether the run was portable; summary.json's "machine" (tables.md
    lists them: report/machines.py)."""
    import torch

    from fqtrun.quant.native.library import target

    cpu, flags = _cpu()
    return {"cpu": cpu, "cpu_flags": list(flags), "aten_capability": torch.backends.cpu.get_cpu_capability(),
            "torch": torch.__version__, "mkl": _mkl_version(), "mkl_branch": mkl_branch(),
            "threads": torch.get_num_threads(), "kernels": target(), "portable": bool(portable)}
