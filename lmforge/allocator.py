"""The C heap under PyTorch's CPU tensors: keep freed memory in the process for reuse.

glibc's malloc serves a block above its mmap threshold with a fresh mapping and unmaps it on
free; the threshold starts at 128 KB and rises to the largest such block freed (up to 32 MB),
and the top of the heap goes back to the OS whenever more than twice that lies free there.
A model's activations are blocks of that size, freed and made again in every layer of every
step, so memory keeps going back to the OS and every new tensor page-faults it in again. On
a 2-core EPYC that was 16% of `lmforge eval`'s PIQA scoring pass (chat base, 300 items:
1.28-1.33 s against 1.07-1.12 s with the thresholds fixed as here). Fixed thresholds are what
glibc's own MALLOC_MMAP_THRESHOLD_ and MALLOC_TRIM_THRESHOLD_ variables set; PyTorch's CPU
tuning guide reaches the same end by preloading jemalloc or tcmalloc.
"""

from __future__ import annotations

import ctypes
import os
import sys

KEEP_ENV = "LMFORGE_KEEP_FREED_MEMORY"
"""Set to 0 to leave glibc's malloc as it is."""
GLIBC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")
"""glibc's own settings: whoever set one of these chose for themselves."""

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (malloc.h)
MMAP_THRESHOLD = 32 << 20
"""Blocks larger than this (glibc's own ceiling for the threshold) still get their own
mapping and go back on free: only whole-model buffers are that large."""
TRIM_THRESHOLD = 1 << 30
"""Free memory kept at the top of the heap before any goes back to the OS."""


def keep_freed_memory() -> bool:
    """Fix glibc's mmap and trim thresholds so that freed tensor memory stays in the process
    (the peak resident size stays as it was; it is not given back between steps). Returns
    whether they were set: not off Linux, under another C library, with KEEP_ENV=0, or where
    one of glibc's own variables (GLIBC_ENV) is set."""
    if sys.platform != "linux" or os.environ.get(KEEP_ENV, "1") == "0":
        return False
    if any(name in os.environ for name in GLIBC_ENV):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 (glibc only: musl has no such symbol)
    except (OSError, AttributeError):
        return False
    mmap_set = libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    return libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1 and mmap_set
