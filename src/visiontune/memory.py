"""Keeping the resident set small on glibc: CPU training frees and reallocates large blocks."""


def release_freed_memory() -> None:
    """Hand memory freed by the last phase back to the OS (glibc keeps it otherwise), so the
    peaks of backward and evaluation do not add up in the resident set."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to do
