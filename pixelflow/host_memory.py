"""Keep freed host memory in the process, so large CPU tensors do not page-fault on every allocation.

glibc's malloc serves blocks above its mmap threshold with fresh ``mmap`` pages and returns them
to the OS on free; it also trims the heap top once more than twice that threshold is free. A CPU
forward at sampling batch sizes allocates and frees tens of megabytes per layer, so every layer
pays the kernel's page faults again; keeping the pages makes large-batch CPU sampling faster (measured in
docs/notes/2026-12-cpu-sampling-speed.md). :func:`keep_freed_memory` raises both thresholds and keeps 64 MiB of
padding at the heap top, closer to how tcmalloc or jemalloc behave, for the sampling entrypoints.
The process then keeps what it freed for reuse; blocks of 32 MiB and more are still mapped and
returned each time.
Set ``PIXELFLOW_DEFAULT_MALLOC=1`` to leave malloc as it is.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

__all__ = ["keep_freed_memory"]

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3  # glibc <malloc.h>
_MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed value on 64-bit
_TRIM_THRESHOLD = (1 << 31) - 1
_TOP_PAD = 64 << 20  # kept at the heap top whenever it is trimmed all the same


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process; False where that is not possible (no glibc,
    e.g. macOS) or ``PIXELFLOW_DEFAULT_MALLOC`` is set."""
    if os.environ.get("PIXELFLOW_DEFAULT_MALLOC", "") not in ("", "0"):
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    settings = ((_M_MMAP_THRESHOLD, _MMAP_THRESHOLD), (_M_TRIM_THRESHOLD, _TRIM_THRESHOLD), (_M_TOP_PAD, _TOP_PAD))
    return all([bool(mallopt(option, value)) for option, value in settings])
