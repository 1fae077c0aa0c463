"""`retrain_schedule`: retrain on a cron, weekly by default, when anything the adapter depends on changed since the
last one was trained: the data, the base model, the training recipe or a stage's code version."""
from __future__ import annotations

import json
import os

from dagster import (DagsterRunStatus, DefaultScheduleStatus, RunRequest, RunsFilter, ScheduleEvaluationContext,
                     SkipReason, schedule)

from orchestration.resources import MlflowTracker, Workspace
from orchestration.run_config import load_run_config, switched_off, switched_on
from orchestration.stale_runs import reap_stale_runs
from orchestration.upstream import UPSTREAM_TAG, last_adapter_run, run_tags

CRON_ENV = "PERSONA_RETRAIN_CRON"
CRON = "0 3 * * 1"                      # Mondays at 03:00 UTC
ALWAYS_ENV = "PERSONA_RETRAIN_ALWAYS"   # "1": retrain on every tick, changed or not
SWITCH_ENV = "PERSONA_RETRAIN_SCHEDULE"  # "off" turns the schedule off
NOT_FINISHED = [DagsterRunStatus.QUEUED, DagsterRunStatus.NOT_STARTED, DagsterRunStatus.STARTING,
                DagsterRunStatus.STARTED]


@schedule(
    job_name="train_persona",
    cron_schedule=os.environ.get(CRON_ENV, CRON),
    default_status=DefaultScheduleStatus.STOPPED if switched_off(SWITCH_ENV) else DefaultScheduleStatus.RUNNING,
    description=f"Retrains on ${CRON_ENV} (default '{CRON}', UTC) if the data, base model, training recipe or code "
    f"version changed since the last adapter; ${ALWAYS_ENV}=1 retrains on every tick.",
)
def retrain_schedule(context: ScheduleEvaluationContext, workspace: Workspace,
                     mlflow_tracker: MlflowTracker) -> RunRequest | SkipReason:
    if switched_off(SWITCH_ENV):
        return SkipReason(f"Turned off by {SWITCH_ENV}={os.environ[SWITCH_ENV]}.")
    reaped = reap_stale_runs(context.instance, mlflow_tracker, workspace.outputs_dir)  # a ghost run is not in flight
    if reaped:
        context.log.warning(reaped.describe())
    run_config = load_run_config()
    tags = run_tags(run_config, workspace.data_dir, "schedule")
    if switched_on(ALWAYS_ENV):
        return RunRequest(run_config=run_config, tags={**tags, "persona/reason": f"{ALWAYS_ENV}=1"})

    # A run launched by the sensor and still queued or training counts as done: it trains on the same inputs.
    in_flight = context.instance.get_runs(RunsFilter(job_name="train_persona", statuses=NOT_FINISHED,
                                                     tags={UPSTREAM_TAG: tags[UPSTREAM_TAG]}), limit=1)
    if in_flight:
        return SkipReason(f"Run {in_flight[0].run_id} already trains on the current inputs "
                          f"({in_flight[0].status.value.lower()}).")

    last = last_adapter_run(context.instance)
    if last is None:
        reason = "no adapter has been trained yet"
    elif UPSTREAM_TAG not in last.tags:
        reason = f"the last adapter (run {last.run_id}) carries no record of its inputs"
    else:
        before, now = json.loads(last.tags[UPSTREAM_TAG]), json.loads(tags[UPSTREAM_TAG])
        changed = [name for name in now if before.get(name) != now[name]]
        if not changed:
            return SkipReason(f"Nothing changed since the last adapter (run {last.run_id}): same data, base model, "
                              "training recipe and code versions.")
        reason = f"{', '.join(changed)} changed since the last adapter (run {last.run_id})"
    context.log.info(f"Retraining: {reason}.")
    return RunRequest(run_config=run_config, tags={**tags, "persona/reason": reason})
