"""Progress of long loops (epochs, feature extraction, image checks), fit for where output goes.

- a terminal or a Jupyter notebook: tqdm.auto's bar (a widget in notebooks, text in terminals);
- anything else (CI logs, files, pipes): plain lines, at most one every PLAIN_INTERVAL seconds
  inside a long loop, with the count, items/s and the time left; short loops print nothing (the
  epoch line that follows says it all);
- --quiet: nothing.
"""

from __future__ import annotations

import sys
import time
from typing import Callable, Iterable, Iterator

PLAIN_INTERVAL = 30.0  # seconds between two plain progress lines of one loop


def in_notebook() -> bool:
    shell = sys.modules.get("IPython")
    if shell is None:
        return False
    ipython = shell.get_ipython() if hasattr(shell, "get_ipython") else None
    return type(ipython).__name__ == "ZMQInteractiveShell"  # Jupyter, JupyterLab, VS Code notebooks, Colab


def style(enabled: bool, stream=None) -> str:
    """"bar", "lines" or "off"."""
    if not enabled:
        return "off"
    stream = stream or sys.stderr
    if in_notebook() or (hasattr(stream, "isatty") and stream.isatty()):
        return "bar"
    return "lines"


def _count(item) -> int:
    """Images in one item of a loop: an (images, labels) batch's length, a chunk's length, else 1."""
    if isinstance(item, (tuple, list)) and item:
        return len(item[0]) if hasattr(item[0], "shape") and item[0].shape else len(item)
    return 1


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def plain_lines(iterable: Iterable, total: int | None, desc: str, stream=None) -> Iterator:
    stream = stream or sys.stderr
    started = last = time.perf_counter()
    done = images = 0
    for item in iterable:
        yield item
        done += 1
        images += _count(item)
        now = time.perf_counter()
        if now - last >= PLAIN_INTERVAL and (total is None or done < total):
            last = now
            rate = images / (now - started)
            left = f", about {_duration((now - started) / done * (total - done))} left" if total else ""
            print(f"{desc}: {done}/{total if total else '?'} ({rate:.1f} images/s{left})", file=stream, flush=True)


def progress_bar(enabled: bool) -> Callable:
    """wrap(iterable, total, desc) -> the same items, with progress shown as `style` says."""
    kind = style(enabled)

    def wrap(iterable, total=None, desc=""):
        if kind == "bar":
            from tqdm.auto import tqdm

            return tqdm(iterable, total=total, desc=desc, leave=False, file=None if in_notebook() else sys.stderr)
        if kind == "lines":
            return plain_lines(iterable, total, desc)
        return iterable

    return wrap
