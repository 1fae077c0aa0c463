"""How persona's own processes end once their work is done: without the interpreter's teardown of its modules.

With torch, transformers and ms-swift (or Dagster and MLflow) loaded, Python takes ~1.6-1.8 s on 2 CPU cores after
the program's last line to free its modules one by one; whoever waits for the process (a training's caller reading
its output to the end, a user at the terminal) waits for that too. BENCHMARKS.md "A training child that exits at once"
and "`persona` commands that exit at once" have the A/Bs.
"""
from __future__ import annotations

import atexit
import os
import sys
import threading


def exit_now(code: int) -> None:
    """End the process with `code` after what Python's own exit does for the program (non-daemon threads joined,
    atexit functions run: logging's flush among them; standard output and error flushed), skipping the rest."""
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()  # (CPython's own call at exit; os._exit below skips it otherwise)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
