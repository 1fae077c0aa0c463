"""A killed runner leaves nothing stuck: its training child dies with it, also while the child prints nothing."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
from dagster import RunsFilter
import pytest

from conftest import IDENTITY, QUESTIONS

pytestmark = [pytest.mark.slow]

RUNNER = textwrap.dedent("""
    import sys
    from persona.models import from_local_dir
    from persona.recipe import CPU_SMALL
    from persona.training import train_lora

    model, data, out, standby, log = sys.argv[1:6]
    # Many epochs and no progress lines: a training that stays silent until it is killed.
    recipe = CPU_SMALL.with_overrides(num_train_epochs=500, logging_steps=10**6)
    with open(log, "w") as f:
        train_lora(from_local_dir(model), data, recipe, out, "cpu", standby_idle_seconds=float(standby) or None,
                   on_output=lambda line: print(line, file=f, flush=True))
""")


def trainers(standby_dir: Path | None = None) -> list[psutil.Process]:
    """The training children on this machine; with `standby_dir`, only those started for it (their environment's
    PERSONA_STANDBY_DIR), not another test's running beside this one (pytest -n)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if "persona.train_worker" in " ".join(proc.info["cmdline"] or []) and (
                    standby_dir is None or proc.environ().get("PERSONA_STANDBY_DIR") == str(standby_dir)):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


@pytest.mark.parametrize("standby", [0, 30], ids=["fresh child", "standby trainer"])
def test_the_training_dies_with_its_killed_runner(tiny_model, tmp_path, monkeypatch, standby):
    standby_dir = tmp_path / "standby"
    monkeypatch.setenv("PERSONA_STANDBY_DIR", str(standby_dir))
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q},
                                                     {"role": "assistant", "content": IDENTITY}]}) + "\n"
                            for q in QUESTIONS), encoding="utf-8")
    before = {p.pid for p in trainers(standby_dir)}
    log = tmp_path / "runner.log"
    runner = subprocess.Popen([sys.executable, "-c", RUNNER, str(tiny_model), str(data), str(tmp_path / "adapter"),
                               str(standby), str(log)], stdout=subprocess.DEVNULL, stderr=open(tmp_path / "runner.err", "w"),
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        deadline = time.time() + 120
        while time.time() < deadline and "ms-swift imported" not in (log.read_text() if log.exists() else ""):
            time.sleep(0.5)  # the job has started (in a fresh child, or in the standby that claimed it)
        assert log.exists() and "ms-swift imported" in log.read_text(), (tmp_path / "runner.err").read_text()[-3000:]
        deadline = time.time() + 60
        while time.time() < deadline and not [p for p in trainers(standby_dir) if p.pid not in before]:
            time.sleep(0.2)
        time.sleep(3)  # loading, then training without a word
        training = [p for p in trainers(standby_dir) if p.pid not in before]
        assert len(training) == 1  # (the standby for the next run starts only after this job)
        runner.send_signal(signal.SIGKILL)  # the runner (persona run, a Dagster run worker) is killed
        runner.wait(10)
        gone, alive = psutil.wait_procs(training, timeout=15)
        assert not alive, f"training outlived its runner: {[(p.pid, p.cmdline()) for p in alive]}" + "".join(
            f.read_text() for f in (tmp_path / "standby").glob("*.log"))
    finally:
        runner.kill()
        for p in trainers(standby_dir):
            if p.pid not in before:
                p.kill()


def test_a_killed_persona_run_is_reaped_and_frees_the_training_pool(tiny_model, home, tmp_path_factory):
    """SIGKILL of `persona run` itself, mid-training: its Dagster run stays STARTED (holding the one-slot training
    pool), its MLflow run RUNNING and its adapter folder half-written, until the next start reaps them."""
    import mlflow
    import yaml
    from dagster import DagsterInstance, DagsterRunStatus

    from orchestration.run_config import link_instance_config
    from orchestration.resources import MlflowTracker
    from orchestration.stale_runs import reap_stale_runs, stale_runs
    from processes import BIN, project

    dagster_home = tmp_path_factory.mktemp("dagster_home")
    link_instance_config(dagster_home)
    config = project(tiny_model)
    config["ops"]["lora_adapter"]["config"]["num_train_epochs"] = 500
    (home / "persona.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "DAGSTER_HOME": str(dagster_home), "PERSONA_HOME": str(home), "TQDM_DISABLE": "1",
           "PERSONA_CHECKPOINT_MIN_SECONDS": "0"}
    output = home / "persona-run.log"
    runner = subprocess.Popen([str(BIN / "persona"), "run"], cwd=home, env=env, stdout=output.open("w"),
                              stderr=subprocess.STDOUT)
    instance = DagsterInstance.from_config(str(dagster_home))
    tracker = MlflowTracker(tracking_uri=f"sqlite:///{home}/mlruns/mlflow.db")
    try:
        deadline = time.time() + 240
        while (time.time() < deadline and runner.poll() is None
               and not any((home / "outputs" / "checkpoints").glob("*/checkpoint-*"))):
            time.sleep(1)  # training, and past its first checkpoint
        assert any((home / "outputs" / "checkpoints").glob("*/checkpoint-*")), output.read_text()[-3000:]
        training = [p for p in trainers() if p.ppid() == runner.pid]
        runner.send_signal(signal.SIGKILL)
        runner.wait(10)
        assert not psutil.wait_procs(training, timeout=15)[1]  # the training child died with it
    finally:
        runner.kill()

    (run,) = instance.get_runs()
    assert run.status == DagsterRunStatus.STARTED  # what a killed process leaves: a ghost
    assert [r.run_id for r in stale_runs(instance)] == [run.run_id]
    tracker.client()
    (ghost,) = mlflow.search_runs(experiment_names=["persona"], output_format="list")
    assert ghost.info.status == "RUNNING"
    partials = list((home / "outputs").rglob(".*.partial-*"))
    assert partials

    reaped = reap_stale_runs(instance, tracker, home / "outputs")
    assert reaped.dagster_runs == [run.run_id] and reaped.mlflow_runs == [ghost.info.run_id]
    assert instance.get_run_by_id(run.run_id).status == DagsterRunStatus.FAILURE
    ended = mlflow.get_run(ghost.info.run_id)
    assert ended.info.status == "KILLED" and "process that ran this run is gone" in ended.data.tags["persona.error"]
    assert not any(p.exists() for p in partials)
    assert any((home / "outputs" / "checkpoints").glob("*/checkpoint-*"))  # kept: the next run resumes from it
    # Nothing holds the training pool any more: the run queue would start the next run.
    assert not instance.get_run_records(RunsFilter(statuses=[DagsterRunStatus.STARTED]))
    assert not reap_stale_runs(instance, tracker, home / "outputs")  # and a second look finds nothing
