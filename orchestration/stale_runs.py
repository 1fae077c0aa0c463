"""Runs whose process was killed (SIGKILL, the out-of-memory killer) stay STARTED in Dagster and RUNNING in MLflow
forever, and a STARTED run holds the one-slot `training` pool, so every queued run would wait behind it. This module
finds them and ends them: `persona run` calls it before it starts, the sensor and the schedule at every tick.

A run is stale when the process that executes its steps (the in-process executor's "Executing steps in process
(pid: N)" event: `persona run` itself, or the run worker the daemon launched) no longer exists, or is a newer process
that reuses its pid. Only this machine's processes can be checked, so only with Dagster's local run launcher; on
Kubernetes, Dagster's own run monitoring does this (DEPLOYMENT.md).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from dagster import DagsterEventType, DagsterInstance, DagsterRunStatus, RunsFilter

from persona.storage import remove_orphaned_partials

# A run worker starts shortly before Dagster marks its run STARTED; a process created later than this after the
# run's start is another process that reuses the pid.
START_SLACK_SECONDS = 120.0


@dataclass
class Reaped:
    dagster_runs: list[str] = field(default_factory=list)
    mlflow_runs: list[str] = field(default_factory=list)
    leftovers: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.dagster_runs or self.mlflow_runs or self.leftovers)

    def describe(self) -> str:
        parts = []
        if self.dagster_runs:
            parts.append(f"marked {len(self.dagster_runs)} Dagster run(s) whose process is gone FAILURE "
                         f"({', '.join(r[:8] for r in self.dagster_runs)}), freeing the training pool")
        if self.mlflow_runs:
            parts.append(f"ended their {len(self.mlflow_runs)} MLflow run(s) KILLED")
        if self.leftovers:
            parts.append(f"removed {len(self.leftovers)} half-written folder(s)")
        return "; ".join(parts)


def run_process(instance: DagsterInstance, run_id: str) -> int | None:
    """The pid of the process that executes the run's steps, from its engine events; None if not known yet."""
    records = instance.get_records_for_run(run_id, of_type=DagsterEventType.ENGINE_EVENT, limit=50).records
    for record in records:
        event = record.event_log_entry.dagster_event
        data = event.engine_event_data if event else None
        pid = data.metadata.get("pid") if data else None
        if pid is not None:
            return int(getattr(pid, "value", pid))
    return None


def process_alive(pid: int, started_by: float) -> bool:
    """Whether process `pid` exists and was created by `started_by` (a Unix time), i.e. is not a reuse of the pid."""
    import psutil

    try:
        proc = psutil.Process(pid)
        return proc.status() != psutil.STATUS_ZOMBIE and proc.create_time() <= started_by
    except psutil.NoSuchProcess:
        return False


def local_launcher(instance: DagsterInstance) -> bool:
    from dagster._core.launcher import DefaultRunLauncher

    return isinstance(instance.run_launcher, DefaultRunLauncher)


def stale_runs(instance: DagsterInstance) -> list:
    """STARTED or CANCELING runs whose step process is gone (see the module's docstring)."""
    if not local_launcher(instance):
        return []
    found = []
    for record in instance.get_run_records(RunsFilter(statuses=[DagsterRunStatus.STARTED,
                                                                DagsterRunStatus.CANCELING])):
        pid = run_process(instance, record.dagster_run.run_id)
        started = record.start_time or record.create_timestamp.timestamp()
        if pid is not None and not process_alive(pid, started + START_SLACK_SECONDS):
            found.append(record.dagster_run)
    return found


def reap_stale_runs(instance: DagsterInstance, tracker=None, outputs_dir: str | Path | None = None) -> Reaped:
    """End every stale run: FAILURE in Dagster (its pool slots freed), KILLED in MLflow (`tracker`, an
    orchestration.resources.MlflowTracker) with the reason in `persona.error`, and remove the half-written folders
    their processes left under `outputs_dir`. Safe to call from any process at any time."""
    reaped = Reaped()
    for run in stale_runs(instance):
        reason = (f"The process that ran this run is gone (killed, e.g. by SIGKILL or the out-of-memory killer); "
                  f"persona marked the run failed at {time.strftime('%Y-%m-%d %H:%M:%S')}. Nothing it finished is "
                  f"lost; run again to continue (a training resumes from its last checkpoint).")
        instance.report_run_failed(run, message=reason)
        instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
        reaped.dagster_runs.append(run.run_id)
        if tracker is not None:
            reaped.mlflow_runs += tracker.end_runs_of(run.run_id, reason)
    if outputs_dir is not None:
        reaped.leftovers = [str(p) for p in remove_orphaned_partials(outputs_dir)]
    return reaped
