"""The CPU allocator setting for training and encoding processes: keep freed memory for the next step.

Process-wide and permanent, so nothing in fastspec applies it on its own: training applies it when asked
(`TrainConfig.retain_cpu_memory`, `fastspec train --retain-cpu-memory`), and the `fastspec encode` command,
whose process does nothing but encode, applies it on CPU. A library caller decides for its own process.
"""
from __future__ import annotations

import ctypes
import os
import platform

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers
_retaining: bool | None = None  # None: not tried yet


def retain_freed_cpu_memory() -> bool:
    """Keep memory that CPU tensors free inside the process, for the next step, instead of returning it to the OS.

    glibc serves every allocation above 32 MB with a fresh mmap and unmaps it on free (the conv outputs of a
    batch of 64 SDSS spectra are 51–128 MB each), so every training step page-faults its whole working set
    in again. Raising glibc's mmap and trim thresholds keeps freed blocks in the heap: peak memory does not
    grow, but the process keeps its peak. What it buys is measured by bench/bench_allocator.py.

    Process-wide and permanent. Returns True if applied (glibc only; elsewhere a no-op returning False). Not
    applied either where the user set glibc's malloc tunables (`GLIBC_TUNABLES=glibc.malloc.…`): those are the
    process's allocator settings then, e.g. `LEAN_GLIBC_TUNABLES`.
    """
    global _retaining
    if _retaining is None:
        _retaining = False
        try:
            if user_malloc_tunables():
                return _retaining
            if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
                libc = ctypes.CDLL("libc.so.6")
                ok = libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30) == 1
                _retaining = ok and libc.mallopt(_M_TRIM_THRESHOLD, (1 << 31) - 1) == 1
        except (OSError, AttributeError):
            pass
    return _retaining


# Returned memory without the page-fault cost: large blocks get their own mappings (unmapped when freed, so no
# fragmentation) backed by transparent huge pages (glibc >= 2.35; THP "madvise" or "always"). Set before the
# process starts; bench/results/train-whole.md measures what it saves and costs.
LEAN_GLIBC_TUNABLES = "glibc.malloc.hugetlb=1:glibc.malloc.mmap_threshold=131072"


def user_malloc_tunables() -> bool:
    """Whether this process was started with glibc malloc tunables (GLIBC_TUNABLES=glibc.malloc.…)."""
    return "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", "")


def retaining_freed_cpu_memory() -> bool | None:
    """Whether `retain_freed_cpu_memory` has been applied in this process (None: never asked)."""
    return _retaining


__all__ = ["LEAN_GLIBC_TUNABLES", "retain_freed_cpu_memory", "retaining_freed_cpu_memory", "user_malloc_tunables"]
