"""A trainer on standby: a training child started ahead of time, that has already imported torch and ms-swift.

A fresh Python process spends ~23 s importing torch and ms-swift on an H100 machine (measured: BENCHMARKS.md,
section 4), longer than the 7B Trainer itself. Every Dagster run, and every step of a multiprocess run, is a new
process, so every training paid it. A standby pays it ahead of time, while the run prepares the base model and
the data, or while the previous run evaluates:

1. `warm()` starts `python -m persona.train_worker --standby SOCKET`, detached. It listens on a Unix socket,
   imports torch and ms-swift, creates its CUDA context, and waits.
2. `claim()` connects and hands it one job: the job file and the child's environment. The standby answers
   "accepted", sends its output down the socket as the fresh child would on its stdout, says its exit code last,
   and exits: one job per process, so an OOM, a CUDA error or ms-swift's patches never outlive the job.
3. Nobody claims it: it exits after `idle_seconds`. Its output before the job goes to SOCKET's `.log` file.

The socket's name is a digest of what the standby's start depends on (interpreter, persona's code, the device,
the environment variables its imports and CUDA read), so a standby started before such a change is never handed
a job; it idles out. The rest of the environment comes with the job. Anything unexpected (no standby, a dead one,
one that does not accept within `accept_timeout`, a folder it cannot use) falls back to the fresh child: a standby
can make a training faster, never fail it.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

DIR_ENV = "PERSONA_STANDBY_DIR"
ACCEPTED = "accepted"
EXIT_PREFIX = "[persona] standby job exit code "
# What the standby's imports and CUDA start read: a standby started with other values is never handed a job. The
# rest of the child's environment is sent with the job and applied before it runs. (Libraries set variables of
# their own on import, e.g. TORCHINDUCTOR_CACHE_DIR: so the key is not the whole environment.)
KEY_VARIABLES = ("CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER", "PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF",
                 "PYTHONPATH", "PYTHONHOME", "PYTHONSAFEPATH", "LD_LIBRARY_PATH", "LD_PRELOAD", "VIRTUAL_ENV")
_PACKAGE = Path(__file__).resolve().parent
_spawned: list[subprocess.Popen] = []  # kept so that finished standbys are reaped, not left as zombies


def _code_digest() -> str:
    h = hashlib.sha256()
    for f in sorted(_PACKAGE.glob("*.py")):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def _socket_dir() -> Path:
    """A folder only this user can enter: whoever can connect can make the standby train."""
    d = Path(os.environ.get(DIR_ENV) or Path(tempfile.gettempdir(), f"persona-standby-{os.getuid()}"))
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = d.stat()
    if st.st_uid != os.getuid() or stat.S_IMODE(st.st_mode) & 0o077:
        raise PermissionError(f"{d}: the trainer standby's folder must belong to you and be private (chmod 700); "
                              f"or point ${DIR_ENV} at another folder")
    return d


@dataclass(frozen=True)
class Standby:
    """The standby trainer for one device and one child environment (see persona.training.child_env)."""

    device: str
    env: dict
    idle_seconds: float = 600.0
    accept_timeout: float = 120.0  # a standby still importing accepts when done (~25 s measured); then give up

    def key(self) -> str:
        env = sorted((k, v) for k, v in self.env.items()
                     if (k in KEY_VARIABLES or k.startswith("PERSONA_")) and k != "PERSONA_TRAINING_PARENT")
        h = hashlib.sha256(repr((sys.executable, self.device, _code_digest(), env)).encode())
        return h.hexdigest()[:20]

    @property
    def address(self) -> Path:
        return _socket_dir() / f"{self.key()}.sock"  # (Unix socket paths: at most ~107 bytes)

    def _connect(self) -> socket.socket | None:
        path = self.address
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(5)
        try:
            s.connect(str(path))
        except FileNotFoundError:
            s.close()
            return None
        except (ConnectionRefusedError, socket.timeout, OSError):
            s.close()  # a standby that died without cleaning up: its socket file is stale
            try:
                path.unlink()
            except FileNotFoundError:
                pass
            return None
        return s

    def alive(self) -> bool:
        s = self._connect()
        if s is None:
            return False
        s.close()  # (the standby reads an empty request and goes on waiting)
        return True

    def warm(self) -> bool:
        """Start a standby unless one is waiting already. True when one was started."""
        try:
            if self.alive():
                return False
            path = self.address
            log = open(path.with_suffix(".log"), "wb")
        except OSError as exc:  # e.g. an unusable folder: say so, and train as without a standby
            print(f"[persona] no trainer standby: {exc}", file=sys.stderr, flush=True)
            return False
        cmd = [sys.executable, "-m", "persona.train_worker", "--standby", str(path), "--device", self.device,
               "--idle", str(self.idle_seconds)]
        try:
            _spawned[:] = [p for p in _spawned if p.poll() is None]
            proc = subprocess.Popen(cmd, env=self.env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True, close_fds=True, cwd=str(_PACKAGE.parent))
            _spawned.append(proc)
        finally:
            log.close()
        deadline = time.time() + 10  # it listens before it imports anything heavy (~0.2 s)
        while not path.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        return True

    def claim(self, job_file: str | Path) -> socket.socket | None:
        """Hand the standby `job_file`; the connected socket carries its output. None: there is no usable standby."""
        try:
            s = self._connect()
        except OSError:
            return None
        if s is None:
            return None
        try:
            s.settimeout(self.accept_timeout)
            s.sendall(json.dumps({"job": str(job_file), "env": self.env}).encode() + b"\n")
            reply = b""
            while not reply.endswith(b"\n"):
                chunk = s.recv(1)
                if not chunk:
                    raise ConnectionError("closed")
                reply += chunk
            if reply.decode().strip() != ACCEPTED:
                raise ConnectionError(reply.decode())
        except (OSError, ConnectionError):
            s.close()
            return None
        s.settimeout(None)
        return s


class StandbyJob:
    """A claimed standby's job, read like a child process: iterate over its output lines, then `wait()`."""

    def __init__(self, conn: socket.socket):
        self._conn = conn
        self.code: int | None = None

    def __iter__(self):
        with self._conn, self._conn.makefile("r", encoding="utf-8", errors="replace", newline="\n") as lines:
            for line in lines:
                if line.startswith(EXIT_PREFIX):
                    self.code = int(line[len(EXIT_PREFIX):].strip())
                else:
                    yield line

    def wait(self) -> int | None:
        """The job's exit code; None when the standby ended without saying it (killed, e.g. by the OOM killer)."""
        return self.code
