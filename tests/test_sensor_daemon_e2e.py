"""The dataset sensor under a real Dagster daemon: an edit to a data file trains once, on the tiny model, and an
edit during that training queues the next run. `dagster sensor list` and `dagster schedule list` show both.

The daemon runs with a temporary DAGSTER_HOME whose instance config is the shipped dagster.yaml with a run queue
that looks every second instead of every 5 s (QUEUE_ROUND); its code server listens on a local socket. It loads
the shipped Definitions with a held fake trainer (tests/daemon_definitions.py), which the test releases once it has
seen the second run wait. Every process the test starts is stopped at the end, its whole process group with it.
"""
import json
import os
import subprocess
import time
from pathlib import Path

import mlflow
import pytest
import yaml
from dagster import AssetKey, DagsterInstance, DagsterRunStatus
from dagster._core.scheduler.instigation import InstigatorType

from orchestration.resources import PROJECT_ROOT
from orchestration.run_config import INSTANCE_FILE, link_instance_config

from daemon_definitions import RELEASE
from orchestration.upstream import TRIGGER_TAG
from processes import BIN, project, stop

pytestmark = [pytest.mark.slow, pytest.mark.daemon]

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 240
FINISHED = {DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED}
QUEUE_ROUND = 1  # seconds between the run queue's looks (Dagster's default: 5)


def wait_for(what: str, condition, daemon_log: Path, timeout: float = TIMEOUT):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; daemon log ends with:\n"
                         + daemon_log.read_text(errors="replace")[-4000:])



def test_sensor_under_the_daemon_trains_once_after_an_edit(tiny_model, home, tmp_path_factory):
    dagster_home = tmp_path_factory.mktemp("dagster_home")
    shipped = yaml.safe_load((PROJECT_ROOT / INSTANCE_FILE).read_text())
    (dagster_home / INSTANCE_FILE).write_text(yaml.safe_dump({**shipped, "run_coordinator": {
        "module": "dagster._core.run_coordinator", "class": "QueuedRunCoordinator",
        "config": {"dequeue_interval_seconds": QUEUE_ROUND}}}))
    (home / "persona.yaml").write_text(yaml.safe_dump(project(tiny_model)))
    env = {**os.environ, "DAGSTER_HOME": str(dagster_home), "PERSONA_HOME": str(home),
           "PERSONA_SENSOR_QUIET_SECONDS": "1", "PERSONA_SENSOR_INTERVAL_SECONDS": "1",
           "PERSONA_RETRAIN_SCHEDULE": "off", "TQDM_DISABLE": "1"}
    # Create the instance's storage before the daemon and its code server open it: on a fresh home they would
    # otherwise race to create the same SQLite schemas.
    instance = DagsterInstance.from_config(str(dagster_home))
    assert instance.get_runs() == [] and instance.get_concurrency_config().pool_config.default_pool_limit == 1
    workspace = dagster_home / "workspace.yaml"
    workspace.write_text(yaml.safe_dump({"load_from": [{"python_file": {
        "relative_path": str(REPO / "tests" / "daemon_definitions.py"), "working_directory": str(REPO)}}]}))
    daemon_log = dagster_home / "daemon.log"
    with daemon_log.open("w") as log:
        daemon = subprocess.Popen([str(BIN / "dagster-daemon"), "run", "-w", str(workspace)],
                                  cwd=home, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        def sensor_cursor():
            states = instance.all_instigator_state(instigator_type=InstigatorType.SENSOR)
            return next((s.instigator_data.cursor for s in states
                         if s.name == "dataset_sensor" and s.instigator_data and s.instigator_data.cursor), None)

        def runs():
            return instance.get_runs()[::-1]  # oldest first

        baseline = json.loads(wait_for("the sensor's first tick", sensor_cursor, daemon_log))["last"]
        assert runs() == []  # starting the daemon alone trains nothing

        data = home / "data" / "self_cognition.json"
        rows = json.loads(data.read_text())
        data.write_text(json.dumps(rows + [{**rows[0], "instruction": "Who are you, in one line?"}], indent=1))
        first = wait_for("the run for the edit to start",
                         lambda: next((r for r in runs() if r.status == DagsterRunStatus.STARTED), None), daemon_log)

        # An edit while it trains: the sensor asks for a second run, and the queue holds it back (the training pool
        # has one slot). The test cancels it once seen waiting, then lets the held training finish.
        data.write_text(json.dumps(rows + [{**rows[0], "instruction": "Who are you, in two lines?"}], indent=1))
        second = wait_for("the run for the second edit", lambda: runs()[1:], daemon_log)[0]
        time.sleep(3 * QUEUE_ROUND + 1)  # more than a few rounds of the run queue
        assert instance.get_run_by_id(second.run_id).status == DagsterRunStatus.QUEUED
        assert instance.get_run_by_id(first.run_id).status == DagsterRunStatus.STARTED
        instance.run_coordinator.cancel_run(second.run_id)
        (home / RELEASE).touch()

        run = wait_for("the first run to finish",
                       lambda: (r := instance.get_run_by_id(first.run_id)).status in FINISHED and r, daemon_log)
        if run.status != DagsterRunStatus.SUCCESS:
            errors = [e.message for e in instance.all_logs(run.run_id)
                      if e.is_dagster_event and e.dagster_event.is_failure]
            raise AssertionError(f"run {run.run_id} {run.status}: {errors}")
        assert [r.status for r in runs()] == [DagsterRunStatus.SUCCESS, DagsterRunStatus.CANCELED]
        assert run.tags[TRIGGER_TAG] == "sensor" and run.tags["dagster/sensor_name"] == "dataset_sensor"
        assert baseline != run.tags["persona/data_hash"] != second.tags["persona/data_hash"]
        assert instance.get_latest_materialization_event(AssetKey("lora_adapter")).run_id == run.run_id

        mlflow.set_tracking_uri(f"sqlite:///{home}/mlruns/mlflow.db")
        (tracked,) = mlflow.search_runs(experiment_names=["persona"], output_format="list")
        assert tracked.info.status == "FINISHED" and tracked.data.tags["dagster_run_id"] == run.run_id
    finally:
        stop(daemon)


def test_sensor_and_schedule_are_listed_by_the_dagster_cli(tmp_path):
    link_instance_config(tmp_path)
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path)}
    for kind, listed in (("sensor", "Sensor: dataset_sensor [RUNNING]"),
                         ("schedule", "Schedule: retrain_schedule [RUNNING]\nCron Schedule: 0 3 * * 1")):
        out = subprocess.run([str(BIN / "dagster"), kind, "list", "-w", str(REPO / "workspace.yaml")], env=env,
                             capture_output=True, text=True, timeout=120)
        assert listed in out.stdout, out.stdout + out.stderr
