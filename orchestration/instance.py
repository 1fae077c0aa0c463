"""The Dagster instance `persona run` executes on: opened safely when two first starts race, and cleared of runs
that a killed process left STARTED (orchestration.stale_runs) before a new run starts."""
from __future__ import annotations

import os
import sys
from pathlib import Path

from dagster import DagsterInstance

from persona.locks import exclusive

INIT_LOCK = ".persona-init.lock"  # in $DAGSTER_HOME


def open_instance(say=None) -> DagsterInstance:
    """DagsterInstance.get(), with its SQLite storage and MLflow's store created by one process at a time (two first
    starts in a fresh home otherwise race to create the same tables), then stale runs reaped; `say` gets one line
    about what was reaped (default: stderr)."""
    from orchestration.resources import MlflowTracker, Workspace
    from orchestration.stale_runs import reap_stale_runs

    say = say or (lambda line: print(line, file=sys.stderr))
    home = Path(os.environ["DAGSTER_HOME"])
    with exclusive(home / INIT_LOCK, "the first start of this Dagster home", on_wait=say):
        instance = DagsterInstance.get()
        instance.get_runs(limit=1)  # (creates the run, event and schedule tables)
        tracker = MlflowTracker()
        tracker.experiment_id()     # (creates MLflow's tables and the experiment)
    reaped = reap_stale_runs(instance, tracker, Workspace().outputs_dir)
    if reaped:
        say(f"[persona] {reaped.describe()}")
    return instance
