"""Every failure has one plain reason line (what failed, why, what to do), and no traceback reaches the user unless
asked for (`persona --debug`); a full or broken tracking store fails the run with a reason, leaves no partial
artifact or orphaned adapter, and keeps earlier runs and the champion (issue #21, points 3 and 4).

`persona run` runs here as users run it: in-process through the CLI's main() on the tiny model (the fast fake trainer
in place of ms-swift), and, for Ctrl-C, as a subprocess with the real trainer that gets a real SIGINT.
"""
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import psutil
import pytest
import yaml

from pipeline import snapshot

BIN = Path(sys.executable).parent
TRACEBACKS = ("Traceback (most recent call last)", "Stack Trace:", "DagsterExecutionStepExecutionError",
              "DagsterExecutionInterruptedError")


def project(tiny_model: Path, epochs: int = 1) -> dict:
    """persona.yaml: the tiny model, no general data to decode, a gate the untrained adapter passes."""
    return {"ops": {
        "base_model": {"config": {"model": str(tiny_model)}},
        "curated_dataset": {"config": {"general_mix": "none"}},
        "baseline_answers": {"config": {"max_new_tokens": 4, "stability_samples": 1}},
        "lora_adapter": {"config": {"device": "cpu", "num_train_epochs": epochs, "logging_steps": 1}},
    }, "resources": {"promotion_gate": {"config": {"min_identity": 0, "min_adversarial": 0, "min_general_retention": 0,
                                                   "max_identity_leak": 1}}}}


@pytest.fixture
def cli(tiny_model, home, monkeypatch):
    """`persona run` in this process: this home, persona.yaml for the tiny model, the fake trainer."""
    import importlib

    import orchestration.definitions
    from orchestration.resources import FakeTrainer, Trainer

    monkeypatch.setenv("DAGSTER_HOME", str(home / ".dagster"))
    monkeypatch.setenv("PERSONA_TRAINER_STANDBY", "never")
    monkeypatch.delenv("PERSONA_DEBUG", raising=False)
    monkeypatch.setattr(Trainer, "train", FakeTrainer.train)
    (home / "persona.yaml").write_text(yaml.safe_dump(project(tiny_model)))
    # definitions.py builds its resources (this home's folders) when imported: build them for this home
    built = orchestration.definitions.defs
    fresh = importlib.reload(orchestration.definitions).defs
    orchestration.definitions.defs = built
    monkeypatch.setattr(orchestration.definitions, "defs", fresh)  # (the other tests keep theirs)
    from orchestration.cli import main

    return main


@pytest.fixture
def trained(cli, home, resources, capsys):
    """A home after one good `persona run`: a dataset, an adapter, MLflow history and a champion."""
    assert cli(["run"]) == 0, capsys.readouterr().err[-3000:]
    out = capsys.readouterr().out
    state = snapshot(home, resources["mlflow_tracker"])
    assert state["champion"] is not None and list(state["runs"].values()) == ["FINISHED"], out
    return state


def new_data(home: Path) -> None:
    """One more row: a new dataset version."""
    path = home / "data" / "self_cognition.json"
    rows = json.loads(path.read_text())
    path.write_text(json.dumps(rows + [{"instruction": "Who is speaking?", "output": rows[0]["output"]}]))


def assert_plain(err: str) -> None:
    for marker in TRACEBACKS:
        assert marker not in err, (marker, err[-3000:])


def new_runs(home: Path, before: dict) -> list:
    from orchestration.resources import MlflowTracker

    MlflowTracker().client()
    return [r for r in mlflow.search_runs(experiment_names=["persona"], output_format="list")
            if r.info.run_id not in before["runs"]]


# --- point 3: one plain line ------------------------------------------------------------------------------------


def test_an_unexpected_step_error_names_the_exception_not_the_dagster_wrapper(cli, tiny_model, home, capsys):
    """Errors no persona check names: a base model folder whose config.json a partial download cut short, and a file
    where Dagster's storage folder goes. The run reports the exception itself, in one line, and what to do."""
    model = home / "partial-model"
    shutil.copytree(tiny_model, model)
    (model / "persona_model.json").unlink(missing_ok=True)
    (model / "config.json").write_text((model / "config.json").read_text()[:40])
    (home / "persona.yaml").write_text(yaml.safe_dump({"ops": {"base_model": {"config": {"model": str(model)}}}}))
    assert cli(["run"]) == 1
    err = capsys.readouterr().err
    assert "\n✗ base_model failed:\nJSONDecodeError: " in err and "— run `persona --debug run` to see where it " \
        "happened\n\nThe run stopped after " in err
    assert "earlier datasets, adapters, MLflow runs and the champion are untouched" in err
    assert_plain(err)  # neither in the summary nor in Dagster's log lines above it

    (home / "persona.yaml").write_text(yaml.safe_dump(project(tiny_model)))
    storage = home / ".dagster" / "storage"
    shutil.rmtree(storage)  # (the first run's logs)
    storage.write_text("a file where Dagster keeps the steps' outputs")
    assert cli(["run"]) == 1
    err = capsys.readouterr().err
    assert f"\n✗ base_model failed:\nFileExistsError: [Errno 17] File exists: '{storage}' — run `persona --debug " \
           "run` to see where it happened\n" in err
    assert_plain(err)


@pytest.mark.slow
def test_ctrl_c_during_persona_run_says_so_and_loses_nothing(tiny_model, home, resources, tmp_path_factory):
    """A real SIGINT to the process group of `persona run` (what Ctrl-C in a terminal sends) during training."""
    from dagster import materialize

    from pipeline import ASSETS

    before_result = materialize(ASSETS, resources=resources, run_config=project(tiny_model))
    assert before_result.success
    before = snapshot(home, resources["mlflow_tracker"])
    (home / "persona.yaml").write_text(yaml.safe_dump(project(tiny_model, epochs=200)))  # long enough to interrupt
    new_data(home)
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path_factory.mktemp("dagster_home")), "PERSONA_HOME": str(home),
           "TQDM_DISABLE": "1", "PERSONA_TRAINER_STANDBY": "never"}
    env.pop("PERSONA_DEBUG", None)
    proc = subprocess.Popen([str(BIN / "persona"), "run"], cwd=home, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            # as a terminal's shell starts it (a test runner may start with SIGINT ignored)
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    reader.start()
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not any(" - lora_adapter - step " in line for line in lines):
            time.sleep(0.5)  # training has started and reports steps
        assert any(" - lora_adapter - step " in line for line in lines), "".join(lines)[-3000:]
        trainers = [p for p in psutil.Process(proc.pid).children(recursive=True)
                    if "persona.train_worker" in " ".join(p.cmdline())]
        os.killpg(proc.pid, signal.SIGINT)
        code = proc.wait(90)
        reader.join(10)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    err = "".join(lines)
    assert code == 130, err[-3000:]
    assert "✗ Interrupted (Ctrl-C) during lora_adapter" in err and "Nothing was lost" in err
    assert_plain(err)
    assert not psutil.wait_procs(trainers, timeout=15)[1]  # the training child is gone too
    after = snapshot(home, resources["mlflow_tracker"])
    assert {k: after["runs"][k] for k in before["runs"]} == before["runs"]
    assert {k: v for k, v in after["files"].items() if "adapters" in k} == \
        {k: v for k, v in before["files"].items() if "adapters" in k}  # no new adapter, half-written or not
    assert after["champion"] == before["champion"] and after["partials"] == []
    (run,) = new_runs(home, before)
    assert run.info.status == "KILLED" and "interrupted" in run.data.tags["persona.error"]


def test_persona_yaml_mistakes_are_located(cli, home, capsys):
    config = home / "persona.yaml"
    cases = {
        "ops:\n  lora_adapter:\n\tconfig: {}\n": f"{config}:3:1: not valid YAML (found character '\\t' that cannot "
                                                 "start any token",
        "ops:\n  lora_adapter:\n    config:\n      lerning_rate: 0.01\n":
            f"{config}:4: ops.lora_adapter.config.lerning_rate: unknown setting (did you mean learning_rate?) — "
            "allowed: device, gradient_accumulation_steps,",
        "ops:\n  lora_adapter:\n    config:\n      learning_rate: 5e-4\n      num_train_epochs: three\n":
            f"{config}:4: ops.lora_adapter.config.learning_rate: '5e-4' is not a number — write it unquoted, e.g. "
            f"0.0005 or 5.0e-4 (YAML reads 5e-4, without a dot, as text)\n{config}:5: "
            "ops.lora_adapter.config.num_train_epochs: 'three' is not a whole number",
        "ops:\n  curated_dataset:\n    config:\n      sources: self_cognition.json\n":
            f"{config}:4: ops.curated_dataset.config.sources: 'self_cognition.json' is not a list — write a list, "
            "e.g. ['self_cognition.json']",
        "ops:\n  lora_adapterr:\n    config: {}\n":
            f"{config}:2: ops.lora_adapterr: unknown step (did you mean lora_adapter?) — allowed: base_model, "
            "curated_dataset, baseline_answers, lora_adapter, evaluation_report, champion",
        "op:\n  lora_adapter: {}\n": f"{config}:1: op: unknown key (did you mean ops?) — allowed at the top: ops",
    }
    for text, expected in cases.items():
        config.write_text(text)
        assert cli(["run"]) == 1, text
        err = capsys.readouterr().err
        assert err.startswith(f"persona run: {expected}"), (text, err)
        assert_plain(err)
        assert cli(["ask", "--base", "Who are you?"]) == 1  # every command reads persona.yaml the same way
        assert expected in capsys.readouterr().err


def test_persona_yaml_knows_every_setting_of_the_job():
    from orchestration.definitions import defs
    from orchestration.run_config import STEP_CONFIGS

    job = defs.resolve_job_def("train_persona")
    configurable = {node.name: set(node.config_schema.config_type.fields) for node in job.graph.node_defs
                    if node.config_schema and getattr(node.config_schema.config_type, "fields", None)}
    assert {name: set(cls.model_fields) for name, cls in STEP_CONFIGS.items() if cls} == configurable
    assert set(STEP_CONFIGS) == {key.to_user_string() for asset in defs.assets for key in asset.keys}


@pytest.fixture
def broken_adapter(home, tiny_model, random_adapter) -> Path:
    """An adapter folder whose weights file a partial copy cut short."""
    from orchestration.resources import ModelHub

    base = ModelHub().get(str(tiny_model), "master")  # prepared as a run prepares it (persona_model.json)
    folder = home / "outputs" / "adapters" / "broken"
    shutil.copytree(random_adapter, folder)
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:300])
    (home / "cases.jsonl").write_text(json.dumps({"kind": "general", "question": "What is 2 + 3?",
                                                  "expect_any": ["5"]}) + "\n")
    (folder / "persona_adapter.json").write_text(json.dumps({
        "path": str(folder), "mlflow_run_id": "", "device": "cpu", "system": "You are a helpful assistant.",
        "dataset_version": "x", "identity": {}, "base_model": base.path, "template": "chatml",
        "dataset_probes": str(home / "cases.jsonl")}))
    return folder


@pytest.mark.slow
def test_ask_and_evaluate_errors_are_one_line_and_debug_shows_the_traceback(cli, home, broken_adapter, capsys,
                                                                           monkeypatch):
    damaged = ("SafetensorError: Error while deserializing header: invalid header length — a weights file "
               "(.safetensors) is damaged or incomplete")
    assert cli(["ask", "--adapter", str(broken_adapter), "Who are you?", "--max-new-tokens", "2"]) == 1
    err = capsys.readouterr().err
    assert f"persona ask: {damaged}" in err
    assert_plain(err)
    assert cli(["evaluate", "--adapter", str(broken_adapter), "--max-new-tokens", "2"]) == 1
    err = capsys.readouterr().err
    assert f"persona evaluate: {damaged}" in err
    assert_plain(err)

    with pytest.raises(Exception, match="deserializing header"):  # --debug: the exception itself, traceback and all
        cli(["--debug", "ask", "--adapter", str(broken_adapter), "Who are you?"])
    monkeypatch.setenv("PERSONA_DEBUG", "1")
    with pytest.raises(Exception, match="deserializing header"):
        cli(["ask", "--adapter", str(broken_adapter), "Who are you?"])
    monkeypatch.delenv("PERSONA_DEBUG")
    shown = subprocess.run([str(BIN / "persona"), "--debug", "ask", "--adapter", str(broken_adapter), "Who?"],
                           capture_output=True, text=True, env={**os.environ, "PERSONA_HOME": str(home)}, timeout=300)
    assert shown.returncode == 1 and "Traceback (most recent call last)" in shown.stderr
    assert "safetensors" in shown.stderr.splitlines()[-1]


# --- point 4: a full or broken tracking store ----------------------------------------------------------------------


def full_after(fraction: float, code: int = errno.ENOSPC):
    """MLflow's copy of a folder into its local artifact store, on a disk that fills up in the first weights file
    (ENOSPC), or that turns out read-only there (EROFS: a remounted disk; root ignores file permissions)."""
    def copy(src_dir, dst_dir):
        for dirpath, _, filenames in os.walk(src_dir):
            target = os.path.normpath(os.path.join(dst_dir, os.path.relpath(dirpath, src_dir)))
            os.makedirs(target, exist_ok=True)
            for name in sorted(filenames):
                src, dst = os.path.join(dirpath, name), os.path.join(target, name)
                if name.endswith(".safetensors"):
                    data = Path(src).read_bytes()
                    Path(dst).write_bytes(data[:int(len(data) * fraction)])  # what fitted
                    raise OSError(code, os.strerror(code), dst)
                shutil.copy2(src, dst)
    return copy


@pytest.mark.parametrize("code, fraction", [(errno.ENOSPC, 0.37), (errno.EROFS, 0.0)], ids=["full", "read-only"])
def test_a_full_mlflow_disk_fails_the_run_with_a_reason_and_leaves_nothing_partial(trained, cli, home, resources,
                                                                                  capsys, monkeypatch, code, fraction):
    import mlflow.store.artifact.local_artifact_repo as local_repo

    monkeypatch.setattr(local_repo, "shutil_copytree_without_file_permissions", full_after(fraction, code))
    new_data(home)
    assert cli(["run"]) == 1
    err = capsys.readouterr().err
    (run,) = new_runs(home, trained)  # one attempt: a full disk is not retried
    weights = Path(run.info.artifact_uri.removeprefix("file://")) / "adapter" / "adapter_model.safetensors"
    assert (f"✗ lora_adapter failed:\nCannot write {weights}: {os.strerror(code)}. Free disk space or fix the "
            f"folder's permissions, then run again; MLflow run {run.info.run_id} ended FAILED and its partial "
            "artifacts were removed, and earlier datasets, adapters, MLflow runs and the champion are untouched.") in err
    assert_plain(err)
    assert run.info.status == "FAILED" and os.strerror(code) in run.data.tags["persona.error"]
    artifacts = Path(run.info.artifact_uri.removeprefix("file://"))
    assert not artifacts.exists() and not artifacts.parent.exists()  # the partial weights and the run's folder
    adapters = home / "outputs" / "adapters"
    assert not (adapters / run.info.run_id).exists()  # no adapter folder without its manifest
    assert all((folder / "persona_adapter.json").is_file() for folder in adapters.iterdir())
    after = snapshot(home, resources["mlflow_tracker"])
    assert {k: after["runs"][k] for k in trained["runs"]} == trained["runs"]
    assert {k: v for k, v in after["files"].items() if "adapters" in k} == \
        {k: v for k, v in trained["files"].items() if "adapters" in k}
    assert after["champion"] == trained["champion"] and after["partials"] == []


def test_an_emptied_or_damaged_mlflow_db_is_refused_not_recreated(trained, cli, home, resources, capsys):
    from orchestration.resources import MlflowTracker

    tracker = resources["mlflow_tracker"]
    with tracker.run(run_name="later"):  # a second training starts: the database is copied first
        pass
    db, backup = home / "mlruns" / "mlflow.db", home / "mlruns" / "mlflow.db.backup"
    assert backup.is_file()

    db.write_bytes(b"")  # e.g. a full disk truncated it
    assert cli(["run"]) == 1
    err = capsys.readouterr().err
    assert (f"persona run: MLflow's tracking database {db} is empty (0 bytes), but {home / 'mlruns' / 'artifacts'} "
            "holds the artifacts of 1 earlier run(s): MLflow would silently start a new, empty history there") in err
    assert f"cp {backup} {db}" in err and f"move {home / 'mlruns'} aside" in err
    assert_plain(err)
    assert db.stat().st_size == 0  # not recreated
    assert cli(["ask", "Who are you?"]) == 1  # the other commands refuse it too
    assert "is empty (0 bytes)" in capsys.readouterr().err

    db.write_bytes(b"\x00garbage" * 512)
    assert cli(["run"]) == 1
    err = capsys.readouterr().err
    assert f"persona run: MLflow's tracking database {db} is damaged (it is not an SQLite database)" in err
    assert_plain(err)
    assert db.read_bytes() == b"\x00garbage" * 512

    shutil.copy(backup, db)  # what the message says to do: the history and the champion are back
    assert snapshot(home, MlflowTracker())["champion"] == trained["champion"]
    assert set(trained["runs"]) <= set(snapshot(home, MlflowTracker())["runs"])


@pytest.mark.parametrize("ending", ["traceback", "signal"])
def test_a_training_child_ended_by_ctrl_c_ends_the_run_as_interrupted(tmp_path, monkeypatch, ending):
    """Ctrl-C reaches the training child too; when its exit is seen before this process's own interrupt, the run is
    still interrupted (KeyboardInterrupt: exit 130, not retried), not a failed training (a race seen in CI)."""
    from persona import training
    from persona.models import BaseModel
    from persona.recipe import CPU_SMALL

    code = {"traceback": "print('Traceback (most recent call last):'); print('KeyboardInterrupt'); raise SystemExit(1)",
            # Python's own Ctrl-C handling, whatever this worker left SIGINT at (an ignored signal is inherited)
            "signal": "import os, signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
                      "os.kill(os.getpid(), signal.SIGINT)"}[ending]
    monkeypatch.setattr(training, "launch_command", lambda job_file, world_size=1, python=None:
                        [sys.executable, "-c", code])
    base = BaseModel(path=str(tmp_path / "model"), source="test", revision="r", model_type="qwen2", template="qwen2_5",
                     own_identity=(), weights_sha256="", parameters=0, bytes=0)
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "你是谁?"},
                                             {"role": "assistant", "content": "我是助手。"}]}) + "\n")
    with pytest.raises(KeyboardInterrupt):
        training.train_lora(base, data, CPU_SMALL, tmp_path / "adapter", "cpu")
    assert not (tmp_path / "adapter").exists()
    # Any other failure stays a training error with the child's last output.
    monkeypatch.setattr(training, "launch_command", lambda job_file, world_size=1, python=None:
                        [sys.executable, "-c", "print('ValueError: no'); raise SystemExit(1)"])
    with pytest.raises(training.TrainingError, match="exit code 1"):
        training.train_lora(base, data, CPU_SMALL, tmp_path / "adapter", "cpu")


def test_the_cli_says_interrupted_when_the_training_raises_keyboard_interrupt(cli, home, monkeypatch, capsys):
    """What train_lora raises for a child ended by Ctrl-C reaches the user as the interrupt, exit 130."""
    from orchestration.resources import Trainer

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt("the training child was interrupted (Ctrl-C)")

    monkeypatch.setattr(Trainer, "train", interrupted)
    assert cli(["run"]) == 130
    err = capsys.readouterr().err
    assert "✗ Interrupted (Ctrl-C) during lora_adapter" in err and "Nothing was lost" in err


@pytest.mark.parametrize("raised, logged", [("interrupt", False), ("error", True)])
def test_an_interrupt_inside_a_connection_close_prints_no_pool_traceback(raised, logged, caplog):
    """Ctrl-C can land while SQLAlchemy closes a connection (seen in CI): Dagster's handler raises its interrupt
    there, and the pool would log it with a traceback. `persona run` drops that record and nothing else."""
    import logging
    import sqlite3

    from dagster._core.errors import DagsterExecutionInterruptedError
    from sqlalchemy.pool import NullPool

    from orchestration.plain_errors import quiet_interrupted_closes

    exc = DagsterExecutionInterruptedError() if raised == "interrupt" else OSError("disk I/O error")

    class Connection:  # a DBAPI connection whose close is where the signal lands
        def __init__(self):
            self.inner = sqlite3.connect(":memory:")

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def close(self):
            self.inner.close()
            raise exc

    quiet_interrupted_closes()
    quiet_interrupted_closes()  # (twice: one filter)
    pool = NullPool(Connection)
    caplog.set_level("ERROR", logger="sqlalchemy.pool")
    connection = pool.connect()
    if raised == "interrupt":
        with pytest.raises(DagsterExecutionInterruptedError):  # the interrupt still stops what it interrupted
            connection.close()
    else:
        connection.close()  # a plain error while closing is logged and swallowed, as SQLAlchemy does
    records = [r for r in caplog.records if "closing connection" in r.getMessage()]
    assert bool(records) is logged
    assert len(logging.getLogger("sqlalchemy.pool.impl.NullPool").filters) == 1


@pytest.mark.parametrize("raised", ["interrupt", "error"])
def test_an_interrupt_swallowed_by_a_gc_callback_is_delivered_again_without_a_traceback(raised, monkeypatch, capfd):
    """Ctrl-C can land while the garbage collector runs a weakref callback (SQLAlchemy's, seen in CI): Python
    swallows the interrupt there and prints "Exception ignored" with a traceback. `persona run` prints nothing and
    sends the interrupt again, so it still stops the run; any other ignored exception is printed as before."""
    import weakref

    from dagster._core.errors import DagsterExecutionInterruptedError

    from orchestration.plain_errors import redeliver_swallowed_interrupts

    received = []
    monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)  # (restored after the test)
    previous = signal.signal(signal.SIGINT, lambda *_: received.append(time.time()))
    try:
        redeliver_swallowed_interrupts()

        class Connection:
            pass

        def callback(_):
            raise DagsterExecutionInterruptedError() if raised == "interrupt" else ValueError("a plain error")

        connection = Connection()
        ref = weakref.ref(connection, callback)  # noqa: F841 - the callback runs when the connection is collected
        del connection
        deadline = time.time() + 5
        while raised == "interrupt" and not received and time.time() < deadline:
            time.sleep(0.01)
    finally:
        for timer in [t for t in threading.enumerate() if getattr(t, "function", None) is os.kill]:
            timer.join(30)  # a late signal must reach the recorder, not the test runner's own handler
        time.sleep(0.1)
        signal.signal(signal.SIGINT, previous)
    err = capfd.readouterr().err
    if raised == "interrupt":
        assert len(received) == 1 and err == ""
    else:
        assert not received and "Exception ignored" in err and "ValueError: a plain error" in err
