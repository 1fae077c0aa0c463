"""The local MLflow store, mlruns/mlflow.db (SQLite) beside mlruns/artifacts/, kept from losing its history.

MLflow creates a fresh database wherever it finds none, or an empty file, and says nothing: after a crash, a full
disk or a bad copy truncated mlflow.db, the next run would start a new history, and the earlier runs, their
metrics and the champion alias would be gone while their artifacts stay behind. So a database that is missing, empty
or without runs while the artifacts folder holds earlier runs' folders is refused, as is one that SQLite cannot read
(`check_local_store`); nothing is written then. Every training run starts with a copy of the database beside it
(`backup_local_store`), which the refusal names. `remove_run_artifacts` removes what a failed run had logged.
"""
from __future__ import annotations

import os
import re
import shutil
import sqlite3
import time
from pathlib import Path
from urllib.parse import unquote, urlparse

from dagster import Failure

RUN_FOLDER = re.compile(r"^[0-9a-f]{32}$")  # MLflow run ids name the run folders under the artifact root
SQLITE_HEADER = b"SQLite format 3\x00"
BACKUP_SUFFIX = ".backup"
_verified: set[tuple[str, int]] = set()   # (database, inode) that passed SQLite's quick_check in this process


class TrackingStoreError(Failure):
    """The tracking store cannot be used as it is; the message says what happened and what to do. Not retried."""

    def __init__(self, description: str):
        super().__init__(description=description, allow_retries=False)


def local_path(location: str | None) -> Path | None:
    """A local folder from a path or a file:// URI; None for anything else (a server's store)."""
    if not location:
        return None
    if location.startswith("file:"):
        return Path(unquote(urlparse(location).path))
    return None if "://" in location else Path(location)


def earlier_runs(artifact_root: Path | None) -> list[Path]:
    """The run folders under the artifact root (persona's layout <root>/<run id>, or MLflow's default
    <root>/<experiment id>/<run id>)."""
    if artifact_root is None or not artifact_root.is_dir():
        return []
    found = []
    for entry in artifact_root.iterdir():
        if entry.is_dir() and RUN_FOLDER.match(entry.name):
            found.append(entry)
        elif entry.is_dir() and entry.name.isdigit():
            found += [run for run in entry.iterdir() if run.is_dir() and RUN_FOLDER.match(run.name)]
    return found


def backup_path(db: Path) -> Path:
    return db.with_name(db.name + BACKUP_SUFFIX)


def _damage(db: Path, thorough: bool) -> tuple[str | None, int | None]:
    """(what is wrong with the database, or None; how many runs it holds, None without MLflow's tables)."""
    with open(db, "rb") as f:
        if f.read(len(SQLITE_HEADER)) != SQLITE_HEADER:
            return "it is not an SQLite database", None
    try:
        con = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True, timeout=30)
        try:
            tables = {row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if thorough:
                verdict = con.execute("PRAGMA quick_check").fetchone()[0]
                if verdict != "ok":
                    return f"SQLite's check: {verdict}", None
            runs = con.execute("SELECT count(*) FROM runs").fetchone()[0] if "runs" in tables else None
        finally:
            con.close()
    except sqlite3.OperationalError as exc:
        if re.search(r"locked|busy", str(exc)):
            return None, 1  # another process is writing to it: readable, so not damaged
        return f"SQLite: {exc}", None
    except sqlite3.DatabaseError as exc:
        return f"SQLite: {exc}", None
    return None, runs


def check_local_store(db: Path, artifact_root: Path | None) -> None:
    """Raise TrackingStoreError if the database at `db` is damaged, or missing, empty or without runs while
    `artifact_root` holds earlier runs' folders. A new store (no database, no run folders) passes."""
    db = Path(db)
    try:
        stat = db.stat()
    except FileNotFoundError:
        stat = None
    problem, runs = None, None
    if stat is not None and stat.st_size > 0:
        key = (str(db.resolve()), stat.st_ino)
        problem, runs = _damage(db, thorough=key not in _verified)
        if problem is None:
            _verified.add(key)
            if runs:
                return
    if problem is None:
        earlier = earlier_runs(artifact_root)
        if not earlier:
            return  # a new store: MLflow creates it
        state = ("is missing" if stat is None else "is empty (0 bytes)" if stat.st_size == 0
                 else "has no MLflow tables" if runs is None else "holds no runs")
        raise TrackingStoreError(
            f"MLflow's tracking database {db} {state}, but {artifact_root} holds the artifacts of {len(earlier)} "
            f"earlier run(s): MLflow would silently start a new, empty history there, and those runs, their metrics "
            f"and the champion alias would be lost. persona stopped before anything was written. "
            f"{_what_to_do(db)}")
    raise TrackingStoreError(
        f"MLflow's tracking database {db} is damaged ({problem}): persona stopped before anything was written. "
        f"{_what_to_do(db)}")


def _what_to_do(db: Path) -> str:
    backup = backup_path(db)
    if backup.is_file() and backup.stat().st_size > 0:
        taken = time.strftime("%Y-%m-%d %H:%M", time.localtime(backup.stat().st_mtime))
        restore = (f"Restore it from the copy taken at the start of the last training ({taken}; it lacks what that "
                   f"training recorded): cp {backup} {db}")
    else:
        restore = "Restore it from a backup of mlruns/ (or a filesystem snapshot)"
    return (f"{restore}; or, to start a new history on purpose, move {db.parent} aside (the adapters under outputs/ "
            "stay usable by folder).")


def backup_local_store(db: Path) -> None:
    """Copy the database (consistently, with SQLite's backup API) to mlflow.db.backup; a failure (a full disk) only
    leaves the previous copy."""
    db = Path(db)
    if not db.is_file() or db.stat().st_size == 0:
        return
    target = backup_path(db)
    partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
    try:
        src = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True, timeout=30)
        try:
            dst = sqlite3.connect(partial)
            try:
                src.backup(dst)
            finally:
                dst.close()
        finally:
            src.close()
        os.replace(partial, target)
    except (OSError, sqlite3.Error):
        partial.unlink(missing_ok=True)


def remove_run_artifacts(client, run_id: str) -> None:
    """Remove everything run `run_id` logged as artifacts: its folder in a local store, else through the store."""
    uri = client.get_run(run_id).info.artifact_uri
    folder = local_path(uri)
    if folder is None:
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        get_artifact_repository(uri).delete_artifacts()
        return
    shutil.rmtree(folder, ignore_errors=True)
    run_folder = folder.parent if folder.name == "artifacts" else None
    if run_folder is not None and RUN_FOLDER.match(run_folder.name) and run_folder.is_dir() \
            and not any(run_folder.iterdir()):
        run_folder.rmdir()
