"""The dataset sensor driven with build_sensor_context: one run per distinct content, debounced, readable skips."""
import json
from types import SimpleNamespace

import pytest
import yaml
from dagster import asset, build_sensor_context, instance_for_test, materialize

from orchestration import sensors
from orchestration.run_config import load_run_config
from orchestration.upstream import DATA_HASH_TAG, UPSTREAM_TAG, dataset_hash
from orchestration.resources import MlflowTracker, Workspace
from orchestration.sensors import QUIET_ENV, dataset_sensor


@pytest.fixture(scope="module")
def instance():
    """Shared, so keep it free of runs: a test that records one uses an instance of its own."""
    with instance_for_test() as instance:
        yield instance


@pytest.fixture
def clock(monkeypatch):
    """The sensor's clock, moved by hand (only the sensor module's `time` is replaced)."""
    clock = SimpleNamespace(now=1_000_000.0)
    monkeypatch.setattr(sensors, "time", SimpleNamespace(time=lambda: clock.now))
    return clock


class Ticks:
    """Evaluates the sensor the way the daemon does: each tick starts from the cursor the previous one left."""

    def __init__(self, instance, home):
        self.instance, self.home, self.cursor, self.run_requests = instance, home, None, []

    def __call__(self):
        context = build_sensor_context(instance=self.instance, cursor=self.cursor,
                                       resources={"workspace": Workspace(data_dir=str(self.home / "data")),
                                                  "mlflow_tracker": MlflowTracker()})
        result = dataset_sensor(context)
        self.cursor = result.cursor or self.cursor
        self.run_requests += result.run_requests or []
        return result


@pytest.fixture
def tick(instance, home, monkeypatch):
    monkeypatch.setenv(QUIET_ENV, "0")
    return Ticks(instance, home)


def edit(home, question: str) -> None:
    path = home / "data" / "self_cognition.json"
    rows = json.loads(path.read_text())
    path.write_text(json.dumps(rows[:-1] + [{**rows[-1], "instruction": question}], indent=1))


def current_hash(home) -> str:
    return dataset_hash(load_run_config(), home / "data")


def test_sensor_takes_the_first_content_as_baseline_then_runs_once_per_new_content(tick, home):
    first = tick()
    assert not first.run_requests and "No change in self_cognition.json, probes.jsonl, general_prompts.jsonl" in \
        first.skip_reason.skip_message

    edit(home, "Who are you, really?")
    (request,) = tick().run_requests
    assert request.run_key.startswith(current_hash(home))
    assert request.tags["persona/trigger"] == "sensor" and request.tags[DATA_HASH_TAG] == current_hash(home)
    assert json.loads(request.tags[UPSTREAM_TAG])["data"] == current_hash(home)[:16]

    for _ in range(2):  # the same content again: skipped, with the reason
        again = tick()
        assert not again.run_requests and again.skip_reason.skip_message.startswith("No change")
    assert len(tick.run_requests) == 1


def test_sensor_burst_of_edits_inside_the_quiet_period_starts_one_run(tick, home, clock, monkeypatch):
    monkeypatch.setenv(QUIET_ENV, "60")
    tick()
    for n in range(3):  # an edit every 20 s: each restarts the quiet period
        edit(home, f"Edit number {n}?")
        clock.now += 20
        result = tick()
        assert "a run starts once they have been quiet for 60 s (0 s so far)" in result.skip_reason.skip_message
    clock.now += 50
    assert "(50 s so far)" in tick().skip_reason.skip_message
    clock.now += 15
    (request,) = tick().run_requests
    assert request.tags[DATA_HASH_TAG] == current_hash(home)  # the last edit's content
    clock.now += 60
    tick()
    assert len(tick.run_requests) == 1


def test_sensor_change_reverted_within_the_quiet_period_starts_nothing(tick, home, clock, monkeypatch):
    monkeypatch.setenv(QUIET_ENV, "60")
    tick()
    original = (home / "data" / "self_cognition.json").read_text()
    edit(home, "A passing thought?")
    tick()
    (home / "data" / "self_cognition.json").write_text(original)
    clock.now += 120
    assert tick().skip_reason.skip_message.startswith("Back to the content of the last run")
    clock.now += 120
    tick()
    assert tick.run_requests == []


def test_sensor_changing_back_to_an_earlier_content_starts_a_new_run(tick, home, clock):
    path = home / "data" / "self_cognition.json"
    tick()
    a, hash_a = path.read_text(), current_hash(home)
    edit(home, "Version B?")
    b, hash_b = path.read_text(), current_hash(home)
    for content in (b, a, b):  # A → B → A → B: every change trains, and no run key repeats
        path.write_text(content)
        clock.now += 30
        tick()
    assert [r.tags[DATA_HASH_TAG] for r in tick.run_requests] == [hash_b, hash_a, hash_b]
    assert len({r.run_key for r in tick.run_requests}) == 3


def test_sensor_watches_the_curation_config_in_persona_yaml_but_not_training_settings(tick, home):
    tick()
    project = home / "persona.yaml"
    project.write_text(yaml.safe_dump({"ops": {"lora_adapter": {"config": {"learning_rate": 0.01}}}}))
    assert not tick().run_requests  # a training setting is the schedule's business

    project.write_text(yaml.safe_dump({"ops": {"lora_adapter": {"config": {"learning_rate": 0.01}},
                                               "curated_dataset": {"config": {"name_en": "Tiny-Robot"}}}}))
    (request,) = tick().run_requests
    assert request.run_config["ops"]["curated_dataset"]["config"] == {"name_en": "Tiny-Robot"}
    assert request.run_config["ops"]["lora_adapter"]["config"] == {"learning_rate": 0.01}

    # Without replay mixing, curation does not read the general prompts: editing them changes nothing.
    project.write_text(yaml.safe_dump({"ops": {"curated_dataset": {"config": {"name_en": "Tiny-Robot",
                                                                              "general_mix": "none"}}}}))
    assert len(tick().run_requests) == 1
    (home / "data" / "general_prompts.jsonl").write_text('{"prompt": "Something else?"}\n')
    result = tick()
    assert not result.run_requests and "general_prompts" not in result.skip_reason.skip_message


def test_sensor_waits_for_a_missing_file(tick, home):
    (home / "data" / "probes.jsonl").unlink()
    result = tick()
    assert not result.run_requests and result.skip_reason.skip_message.startswith("Waiting for probes.jsonl")


def test_sensor_without_cursor_compares_with_the_data_of_the_last_adapter(tick, home):
    @asset(name="lora_adapter")
    def trained_earlier():
        return None

    with instance_for_test() as instance:
        tick.instance = instance
        materialize([trained_earlier], instance=instance, tags={DATA_HASH_TAG: current_hash(home)})
        assert not tick().run_requests  # trained on this very data: nothing to do

        edit(home, "Changed while the sensor was off?")
        tick.cursor = None  # e.g. a fresh sensor state, or a reset cursor
        assert len(tick().run_requests) == 1


def test_sensor_turned_off_by_environment(tick, monkeypatch):
    monkeypatch.setenv(sensors.SWITCH_ENV, "off")
    assert tick().skip_reason.skip_message == f"Turned off by {sensors.SWITCH_ENV}=off."


def test_sensor_run_whose_training_fails_leaves_its_mlflow_run_failed(tick, home, resources, tiny_model, monkeypatch):
    import mlflow

    from assets.base_model import base_model
    from assets.curated_dataset import curated_dataset
    from assets.lora_adapter import lora_adapter
    from persona.training import TrainingError

    (home / "persona.yaml").write_text(yaml.safe_dump({"ops": {
        "base_model": {"config": {"model": str(tiny_model)}},
        "curated_dataset": {"config": {"general_mix": "none"}},
        "lora_adapter": {"config": {"device": "cpu"}},
    }}))
    tick()
    edit(home, "Will this one train?")
    (request,) = tick().run_requests

    def out_of_memory(*args, **kwargs):
        raise TrainingError("ms-swift training failed (exit code 1). Last output:\nRuntimeError: out of memory")

    monkeypatch.setattr("orchestration.resources.FakeTrainer.train", out_of_memory)
    result = materialize([base_model, curated_dataset, lora_adapter], resources=resources,
                         run_config=request.run_config, tags=request.tags, raise_on_error=False)
    assert not result.success
    failure = next(e for e in result.all_events if e.is_step_failure)
    assert failure.step_key == "lora_adapter"
    assert "RuntimeError: out of memory" in failure.step_failure_data.user_failure_data.description

    resources["mlflow_tracker"].client()
    (run,) = mlflow.search_runs(experiment_names=["persona"], output_format="list")
    assert run.info.status == "FAILED"
    assert "RuntimeError: out of memory" in run.data.tags["persona.error"]
    assert run.data.tags["dagster_run_id"] == result.run_id
