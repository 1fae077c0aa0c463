"""Machine-wide locks on files (flock): one training at a time, one promotion decision at a time, one first start
of a fresh home at a time. The kernel releases a lock when its holder dies, however it dies, so a killed process
never leaves one behind."""
from __future__ import annotations

import fcntl
import json
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator


def holder(path: str | Path) -> dict:
    """What the lock's current (or last) holder wrote: pid, what, since; {} if unknown."""
    try:
        return json.loads(Path(path).read_text() or "{}")
    except (OSError, ValueError):
        return {}


@contextmanager
def exclusive(path: str | Path, what: str, on_wait: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold the lock file `path` for the block. If another process holds it, say so once through `on_wait` (who
    holds it, doing what, since when) and wait for it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait:
                h = holder(path)
                since = time.strftime("%H:%M:%S", time.localtime(h["since"])) if "since" in h else "?"
                on_wait(f"waiting for {h.get('what', 'another process')} (pid {h.get('pid', '?')}, since {since}) "
                        f"to finish: one at a time on this machine ({path})")
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "what": what, "since": time.time()}).encode(), 0)
        yield
    finally:
        os.close(fd)  # (releases the lock)
