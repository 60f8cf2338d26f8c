"""Errors a user can cause: one sentence naming the file or flag and the fix.

The CLI prints `str(error)` and exits with `error.exit_code`; it never shows a
traceback for these.
"""


class VisiontuneError(Exception):
    """Base class: a problem the user can fix. Exit code 1 (data/runtime)."""

    exit_code = 1


class UsageError(VisiontuneError):
    """A bad flag, path or argument: exit code 2, like argparse."""

    exit_code = 2


class DataError(VisiontuneError):
    """The data itself is unusable (no images, a single class, ...)."""

    exit_code = 2
