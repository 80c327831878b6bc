"""Keep freed large CPU buffers in the process instead of returning them to the kernel on every free.

glibc serves blocks above its mmap threshold (at most 32 MiB) with a fresh ``mmap`` and unmaps them on free, so a
train step whose activations are that large page-faults through every one of them again on the next step: measured
on a MoE layer step of the performance issue's first shape under bf16 autocast (2-core CPU, 1 thread), 63k minor
page faults and ~100 ms of kernel time a step out of ~600 ms; with mmap off and no trimming, 4k faults and
455-483 ms. (jemalloc or tcmalloc through ``LD_PRELOAD`` do the same; this needs nothing installed.)
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

__all__ = ['keep_freed_memory']

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)
OPT_OUT = 'SIMOE_DEFAULT_MALLOC'


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to serve large blocks from its heap and never trim it; False (a no-op) off glibc/Linux,
    or when the environment variable ``SIMOE_DEFAULT_MALLOC=1`` opts out. Call once, at program start."""
    if os.environ.get(OPT_OUT) == '1' or not sys.platform.startswith('linux'):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2 ** 31 - 1))
