"""Write-then-rename for output folders, so a crash never leaves a half-written one where a reader looks."""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def staged_dir(target: Path) -> Iterator[Path]:
    """Yield a scratch folder beside `target`; on success it replaces `target`, on error it is removed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    # The writer's pid is in the name, so that what a killed process left is known (remove_orphaned_partials).
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-{os.getpid()}-", dir=target.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)


def remove_orphaned_partials(root: str | Path) -> list[Path]:
    """Remove the scratch folders of staged_dir (`.<name>.partial-<pid>-*`, `.<name>.old-<pid>`) under `root` whose
    writing process no longer exists: what a killed run left half-written. Returns what was removed."""
    import re

    pattern = re.compile(r"^\..+\.(?:partial|old)-(\d+)(?:-.*)?$")
    removed = []
    for path in Path(root).rglob(".*"):
        match = pattern.match(path.name)
        if not match or not path.is_dir():
            continue
        pid = int(match.group(1))
        try:
            os.kill(pid, 0)
            continue  # its writer is alive (or it is another user's: then it is not ours to remove)
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
