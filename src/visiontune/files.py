"""Writing files so that a reader never sees half of one (no torch: used by the caches too)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable


def atomic_write(path: str | Path, write: Callable[[BinaryIO], object], durable: bool = True) -> None:
    """Write to a temporary file in the same folder, then rename it over `path`.

    A kill at any moment leaves the old file or the new one, never half of one.
    `durable` also fsyncs before the rename, so the new content survives a
    power cut: needed for checkpoints and run files, not for cache entries,
    which are simply computed again when lost.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp creates 0600; give the file the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            write(f)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
