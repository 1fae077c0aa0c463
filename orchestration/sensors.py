"""`dataset_sensor`: retrain when the dataset changes, i.e. the data files curation reads or the curation config in
persona.yaml. One run per distinct content, started once the files have been quiet for a while."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from dagster import DefaultSensorStatus, RunRequest, SensorEvaluationContext, SensorResult, sensor

from orchestration.resources import MlflowTracker, Workspace
from orchestration.run_config import load_run_config, switched_off
from orchestration.stale_runs import reap_stale_runs
from orchestration.upstream import DATA_HASH_TAG, dataset_hash, dataset_sources, last_adapter_run, run_tags

SWITCH_ENV = "PERSONA_DATASET_SENSOR"            # "off" turns the sensor off
QUIET_ENV = "PERSONA_SENSOR_QUIET_SECONDS"       # how long the files must stay unchanged before a run starts
INTERVAL_ENV = "PERSONA_SENSOR_INTERVAL_SECONDS"  # how often the sensor looks (read when the code loads)
QUIET_SECONDS = 60
INTERVAL_SECONDS = 15


@sensor(
    job_name="train_persona",
    minimum_interval_seconds=int(os.environ.get(INTERVAL_ENV, INTERVAL_SECONDS)),
    default_status=DefaultSensorStatus.STOPPED if switched_off(SWITCH_ENV) else DefaultSensorStatus.RUNNING,
    description="Retrains when the data files curation reads, or the curation config in persona.yaml, change: one "
    f"run per distinct content, once the files have been quiet for ${QUIET_ENV} seconds (default {QUIET_SECONDS}).",
)
def dataset_sensor(context: SensorEvaluationContext, workspace: Workspace, mlflow_tracker: MlflowTracker) -> SensorResult:
    # Every tick first ends the runs a killed process left STARTED: they would hold the training pool forever.
    reaped = reap_stale_runs(context.instance, mlflow_tracker, workspace.outputs_dir)
    if reaped:
        context.log.warning(reaped.describe())
    if switched_off(SWITCH_ENV):
        return SensorResult(skip_reason=f"Turned off by {SWITCH_ENV}={os.environ[SWITCH_ENV]}.")
    run_config = load_run_config()
    names = dataset_sources(run_config)
    watched = ", ".join(names) + " and the curation config"
    missing = [n for n in names if not Path(workspace.data_dir, n).is_file()]
    if missing:
        return SensorResult(skip_reason=f"Waiting for {', '.join(missing)} in {workspace.data_dir}, which curation reads.")

    content = dataset_hash(run_config, workspace.data_dir)
    cursor = json.loads(context.cursor) if context.cursor else _first_cursor(context, content)
    last, pending, since = cursor["last"], cursor.get("pending"), cursor.get("since")
    if content == last:
        reason = (f"Back to the content of the last run ({last[:12]}): dropped the pending change ({pending[:12]})."
                  if pending else f"No change in {watched} (content {last[:12]}).")
        return SensorResult(skip_reason=reason, cursor=_cursor(last))

    now = time.time()
    if content != pending:  # a new edit restarts the quiet period
        pending, since = content, now
    quiet = float(os.environ.get(QUIET_ENV, QUIET_SECONDS))
    if now - since < quiet:
        return SensorResult(
            skip_reason=f"{watched} changed ({last[:12]} → {content[:12]}); a run starts once they have been quiet "
            f"for {quiet:g} s ({now - since:.0f} s so far).",
            cursor=_cursor(last, pending, since),
        )
    # The hash alone would dedupe a return to an earlier content against that content's first run; the time the
    # change was first seen keeps keys distinct, and, kept in the cursor, stays the same if the daemon retries.
    return SensorResult(
        run_requests=[RunRequest(run_key=f"{content}-{since:.0f}", run_config=run_config,
                                 tags=run_tags(run_config, workspace.data_dir, "sensor"))],
        cursor=_cursor(content),
    )


def _first_cursor(context: SensorEvaluationContext, content: str) -> dict:
    """Without a cursor the sensor compares with the data the last adapter was trained on, where a run tag says so,
    and otherwise takes the files as they are as its baseline: starting the UI alone never starts a training."""
    run = last_adapter_run(context.instance)
    return {"last": (run.tags.get(DATA_HASH_TAG) if run else None) or content}


def _cursor(last: str, pending: str | None = None, since: float | None = None) -> str:
    return json.dumps({"last": last, "pending": pending, "since": since})
