"""Keep freed host memory inside the process, so that a training step does not map and zero its
large buffers again every time.

glibc's malloc serves every allocation above its mmap threshold (at most 32 MB) with a fresh
mmap and unmaps it on free. At full width a local step allocates and frees hundreds of such
buffers (the 8192 x 8192 B matrices' gradients, AdamW's temporaries, full-width activations), so
each step pays about a million page faults, each zeroing a page: on 2 CPU cores that was 40 % of
a step's time. With mmap off and trimming off, freed blocks stay in malloc's heap and the next
step reuses them without a fault. The cost is peak memory: with mmap off, a large request that no
freed hole fits extends the heap, within a step as well as across steps, so the heap grows beyond
the work's own peak. How far depends on how much of a process's memory is activity of changing
sizes rather than weights and optimiser state, which keep their size (measured, peak kept / peak with
glibc's default, full width, batch 32): at 32 px, clapp_pp in one process, activity 0.04 of its state
(the B matrices dominate), +2 % to +5 %; clapp_pp_dfb, 0.14, +4 %; clapp, 0.50, +17 %; bp_infonce, 1.2,
+14 %; at 96 px, clapp_pp in one process, 0.39, +9 %; the K = 6 ranks, 0.25 to 5.0, +11 % to +55 %. So
by default (`train.keep_freed_memory = "auto"`) a process keeps freed memory only where its blocks'
activity is below KEEP_BELOW of their state or below SMALL_ACTIVITY in bytes (`keeping_pays`, from
Plan.held_memory): every run at small width, the local rules at full width and 32 px, not BP-SSL at full
width, not 96 px; true keeps it always, false never. Another allocator
does not do better here (block 1 of K = 6 at 96 px: jemalloc without decay +12 %, tcmalloc +25 %;
glibc's transparent huge pages fault less but step slower: BENCHMARKS.md).

A process-wide setting: `keep_freed_memory()` is called once, at the start of a rank's job
(`sim.run.job`), and `give_back_freed_memory()` when its training ends, before the probe: the probe's
buffers come and go with glibc's defaults, and what training freed goes back to the system.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import platform

# mallopt parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
NEVER_TRIM = 2**31 - 1  # the largest value mallopt takes (an int): freed memory is never trimmed
DEFAULT_MMAP_MAX, DEFAULT_TRIM_THRESHOLD = 65536, 128 * 1024  # glibc's own
KEEP_BELOW = 0.25  # "auto" keeps freed memory where activity < KEEP_BELOW x weights and optimiser state,
SMALL_ACTIVITY = 256 * 2**20  # or where the activity (and so the heap's slack) is small in bytes

_applied: str | None = None


def keeping_pays(held: dict[str, int]) -> bool:
    """Whether a process holding `held` (Plan.held_memory of its blocks) keeps freed memory under "auto":
    its activity, whose buffers change size within a step and so make the heap's slack, is small beside
    its state, which does not, or small in bytes (then keeping costs a few MiB: at width 1/8 it makes
    the main job 15-25 % faster for 20 MiB)."""
    return held["activity"] < max(KEEP_BELOW * held["optimizer_state"], SMALL_ACTIVITY)


def keeps(setting: bool | str, held: dict[str, int] | None) -> bool:
    """Whether a process keeps freed memory under `train.keep_freed_memory = setting` (True, False or
    "auto") when its blocks hold `held` (Plan.held_memory; None where unknown: "auto" does not keep)."""
    return setting is True or (setting == "auto" and held is not None and keeping_pays(held))


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


def give_back_freed_memory() -> None:
    """Undo `keep_freed_memory`: glibc's defaults again, and every freed page handed back (malloc_trim)."""
    global _applied
    if _applied is None:
        return
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    libc.mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX)
    libc.mallopt(M_TRIM_THRESHOLD, DEFAULT_TRIM_THRESHOLD)
    libc.malloc_trim(0)
    _applied = None  # a later job in this process decides again


def kept_setting() -> str | None:
    """What `keep_freed_memory` set in this process, or None if it was not called or changed nothing."""
    return _applied
