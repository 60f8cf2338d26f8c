"""glibc's allocator on CPU training: keep large freed blocks for reuse within a phase, hand them back
to the OS between phases."""

import functools
import os

# mallopt's parameter numbers (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Blocks up to this size come from the heap and stay there when freed. A training step frees and
# allocates the same activation and gradient buffers (tens to hundreds of MB at batch 32-64) every step;
# with glibc's default (at most 32 MB, then a fresh mmap per block) each step returns them to the
# kernel and faults them in again, zeroed page by page: on 2 Intel cores that was a fifth of a
# hymenoptera run's CPU time spent in the kernel (sys 15 s of 81 s).
_REUSE_UP_TO = 1 << 30
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_MAX_", "GLIBC_TUNABLES")
_applied = False


def reuse_freed_memory() -> bool:
    """Let glibc reuse freed blocks of up to 1 GiB instead of unmapping them (what jemalloc and tcmalloc,
    which PyTorch's CPU tuning guide suggests preloading, do by design). The resident set still shrinks
    where release_freed_memory() is called, after each phase. Leaves alone a process whose user set glibc's
    malloc variables. True if the setting took effect (now or before)."""
    global _applied
    if _applied:
        return True
    if any(name in os.environ for name in _USER_SETTINGS):
        return False
    libc = _glibc()
    if libc is not None:
        # Setting either threshold turns off glibc's own adjustment of both, so set both.
        _applied = bool(libc.mallopt(_M_MMAP_THRESHOLD, _REUSE_UP_TO)
                        and libc.mallopt(_M_TRIM_THRESHOLD, _REUSE_UP_TO))
    return _applied


def release_freed_memory() -> None:
    """Hand memory freed by the last phase back to the OS (glibc keeps it otherwise), so the
    peaks of backward and evaluation do not add up in the resident set."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


@functools.cache
def _glibc():
    """glibc, or None where the C library is another (musl, macOS): its allocator does its own thing."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
