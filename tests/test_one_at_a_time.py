"""One at a time, everywhere: two first starts of a fresh home, and two trainings, whoever starts them."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from persona.locks import exclusive, holder

pytestmark = [pytest.mark.slow]

FIRST_START = "from orchestration.instance import open_instance; open_instance()"


def test_three_first_starts_of_a_fresh_home_all_work(tmp_path):
    """Without the start-up lock, DagsterInstance.get() in three processes at once fails about one time in three
    ("table secondary_indexes already exists", alembic's "more than one head")."""
    for attempt in range(2):
        home = tmp_path / f"home{attempt}"
        (home / ".dagster").mkdir(parents=True)
        env = {**os.environ, "DAGSTER_HOME": str(home / ".dagster"), "PERSONA_HOME": str(home)}
        procs = [subprocess.Popen([sys.executable, "-c", FIRST_START], env=env, stderr=subprocess.PIPE, text=True)
                 for _ in range(3)]
        errors = [err for p in procs for _, err in [p.communicate(timeout=120)] if p.returncode]
        assert errors == []
        assert (home / "mlruns" / "mlflow.db").stat().st_size > 0


HOLDER = textwrap.dedent("""
    import select, sys
    from persona.locks import exclusive
    with exclusive(sys.argv[1], "a test training"):
        print("held", flush=True)
        select.select([sys.stdin], [], [], float(sys.argv[2]))  # until told on stdin, or that many seconds
""")


def hold(lock, seconds: float) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(lock), str(seconds)], stdout=subprocess.PIPE,
                            stdin=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_training_waits_and_says_for_whom(tmp_path):
    lock = tmp_path / ".training.lock"
    other = hold(lock, 2.0)
    said = []
    started = time.time()
    with exclusive(lock, "this training", on_wait=said.append):
        waited = time.time() - started
        assert holder(lock)["pid"] == os.getpid()
    other.wait(10)
    assert waited >= 1.0
    assert len(said) == 1 and f"a test training (pid {other.pid}" in said[0] and "one at a time" in said[0]


def test_a_killed_holder_never_leaves_the_lock_behind(tmp_path):
    lock = tmp_path / ".training.lock"
    other = hold(lock, 600)
    other.send_signal(signal.SIGKILL)
    other.wait(10)
    said = []
    with exclusive(lock, "this training", on_wait=said.append):
        pass
    assert said == []  # free at once


def test_the_lora_adapter_step_waits_for_another_training(tiny_model, home, resources):
    """Another process (another `persona run`, a daemon run) trains: this run's lora_adapter step waits for it."""
    from dagster import DagsterInstance, materialize

    from assets.lora_adapter import TRAINING_LOCK
    from pipeline import ASSETS, run_config

    import threading

    other = hold(home / "outputs" / TRAINING_LOCK, 120)
    config = run_config(tiny_model)
    config["ops"].pop("baseline_answers")
    instance = DagsterInstance.ephemeral()
    said = []

    def release_when_waited_for() -> None:  # the other training ends once this run has said it waits for it
        deadline = time.time() + 110
        while time.time() < deadline and not said:
            said.extend(e.user_message for run in instance.get_runs() for e in instance.all_logs(run.run_id)
                        if "waiting for" in (e.user_message or ""))
            time.sleep(0.2)
        other.stdin.write("done\n")
        other.stdin.flush()

    releaser = threading.Thread(target=release_when_waited_for, daemon=True)
    releaser.start()
    result = materialize(ASSETS, selection=["base_model", "curated_dataset", "lora_adapter"], resources=resources,
                         run_config=config, instance=instance)
    releaser.join(10)
    assert result.success and other.wait(10) == 0
    assert len(said) == 1 and f"a test training (pid {other.pid}" in said[0]
