"""How a failure reaches the user of the `persona` command: one plain reason (what failed, why, what to do), never a
Python traceback or a bare Dagster wrapper such as `DagsterExecutionStepExecutionError: Error occurred while
executing op "X":`, unless `persona --debug` (or PERSONA_DEBUG=1) asks for the traceback.

- `reason(exc)`, `info_reason(error_info)`: the line for a Python exception, or for the SerializableErrorInfo of a
  Dagster event, whose innermost user exception is found through Dagster's wrappers (.cause, .context).
- `plain_console_logger`: Dagster's console logger for `persona run`, each error event's stack trace replaced by
  that line.
- `quiet_log_mirrors()`: Dagster's compute-log mirrors (`tail` and a watcher script) out of reach of the terminal's
  Ctrl-C, which persona handles: the watcher would print a KeyboardInterrupt traceback of its own.
- `quiet_interrupted_closes()`: no SQLAlchemy pool traceback when Ctrl-C lands while a database connection closes.
- `redeliver_swallowed_interrupts()`: no "Exception ignored" traceback when Ctrl-C lands in a garbage-collection
  callback, which Python swallows; the interrupt is delivered again instead, so it still stops the run.
- `run_failure(result, seconds)`: what `persona run` prints when its run fails, with the exit status (130 when it
  was interrupted).
- `call(func, command, debug)`: run a CLI command; an exception becomes one line on stderr and exit status 1.
"""
from __future__ import annotations

import functools
import os
import re
import signal
import subprocess
import sys
import threading
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

DEBUG_ENV = "PERSONA_DEBUG"
INTERRUPTS = {"DagsterExecutionInterruptedError", "KeyboardInterrupt"}
OWN = ("persona.", "orchestration.", "assets.", "dagster._core.definitions.events.Failure")  # messages written for users
NOTHING_LOST = "earlier datasets, adapters, MLflow runs and the champion are untouched"
INTERRUPTED = ("Interrupted (Ctrl-C){where}: the run stopped. Nothing was lost: earlier datasets, adapters, MLflow "
               "runs and the champion are kept as they were, and nothing half-written is left (an interrupted "
               "training's MLflow run ends KILLED). Run `persona run` again to continue; a training resumes from its "
               "last checkpoint.")


@dataclass
class _Info:
    """The fields of Dagster's SerializableErrorInfo that matter here, for a Python exception."""
    message: str
    cls_name: str
    cause: "_Info | None" = None
    context: "_Info | None" = None


def _from_exception(exc: BaseException | None, depth: int = 0) -> _Info | None:
    if exc is None or depth > 20:
        return None
    return _Info("".join(traceback.format_exception_only(type(exc), exc)), type(exc).__name__,
                 _from_exception(exc.__cause__, depth + 1),
                 None if exc.__suppress_context__ else _from_exception(exc.__context__, depth + 1))


def _text(info) -> str:
    """The message without its 'module.Class: ' prefix."""
    message, name = (info.message or "").strip(), info.cls_name or ""
    found = re.match(rf"^[\w.]*{re.escape(name)}(?::\s*|$)", message) if name else None
    return message[found.end():] if found else message


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def _own(info) -> bool:
    return (info.message or "").lstrip().startswith(OWN)


def _chain(info):
    """info, then what it wraps, outermost first (causes before contexts)."""
    seen = 0
    while info is not None and seen < 50:
        yield info
        info, seen = info.cause or info.context, seen + 1


def _user_error(info):
    """The first exception in the chain that is not one of Dagster's wrappers around it."""
    for link in _chain(info):
        name = link.cls_name or ""
        wrapper = name.startswith(("Dagster", "RetryRequested")) and name not in INTERRUPTS
        if not wrapper or not (link.cause or link.context):
            return link
    return info


def interrupted(info) -> bool:
    """Whether the error came from a Ctrl-C (or a termination request): anywhere in the chain."""
    return info is not None and any((link.cls_name or "") in INTERRUPTS for link in _chain(info))


def hint(texts: list[str], command: str = "run") -> str:
    """What to do about an error whose messages (outermost first) are `texts`."""
    joined = "\n".join(texts)
    if re.search(r"No space left on device|database or disk is full|Disk quota exceeded", joined):
        return "free disk space there, then run again"
    if re.search(r"Read-only file system|readonly database|Permission denied|Operation not permitted", joined):
        return "make it writable (its permissions, or a read-only mount), then run again"
    if re.search(r"file is not a database|database disk image is malformed", joined):
        return ("MLflow's store is damaged: restore mlruns/mlflow.db from a backup, or move mlruns/ aside to start a "
                "new history")
    if re.search(r"deserializing header|HeaderTooLarge|MetadataIncompleteBuffer|incomplete metadata", joined):
        return ("a weights file (.safetensors) is damaged or incomplete, e.g. a partial copy: copy it again, use "
                "another adapter, or train a new one with `persona run`")
    missing = re.search(r"No such file or directory: '([^']+)'", joined)
    if missing:
        path = Path(missing.group(1))
        outputs = Path(os.environ.get("PERSONA_HOME") or Path(__file__).resolve().parents[1], "outputs").resolve()
        if path.resolve().is_relative_to(outputs) and path.resolve() != outputs:
            folder = outputs / path.resolve().relative_to(outputs).parts[0]
            made = path.parent if path.parent != folder else path
            return (f"it was removed after persona wrote it: delete {made} as well, so that the next run writes it "
                    "again, then run again")
        return "check that it exists (it may have been moved or deleted), then run again"
    return f"run `persona --debug {command}` to see where it happened"


def info_reason(info, command: str = "run") -> str:
    """The plain line for a Dagster SerializableErrorInfo (or an _Info): the innermost user exception, its type and
    message, and what to do."""
    user = _user_error(info)
    text = _text(user)
    if _own(user):  # persona's own errors and Failure descriptions already say what to do
        return text or (user.cls_name or "error")
    line = f"{user.cls_name}: {_first_line(text)}" if _first_line(text) else (user.cls_name or "error")
    root = user
    while root.cause is not None:
        root = root.cause
    root_text = _first_line(_text(root))
    if root is not user and root_text and root_text not in line:
        line += f" (from {root.cls_name}: {root_text})"
    return f"{line} — {hint([_text(link) for link in _chain(user)], command)}"


def reason(exc: BaseException, command: str = "run") -> str:
    """The plain line for a Python exception."""
    return info_reason(_from_exception(exc), command)


def call(func: Callable[[], int], command: str, debug: bool) -> int:
    """Run a CLI command: with `debug`, as is (tracebacks and all); else an exception is one line on stderr with exit
    status 1, and Ctrl-C exits with 130."""
    if debug:
        return func()
    try:
        return func()
    except KeyboardInterrupt:
        if command == "run":
            print("\n✗ " + INTERRUPTED.format(where=" before the run started"), file=sys.stderr)
        else:
            print(f"\npersona {command}: interrupted (Ctrl-C)", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - every error becomes its one line; --debug shows the traceback
        print(f"persona {command}: {reason(exc, command)}", file=sys.stderr)
        return 1


# --- persona run -------------------------------------------------------------------------------------------------


def run_failure(result, seconds: float, debug: bool = False) -> tuple[int, str]:
    """(exit status, what to print) for a failed `persona run` (a Dagster ExecuteInProcessResult)."""
    failures = [e for e in result.all_events if e.is_step_failure]
    errors = [(e.step_key, e.step_failure_data.error) for e in failures]
    errors += [(None, getattr(e.event_specific_data, "error", None)) for e in result.all_events
               if e.event_type_value in ("PIPELINE_FAILURE", "RUN_FAILURE") and e.event_specific_data is not None]
    stopped = next((step for step, error in errors if interrupted(error)), False)
    if stopped is not False:
        where = f" during {stopped}, after {seconds:.0f} s" if stopped else f" after {seconds:.0f} s"
        return 130, "\n✗ " + INTERRUPTED.format(where=where)
    lines = []
    for event in failures:
        error, user = event.step_failure_data.error, event.step_failure_data.user_failure_data
        why = error.to_string() if debug and error else (
            user.description if user and user.description else info_reason(error) if error else "(no reason given)")
        lines.append(f"\n✗ {event.step_key} failed:\n{why}")
    if not failures:
        why = next((info_reason(error) if not debug else error.to_string() for _, error in errors if error), None)
        lines.append(f"\n✗ the run failed: {why or 'see the log above'}")
    lines.append(f"\nThe run stopped after {seconds:.0f} s; {NOTHING_LOST}.")
    return 1, "\n".join(lines)


def _one_line_errors(record) -> bool:
    """A logging filter: an error event's message loses its stack traces and gets the plain line instead."""
    meta = getattr(record, "dagster_meta", None)
    event = meta.get("dagster_event") if isinstance(meta, dict) else None
    data = getattr(event, "event_specific_data", None)
    error = getattr(data, "error", None)
    if error is not None and isinstance(record.msg, str):
        user = getattr(data, "user_failure_data", None)
        why = user.description if user is not None and user.description else info_reason(error)
        record.msg = record.msg.split("\n\n", 1)[0] + "\n" + why
        record.args = ()
    return True


def _plain_console_logger():
    from dagster import colored_console_logger, logger

    @logger(colored_console_logger.config_schema,
            description="Dagster's console logger, with one plain line instead of each error's stack traces.")
    def plain_console_logger(init_context):
        log = colored_console_logger.logger_fn(init_context)
        log.addFilter(_one_line_errors)
        return log

    return plain_console_logger


def plain_job(job, run_config: dict) -> tuple[object, dict]:
    """`job` and `run_config` with the console logger replaced by the plain one (same name and config, so a
    re-execution from the Dagster UI uses Dagster's own)."""
    loggers = {**(run_config.get("loggers") or {}), "console": (run_config.get("loggers") or {}).get("console") or {}}
    return job.with_logger_defs({"console": _plain_console_logger()}), {**run_config, "loggers": loggers}


class _OwnGroupSubprocess:
    """`subprocess` as Dagster's compute-log mirroring sees it: its `tail` and watcher processes start in a process
    group of their own, so the terminal's Ctrl-C reaches persona (which stops the run, and them) and not them."""

    def __getattr__(self, name):
        return getattr(subprocess, name)

    @staticmethod
    def Popen(*args, **kwargs):  # noqa: N802 - subprocess's name
        kwargs.setdefault("process_group", 0)
        return subprocess.Popen(*args, **kwargs)


def quiet_log_mirrors() -> None:
    """Start Dagster's compute-log mirrors out of the terminal's process group (see _OwnGroupSubprocess)."""
    from dagster._core.execution import compute_logs

    if getattr(compute_logs, "subprocess", None) is subprocess:
        compute_logs.subprocess = _OwnGroupSubprocess()


class _NoInterruptedCloses:
    """Drops the record a SQLAlchemy pool logs, traceback included, when an interrupt is raised inside a connection's
    close: Dagster's SIGINT handler raises DagsterExecutionInterruptedError wherever the main thread is, a
    connection's close among the places (seen in CI), and the pool logs it as an error before re-raising it. The
    interrupt itself still stops the run, and persona reports it in one line."""

    def filter(self, record) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not (exc is not None and type(exc).__name__ in INTERRUPTS)


def quiet_interrupted_closes() -> None:
    """Install _NoInterruptedCloses on the loggers of SQLAlchemy's pool classes (Dagster's and MLflow's SQLite
    stores; a pool logs on the logger named after its class)."""
    import logging

    from sqlalchemy.pool import Pool

    classes, seen = [Pool], set()
    while classes:
        cls = classes.pop()
        if cls in seen:
            continue
        seen.add(cls)
        classes.extend(cls.__subclasses__())
        log = logging.getLogger(getattr(cls, "_sqla_logger_namespace", None) or f"{cls.__module__}.{cls.__name__}")
        if not any(isinstance(f, _NoInterruptedCloses) for f in log.filters):
            log.addFilter(_NoInterruptedCloses())


def _redeliver_interrupts(unraisable, show: bool = False) -> None:
    """sys.unraisablehook: an interrupt raised where Python can only ignore it (a weakref callback or __del__ that
    the garbage collector runs, SQLAlchemy's among them, seen in CI) is sent again from a helper thread, so that it
    lands once this callback has returned; other unraisable exceptions, and with `show` this one too, are printed as
    Python prints them."""
    interrupt = type(unraisable.exc_value).__name__ in INTERRUPTS
    if show or not interrupt:
        sys.__unraisablehook__(unraisable)
    if interrupt:
        threading.Timer(0.01, os.kill, (os.getpid(), signal.SIGINT)).start()


def redeliver_swallowed_interrupts(show: bool = False) -> None:
    """Install _redeliver_interrupts as sys.unraisablehook (`show`: still print the swallowed interrupt's traceback,
    for `persona --debug`)."""
    sys.unraisablehook = functools.partial(_redeliver_interrupts, show=show)
