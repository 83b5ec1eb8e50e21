"""Building, caching and loading kernels.c, and what every wrapper needs to call it.

The library is compiled on first use with the machine's C compiler (about two seconds), cached under
~/.cache/fqtrun/native keyed by the source, flags, compiler and CPU (it is built for the CPU's own
vector units), and loaded with ctypes. In a portable process (FQTRUN_PORTABLE=1, fqtrun/numerics_mode.py)
it is built for x86-64-v3 instead, the same instructions on every AVX2 or AVX-512 CPU, under its own key.
Without a compiler (or with FQTRUN_NATIVE=0) `load()` is None, with a warning once, and every wrapper
returns None so that its caller runs the torch form.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

Tensor = torch.Tensor
SOURCE = Path(__file__).with_name("kernels.c")
PORTABLE_ENV = "FQTRUN_PORTABLE"  # "1": the portable build (set with numerics_mode.ENV, before torch loads)

_p, _i32, _i64, _f32, _u32 = ctypes.c_void_p, ctypes.c_int32, ctypes.c_int64, ctypes.c_float, ctypes.c_uint32


class SRTarget(ctypes.Structure):
    """kernels.c sr_target: one grid and what to write (see there)."""

    _fields_ = [("kind", _i32), ("big", _f32), ("k1", _u32), ("k2", _u32), ("scale", _p), ("inv", _p),
                ("zero", _p), ("lo", _p), ("values", _p), ("codes", _p), ("rowsum", _p), ("colsum", _p)]


class EpilogueArgs(ctypes.Structure):
    """kernels.c epilogue_args."""

    _fields_ = [("alpha_a", _p), ("row_a", _p), ("col_term", _p), ("alpha_b", _p), ("scale_a", _p),
                ("scale_b", _p), ("offset_a", _p), ("bias", _p), ("alpha_a_rows", _i32), ("row_a_rows", _i32),
                ("col_term_cols", _i32), ("alpha_b_cols", _i32), ("scale_a_rows", _i32), ("scale_b_cols", _i32),
                ("offset_a_rows", _i32)]


_SIGNATURES = {
    "range_pass": [_p, _i64, _i64, _p, _p, _p, _p, ctypes.c_int],
    "sr_pass": [_p, _i64, _i64, ctypes.POINTER(SRTarget), ctypes.c_int, ctypes.c_int],
    "bhq_setup": [_p, _i64, _p, _p, _p, _p, _p, _p, _p, _p],
    "bhq_pass": [_p, _p, _i64, _i64, _i64, _p, _p, _p, _p, _p, _p, _p, _p, ctypes.c_int],
    "bhq_sr": [_p, _i64, _i64, _i64, _p, _p, _p, _p, _p, _p, ctypes.POINTER(SRTarget), _p, _p, ctypes.c_int],
    "nearest_pass": [_p, _i64, _i64, ctypes.c_int, _p, _p, _f32, _p, _p, _p, ctypes.c_int],
    "epilogue": [_p, _i64, _i64, ctypes.POINTER(EpilogueArgs), ctypes.c_int],
    "covering_grid": [_p, _p, _i64, _f32, _p, _p],
    "minmax_quant": [_p, _p, _i64, _i64, ctypes.c_int, _f32, ctypes.c_int, _p, _p, ctypes.c_int],
}


@functools.cache
def _cpu_flags() -> list[str]:
    """This CPU's feature flags (/proc/cpuinfo), part of the cache key since the build targets it."""
    try:
        cpu = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    return next((line.split(":", 1)[-1].split() for line in cpu.splitlines() if line.startswith("flags")), [])


# x86-64-v3 (AVX2, FMA, BMI, F16C, ...) as /proc/cpuinfo names its features
_V3_FLAGS = {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave", "sse4_1", "sse4_2",
             "ssse3", "popcnt", "cx16", "lahf_lm"}


def portable() -> bool:
    """Whether this process builds the portable flag set (FQTRUN_PORTABLE=1, set by numerics_mode)."""
    return os.environ.get(PORTABLE_ENV) == "1"


def _arch() -> str:
    """The instruction set to build for: native (this CPU), x86-64-v3 / x86-64 (portable), or the
    compiler's default off x86-64."""
    if platform.machine() != "x86_64":
        return "default"
    if not portable():
        return "native"
    return "x86-64-v3" if _V3_FLAGS <= set(_cpu_flags()) else "x86-64"


def target() -> str:
    """What runs the kernels (a run's machine info): the instruction set they are built for (_arch), or
    "none" where they are not built (no compiler, FQTRUN_NATIVE=0: the torch forms run)."""
    if _compiler() is None or os.environ.get("FQTRUN_NATIVE", "1") == "0":
        return "none"
    return _arch()


def flags() -> list[str]:
    """Built for this CPU (its vector units, hardware FMA where it has it, else libm's fmaf), or in a portable
    process for _arch(); no contraction of a * b + c beyond the explicit fmaf, so the roundings are the
    torch forms' and every target rounds alike (fmaf is exact in hardware and in libm)."""
    out = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-fast-math", "-fno-trapping-math", "-shared", "-fPIC"]
    arch = _arch()
    if arch == "native":
        out.append("-march=native")
        if "fma" in _cpu_flags():
            out.append("-mfma")
    elif arch != "default":
        out += [f"-march={arch}", "-mtune=generic"]
    return out


def has_fma() -> bool:
    """Whether the build uses hardware FMA, as torch's CPU kernels do: then the kernels equal the torch
    forms bit for bit (elsewhere to float rounding)."""
    return "-mfma" in flags() or "-march=x86-64-v3" in flags()


def _cache_dir() -> Path:
    return Path(os.environ.get("FQTRUN_NATIVE_CACHE", "~/.cache/fqtrun/native")).expanduser()


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


SHARED = [Path(__file__).with_name("noise.h")]  # headers the kernels #include (part of the cache key)


def build(name: str, source: str) -> ctypes.CDLL | None:
    """C `source` compiled for _arch() and loaded, cached by source, headers, flags, compiler and CPU;
    None with a warning when there is no compiler or the build fails (FQTRUN_NATIVE=0 turns it off)."""
    cc = _compiler()
    if cc is None or os.environ.get("FQTRUN_NATIVE", "1") == "0":
        return None
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
        cpu = _cpu_flags() if _arch() == "native" else []  # a portable build is not this CPU's own
        parts = [source, *(h.read_text() for h in SHARED), *flags(), version, platform.machine(), *cpu]
        key = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]
        path = _cache_dir() / f"{name}-{key}.so"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
                src, lib = Path(tmp) / f"{name}.c", Path(tmp) / f"{name}.so"
                src.write_text(source)
                subprocess.run([cc, *flags(), "-I", str(SOURCE.parent), str(src), "-o", str(lib), "-lm"],
                               check=True, capture_output=True, text=True, timeout=120)
                os.replace(lib, path)  # atomic: parallel sweep jobs may build it at the same time
        return ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError) as err:
        detail = getattr(err, "stderr", "") or err
        warnings.warn(f"{name} native kernels unavailable ({str(detail)[:200]}); using the torch forms")
        return None


@functools.cache
def load() -> ctypes.CDLL | None:
    """The compiled quantizer kernels (kernels.c), or None."""
    so = build("kernels", SOURCE.read_text())
    if so is not None:
        for name, args in _SIGNATURES.items():
            fn = getattr(so, name)
            fn.restype, fn.argtypes = ctypes.c_int, args
    return so


def ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def plain(*tensors: Tensor | None) -> bool:
    """Whether the kernels can read these (None entries skipped): contiguous CPU tensors with real data.

    Fake/meta tensors (tracing, shape checks) and subclasses have no data; the kernels are invisible to
    autograd, so a tensor that would need a gradient through them is refused too.
    """
    for t in tensors:
        if t is None:
            continue
        if type(t) is not torch.Tensor or t.device.type != "cpu" or not t.is_contiguous():
            return False
        if torch.is_grad_enabled() and t.requires_grad:
            return False
    return True


def threads() -> int:
    return torch.get_num_threads()


def check(rc: int, kernel: str) -> None:
    if rc != 0:
        raise MemoryError(f"{kernel}: out of memory for its scratch buffers")
