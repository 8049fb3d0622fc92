"""Keep freed host memory inside the process, so that a training step does not map and zero its
large buffers again every time.

glibc's malloc serves every allocation above its mmap threshold (at most 32 MB) with a fresh
mmap and unmaps it on free. At full width a local step allocates and frees hundreds of such
buffers (the 8192 x 8192 B matrices' gradients, AdamW's temporaries, full-width activations), so
each step pays about a million page faults, each zeroing a page: on 2 CPU cores that was 40 % of
a step's time. With mmap off and trimming off, freed blocks stay in malloc's heap and the next
step reuses them without a fault. The cost is peak memory: a freed block of one size is not
always reusable for a request of another, so the heap can grow beyond the work's own peak (+2 %
at full width and 32 px, +9 % to +50 % at 96 px: BENCHMARKS.md). Where memory is tight, turn it off.

A process-wide setting: `keep_freed_memory()` is called once, at the start of a rank's job
(`sim.run.job`), when `train.keep_freed_memory` is true (the default).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import platform

# mallopt parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
NEVER_TRIM = 2**31 - 1  # the largest value mallopt takes (an int): freed memory is never trimmed

_applied: str | None = None


def keep_freed_memory() -> str | None:
    """Tell glibc's malloc to keep freed memory (no mmap for large blocks, no trimming). Returns
    what was set, as summary.json records it, or None where the C library is not glibc (musl,
    macOS, Windows: their allocators are left as they are)."""
    global _applied
    if _applied is not None:
        return _applied
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    done = [text for text, ok in (("mmap off (M_MMAP_MAX=0)", libc.mallopt(M_MMAP_MAX, 0)),
                                  (f"trimming off (M_TRIM_THRESHOLD={NEVER_TRIM})",
                                   libc.mallopt(M_TRIM_THRESHOLD, NEVER_TRIM))) if ok]
    if not done:
        return None  # glibc refused both (it never has): nothing changed that a run should report
    _applied = "glibc malloc: " + ", ".join(done)
    return _applied


def kept_setting() -> str | None:
    """What `keep_freed_memory` set in this process, or None if it was not called or changed nothing."""
    return _applied
