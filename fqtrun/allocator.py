"""Keep freed tensor memory in the process (glibc malloc), so big CPU temporaries are not page-faulted anew.

glibc hands blocks of more than ~128 KiB to mmap and gives them back to the system on free; the
next tensor of that size then pays one page fault per 4 KiB while it is first written. Quantizers
make several gradient-sized temporaries per layer and step (BHQ: about ten), so on CPU these
faults cost more than the arithmetic (measured: BHQ on a 4M-element gradient 26 ms -> 9 ms).
PyTorch's CPU guides give the same advice through jemalloc/tcmalloc; this is the in-process form.
The command-line entry calls it once (it sets the process's allocator, which is the process
owner's choice, not a library's); FQTRUN_MALLOC=system leaves the allocator as it is.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# mallopt(3) parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed value on 64-bit; larger blocks still use mmap
TRIM_THRESHOLD = 1 << 30  # free memory kept at the heap top before any is returned
TOP_PAD = 64 << 20  # extra heap asked for at each growth


def keep_freed_memory() -> bool:
    """Apply the settings above through mallopt; True when glibc took all three.

    A no-op (False) off Linux/glibc, or when FQTRUN_MALLOC=system is set.
    """
    if os.environ.get("FQTRUN_MALLOC", "").lower() == "system" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    settings = ((_M_MMAP_THRESHOLD, MMAP_THRESHOLD), (_M_TRIM_THRESHOLD, TRIM_THRESHOLD), (_M_TOP_PAD, TOP_PAD))
    return all(mallopt(param, value) == 1 for param, value in settings)
