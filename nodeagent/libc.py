"""The glibc calls the os module lacks, bound once through ctypes (stdlib).

Each wrapper returns False where the call is missing (not Linux, not glibc) or refused,
and the caller goes on without it: both only save time or memory, never correctness.
"""

from __future__ import annotations

import ctypes
import ctypes.util

_FALLOC_FL_KEEP_SIZE = 1
_M_ARENA_MAX = -8  # mallopt parameter (malloc.h)


def _bind(name: str, argtypes: list, restype):
    try:
        fn = getattr(ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True), name)
    except (OSError, AttributeError, TypeError):
        return None
    fn.argtypes = argtypes
    fn.restype = restype
    return fn


_fallocate = _bind("fallocate", [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64], ctypes.c_int)
_malloc_trim = _bind("malloc_trim", [ctypes.c_size_t], ctypes.c_int)
_mallopt = _bind("mallopt", [ctypes.c_int, ctypes.c_int], ctypes.c_int)


def reserve_blocks(fd: int, size: int) -> bool:
    """Allocate the blocks of ``fd`` up to ``size`` bytes without changing its length
    (``fallocate`` with ``FALLOC_FL_KEEP_SIZE``), so an append followed by an fsync only
    writes data and the new length, not new block allocations: on this machine's ext4
    that is about a fifth of every fsync under three writers (docs/BENCHMARKS.md). The
    file reads back exactly as without it."""
    if _fallocate is None:
        return False
    return _fallocate(fd, _FALLOC_FL_KEEP_SIZE, 0, size) == 0


def release_free_memory() -> bool:
    """Hand the C heap's free pages back to the OS (``malloc_trim``). A snapshot
    serializes the whole state in a worker thread (tens of MB, in that thread's malloc
    arena) and frees it; without this the agent's RSS kept most of each such peak: 526
    against 396 bytes of RSS per key written over 16 s of 32 writers
    (docs/BENCHMARKS.md). Once per snapshot: under a millisecond."""
    if _malloc_trim is None:
        return False
    _malloc_trim(0)
    return True


def share_one_malloc_arena() -> bool:
    """Make every thread allocate from the main malloc arena (``mallopt(M_ARENA_MAX,
    1)``). By default glibc gives each thread that allocates its own arena; the worker
    threads that fsync and serialize snapshots then leave pages there that the main
    thread never reuses. Over 10 s of 32 writers (about 52k keys) an agent ended at
    49 MB with one arena against 51-58 MB without (docs/BENCHMARKS.md). Python objects
    come from pymalloc's own arenas, so the main thread does not wait on the shared
    arena's lock. Call it before any thread starts."""
    if _mallopt is None:
        return False
    return _mallopt(_M_ARENA_MAX, 1) == 1
