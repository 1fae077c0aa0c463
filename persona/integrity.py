"""Recorded hashes of what persona caches, checked whenever a cache is reused (issue #21, point 6).

A cache that no longer matches what was recorded when it was written (a truncated file, a disk that lost a block, a
hand edit) is moved aside or removed, rebuilt, and one line says what was found, where, and that it was rebuilt;
before, a damaged cache was reused by every later run until someone deleted it by hand. The caches and their records:

- the base model folder (persona.models): its manifest records each file's size, mtime and sha256;
- the curated dataset folder (assets/curated_dataset.py): RECORD, written last, has each file's size and sha256;
- the replay answers (persona.mixing): the file's first line has the sha256 of the rows after it;
- the baseline answers (persona.evaluation.AnswerCache): each file has the sha256 of its answers.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

from persona.storage import atomic_write_text

RECORD = "persona_files.json"  # {file name: {"bytes": size, "sha256": digest}} of a cached folder's files


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def record_files(folder: str | os.PathLike, names: list[str]) -> None:
    """Write RECORD into `folder`: the size and sha256 of each of `names`. Write it last: what it lists is complete."""
    folder = Path(folder)
    record = {name: {"bytes": (folder / name).stat().st_size, "sha256": sha256_file(folder / name)} for name in names}
    atomic_write_text(folder / RECORD, json.dumps(record, indent=1, sort_keys=True))


def has_record(folder: str | os.PathLike) -> bool:
    return Path(folder, RECORD).is_file()


def recorded_damage(folder: str | os.PathLike) -> str | None:
    """What in `folder` differs from its RECORD (a missing file, another size, another sha256), or None when all of
    it matches. Every listed file is hashed: meant for folders of small files (a curated dataset: kilobytes to a few
    megabytes, milliseconds)."""
    folder = Path(folder)
    try:
        record = json.loads((folder / RECORD).read_text(encoding="utf-8"))
        entries = {str(name): (int(e["bytes"]), str(e["sha256"])) for name, e in record.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        return f"its {RECORD} is unreadable ({type(exc).__name__})"
    for name, (size, digest) in sorted(entries.items()):
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        found = path.stat().st_size
        if found != size:
            return f"{name} has {found:,} bytes, {size:,} were recorded"
        if sha256_file(path) != digest:
            return f"{name} has another sha256 than the one recorded ({digest[:12]}…)"
    return None


def move_aside(path: str | os.PathLike) -> Path:
    """Rename `path` to '<name>.corrupt-<timestamp>' beside it (atomic: readers find either the old or nothing) and
    return the new path. A name already taken gets a counter."""
    path = Path(path)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    aside = path.with_name(f"{path.name}.corrupt-{stamp}")
    n = 1
    while aside.exists():
        n += 1
        aside = path.with_name(f"{path.name}.corrupt-{stamp}-{n}")
    os.replace(path, aside)
    return aside


def content_sha256(value) -> str:
    """sha256 of a JSON value in one canonical form (sorted keys, no spaces, UTF-8): what a JSON cache records of its
    content, so the check does not depend on how the file was formatted."""
    return hashlib.sha256(json.dumps(value, ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
