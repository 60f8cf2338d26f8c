"""Errors a user can cause: one sentence naming the file or flag and the fix.

The CLI prints `str(error)` and exits with `error.exit_code`; it never shows a
traceback for these. Exit codes a script can tell apart: 0 ok, 1 failed
(training stopped, failed checks), 2 bad command line, 3 bad data, 130
interrupted.
"""

import os


def env_world() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) as torchrun sets them; (0, 0, 1) without torchrun.
    Here, not in runtime (which loads torch), because which rank says an error is decided without torch."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")), world


class VisiontuneError(Exception):
    """Base class: a problem the user can fix. Exit code 1 (data/runtime)."""

    exit_code = 1


class UsageError(VisiontuneError):
    """A bad flag, path or argument: exit code 2, like argparse."""

    exit_code = 2


class DataError(VisiontuneError):
    """The data itself is unusable (no images, a single class, an unreadable layout, ...): exit code 3."""

    exit_code = 3
