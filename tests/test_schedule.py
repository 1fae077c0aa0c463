"""The retrain schedule: it retrains only when the data, base model, recipe or code changed, or when told to always."""
import importlib
import json

import pytest
import yaml
from dagster import (DagsterRun, DagsterRunStatus, RunRequest, SkipReason, asset, build_schedule_context,
                     instance_for_test, materialize)

from orchestration import schedules
from orchestration.run_config import load_run_config
from orchestration.upstream import UPSTREAM_TAG, run_tags
from orchestration.resources import MlflowTracker, Workspace
from orchestration.schedules import ALWAYS_ENV, CRON, CRON_ENV, retrain_schedule


@pytest.fixture(scope="module")
def instance():
    """Shared: every test that uses it first records the adapter it compares with, which becomes the latest."""
    with instance_for_test() as instance:
        yield instance


@pytest.fixture
def fresh_instance():
    with instance_for_test() as instance:
        yield instance


def tick(instance, home):
    return retrain_schedule(build_schedule_context(instance=instance,
                                                   resources={"workspace": Workspace(data_dir=str(home / "data")),
                                                              "mlflow_tracker": MlflowTracker()}))


def record_adapter(instance, home) -> str:
    """A lora_adapter materialization from a run tagged with today's inputs, as the sensor or `persona run` tag it."""
    @asset(name="lora_adapter")
    def trained():
        return None

    return materialize([trained], instance=instance, tags=run_tags(load_run_config(), home / "data", "sensor")).run_id


def test_schedule_skips_when_nothing_changed(instance, home):
    run_id = record_adapter(instance, home)
    result = tick(instance, home)
    assert isinstance(result, SkipReason)
    assert result.skip_message == (f"Nothing changed since the last adapter (run {run_id}): same data, base model, "
                                   "training recipe and code versions.")


@pytest.mark.parametrize("change, what", [
    ("data", "data"),
    ("base model", "base_model"),
    ("learning rate", "training"),
])
def test_schedule_retrains_when_something_upstream_changed(instance, home, change, what):
    record_adapter(instance, home)
    if change == "data":
        with (home / "data" / "probes.jsonl").open("a") as f:
            f.write(json.dumps({"kind": "general", "question": "What is 3 + 4?", "expect_any": ["7"]}) + "\n")
    else:
        config = ({"base_model": {"config": {"model": "Qwen/Qwen2.5-7B-Instruct"}}} if change == "base model"
                  else {"lora_adapter": {"config": {"learning_rate": 0.01}}})
        (home / "persona.yaml").write_text(yaml.safe_dump({"ops": config}))
    result = tick(instance, home)
    assert isinstance(result, RunRequest)
    assert result.tags["persona/reason"].startswith(f"{what} changed since the last adapter")
    assert result.run_config == load_run_config()


def test_schedule_retrains_when_a_code_version_changed(instance, home, monkeypatch):
    from assets.lora_adapter import lora_adapter

    record_adapter(instance, home)
    monkeypatch.setattr(type(lora_adapter), "code_versions_by_key", property(lambda self: {k: "2" for k in self.keys}))
    assert tick(instance, home).tags["persona/reason"].startswith("code changed")


def test_schedule_trains_when_there_is_no_adapter_yet(fresh_instance, home):
    assert tick(fresh_instance, home).tags["persona/reason"] == "no adapter has been trained yet"


def test_schedule_unconditional_flag_retrains(instance, home, monkeypatch):
    record_adapter(instance, home)
    monkeypatch.setenv(ALWAYS_ENV, "1")
    result = tick(instance, home)
    assert isinstance(result, RunRequest) and result.tags["persona/reason"] == f"{ALWAYS_ENV}=1"


def test_schedule_skips_while_a_run_on_the_same_inputs_is_in_progress(fresh_instance, home):
    tags = run_tags(load_run_config(), home / "data", "sensor")
    training = fresh_instance.add_run(DagsterRun(job_name="train_persona", status=DagsterRunStatus.STARTED, tags=tags))
    result = tick(fresh_instance, home)
    assert isinstance(result, SkipReason)
    assert result.skip_message == f"Run {training.run_id} already trains on the current inputs (started)."
    assert json.loads(tags[UPSTREAM_TAG]).keys() == {"data", "base_model", "training", "code"}


def test_schedule_cron_is_configurable(monkeypatch):
    assert retrain_schedule.cron_schedule == CRON
    monkeypatch.setenv(CRON_ENV, "0 4 * * *")
    try:
        assert importlib.reload(schedules).retrain_schedule.cron_schedule == "0 4 * * *"
    finally:
        monkeypatch.delenv(CRON_ENV)
        importlib.reload(schedules)


def test_schedule_sensor_and_persona_run_share_persona_yaml(home):
    from orchestration.run_config import project_file

    assert load_run_config() == {}  # the file is optional
    project_file().write_text(yaml.safe_dump({"ops": {"base_model": {"config": {"model": "/models/a", "revision": "v1"}},
                                                      "lora_adapter": {"config": {"learning_rate": 0.01}}}}))
    # `persona run` merges its flags on top of the file.
    assert load_run_config({"ops": {"base_model": {"config": {"model": "/models/b"}}}}) == {"ops": {
        "base_model": {"config": {"model": "/models/b", "revision": "v1"}},
        "lora_adapter": {"config": {"learning_rate": 0.01}}}}
    project_file().write_text("- not\n- a mapping\n")
    with pytest.raises(ValueError, match="persona.yaml: expected Dagster run config"):
        load_run_config()
