"""Runs that resume: checkpoints every tenth of the steps, and a killed training continues from its last one."""
import json
import os
import signal
from pathlib import Path

import psutil
import pytest

from conftest import IDENTITY, QUESTIONS
from persona.models import from_local_dir
from persona.recipe import CPU_SMALL
from persona.training import (RESUME_FILE, TRAINER_STATE_FILES, TrainingInterrupted, last_checkpoint, open_resume,
                              train_lora)

pytestmark = [pytest.mark.slow]


def identity_rows(path: Path) -> Path:
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q},
                                                     {"role": "assistant", "content": IDENTITY}]}) + "\n"
                            for q in QUESTIONS), encoding="utf-8")
    return path


def training_children() -> list[int]:
    """This process's children that run persona.train_worker."""
    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            if "persona.train_worker" in " ".join(child.cmdline()):
                found.append(child.pid)
        except psutil.NoSuchProcess:
            pass
    return found


def test_last_checkpoint_is_the_newest_complete_one(tmp_path):
    for step, complete in ((4, True), (12, True), (16, False)):  # 16: killed while saving
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        if complete:
            (folder / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-x").mkdir()
    assert last_checkpoint(tmp_path) == tmp_path / "checkpoint-12"
    assert last_checkpoint(tmp_path / "nothing") is None


def test_the_resume_record_keeps_attempts_only_while_there_is_something_to_resume(tmp_path):
    first = open_resume(tmp_path, "a" * 64, "run-1")
    assert first.checkpoint is None and first.previous is None and first.step == 0
    (first.folder / "checkpoint-6").mkdir()
    (first.folder / "checkpoint-6" / "trainer_state.json").write_text("{}")
    second = open_resume(tmp_path, "a" * 64, "run-2")
    assert (second.step, second.previous) == (6, "run-1")
    assert json.loads((second.folder / RESUME_FILE).read_text())["attempts"] == ["run-1", "run-2"]
    # Another training that happens to share the folder name starts over.
    other = open_resume(tmp_path, "a" * 16 + "b" * 48, "run-3")
    assert other.folder == first.folder and other.previous is None


def test_the_checkpoint_clock_keeps_saving_under_its_share():
    from persona.checkpointing import CheckpointClock

    for step, save, min_gap in ((0.1, 0.5, 0.0), (0.01, 2.0, 0.0), (1.0, 0.2, 60.0)):
        clock, now, saving, saves = CheckpointClock(0.0, min_gap=min_gap), 0.0, 0.0, 0
        while now < 3600:
            now += step
            if clock.due(now):
                now += save
                saving += save
                saves += 1
                assert clock.saved(now) == pytest.approx(save)
        assert saving - save <= 0.05 * now  # every save after the first costs at most 5 % of the time
        assert saves >= 3600 / (max(min_gap, 19 * save) + save + step) - 1  # and no less often than that


def test_a_killed_training_resumes_from_its_last_checkpoint(tiny_model, tmp_path, monkeypatch):
    """A real SIGKILL of the training child at a step; the retry continues from the checkpoint before it, and its
    adapter matches an uninterrupted run's."""
    from safetensors.torch import load_file

    monkeypatch.setenv("PERSONA_CHECKPOINT_MIN_SECONDS", "0")  # as often as the 5 % share allows: seconds apart

    base = from_local_dir(str(tiny_model))
    data = identity_rows(tmp_path / "train.jsonl")
    recipe = CPU_SMALL.with_overrides(num_train_epochs=2, logging_steps=1, per_device_train_batch_size=1)
    steps = 2 * len(QUESTIONS)  # 44 steps
    root = tmp_path / "checkpoints"
    kill_at = 30

    def kill(progress: dict) -> None:
        if int(progress["global_step/max_steps"].split("/")[0]) == kill_at:
            for pid in training_children():
                os.kill(pid, signal.SIGKILL)

    with pytest.raises(TrainingInterrupted, match="killed by signal 9.*checkpoints are kept"):
        train_lora(base, data, recipe, tmp_path / "adapter", "cpu", on_progress=kill, checkpoint_root=root,
                   owner="attempt-1")
    assert not (tmp_path / "adapter").exists()
    (folder,) = root.iterdir()
    saved = int(last_checkpoint(folder).name.removeprefix("checkpoint-"))
    assert 1 <= saved < steps

    seen, lines = [], []
    resumed = train_lora(base, data, recipe, tmp_path / "adapter", "cpu", checkpoint_root=root, owner="attempt-2",
                         on_progress=lambda p: seen.append(int(p["global_step/max_steps"].split("/")[0])),
                         on_output=lines.append)
    assert (resumed.resumed_from_step, resumed.resumed_from) == (saved, "attempt-1")
    assert any("resuming from" in line and f"checkpoint-{saved}" in line for line in lines)
    assert seen and min(seen) == saved + 1 and max(seen) == steps == resumed.global_step  # no step run twice
    assert not folder.exists()  # the adapter is complete: its checkpoints are gone
    kept = {f.name for f in (tmp_path / "adapter").iterdir()}
    assert "adapter_model.safetensors" in kept and not kept & set(TRAINER_STATE_FILES)

    whole = train_lora(base, data, recipe, tmp_path / "whole", "cpu")
    assert whole.resumed_from_step == 0 and whole.global_step == steps
    a = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "whole" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for name in a:  # the same optimization: restored optimizer, schedule, RNG and data order
        scale = b[name].abs().max().item()
        assert (a[name] - b[name]).abs().max().item() <= 1e-3 * scale + 1e-6, name
    losses = lambda r: {h["step"]: h["loss"] for h in r.log_history if "loss" in h}  # noqa: E731
    tail = {s: l for s, l in losses(whole).items() if s > saved}
    assert {s: losses(resumed)[s] for s in tail} == pytest.approx(tail, rel=1e-3)


def test_dagster_retries_a_killed_trainer_and_the_retry_resumes(tiny_model, home, resources, tmp_path, monkeypatch,
                                                                 retries_without_delay):
    """The lora_adapter asset's RetryPolicy: the first attempt's child is SIGKILLed mid-run, the run ends FAILED in
    MLflow, and the retry resumes from its checkpoint, in a run tagged with the one it continues."""
    import mlflow
    from dagster import DagsterInstance, materialize

    from orchestration.resources import Trainer
    from pipeline import ASSETS, run_config

    monkeypatch.setenv("PERSONA_CHECKPOINT_MIN_SECONDS", "0")

    class KilledOnce(Trainer):
        marker: str

        def train(self, *args, on_progress=None, **kw):
            first = not Path(self.marker).exists()
            Path(self.marker).touch()

            def progress(p: dict) -> None:
                if first and int(p["global_step/max_steps"].split("/")[0]) == 12:
                    for pid in training_children():
                        os.kill(pid, signal.SIGKILL)
                if on_progress:
                    on_progress(p)
            return super().train(*args, on_progress=progress, **kw)

    trainer = KilledOnce(standby="never", marker=str(tmp_path / "killed-once"))
    config = run_config(tiny_model)
    config["ops"].pop("baseline_answers")
    result = materialize(ASSETS, selection=["base_model", "curated_dataset", "lora_adapter"],
                         resources={**resources, "trainer": trainer}, run_config=config,
                         instance=DagsterInstance.ephemeral())
    assert result.success
    retried = [e for e in result.all_events if e.event_type_value == "STEP_RESTARTED"]
    assert [e.step_key for e in retried] == ["lora_adapter"]
    meta = next(e.materialization.metadata for e in result.get_asset_materialization_events()
                if e.asset_key.path[-1] == "lora_adapter")
    assert 0 < meta["resumed_from_step"].value <= 12

    tracker = resources["mlflow_tracker"]
    tracker.client()
    runs = mlflow.search_runs(experiment_names=[tracker.experiment], output_format="list", order_by=["start_time"])
    assert [r.info.status for r in runs] == ["FAILED", "FINISHED"]
    assert "killed by signal 9" in runs[0].data.tags["persona.error"]
    assert runs[1].data.tags["persona.resumed_from_run"] == runs[0].info.run_id
    assert runs[1].data.tags["persona.resumed_from_step"] == str(meta["resumed_from_step"].value)
    assert not any((home / "outputs" / "checkpoints").iterdir())  # removed once the adapter was complete
    assert not (home / "outputs" / "adapters" / runs[0].info.run_id).exists()
