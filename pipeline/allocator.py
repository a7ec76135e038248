"""Keep freed memory in the process instead of handing it back to the OS (glibc only).

Why. glibc serves large allocations with fresh ``mmap`` pages and returns freed ones to the OS, so
every HVP re-faults its temporaries: on the digits CNN (float64, 2 micro-batches of 450) that was
typically ≈3,700 minor page faults (≈15 MB of zeroed pages) per product, ≈15% of its time, with
per-product times jittering by ±25% (glibc's dynamic threshold sometimes adapts by itself, so the
count varies from run to run). A pool of actors waits for its slowest member on every product, so
that jitter costs parallel efficiency directly. Fixing the mmap threshold (1 GiB) and disabling
trimming makes the allocator reuse its heap: measured 22.8 ms steady per product against 23–36 ms,
and faults near zero (COST.md, "Process memory").

Only for processes eqlab owns (its Ray actors, the ``eqlab`` CLI): it is a process-wide setting and
the price is that the process keeps its peak heap until it exits. A user's own Python process is
never changed by importing eqlab.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import platform

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc <malloc.h>

# Products that run on a thread other than the main one (an actor's same-node channel,
# pipeline/actor_channel.py) allocate from a secondary glibc arena, and glibc unmaps a secondary
# arena's heap as soon as it is entirely free, whatever the thresholds below: every product re-faults
# its temporaries again (digits CNN, k = 4 columns: ≈ 5,000 page faults per product on the channel
# thread against ≈ 150 on the main thread, and 20% slower). With one arena every thread allocates from
# the main heap. glibc reads this only when a process starts, so it goes to actors as an environment
# variable (harmless off glibc).
ONE_ARENA_ENV = {"MALLOC_ARENA_MAX": "1"}
_applied = False


def keep_freed_memory(mmap_threshold: int = 1 << 30, trim_threshold: int = 2**31 - 1) -> bool:
    """Apply the setting once per process; returns whether it is in effect (False off glibc)."""
    global _applied
    if _applied:
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold) == 1 and libc.mallopt(M_TRIM_THRESHOLD, trim_threshold) == 1
    except (OSError, AttributeError):
        return False
    _applied = ok
    return ok
