"""Starting and stopping the servers and daemons that end-to-end tests run on loopback, and the persona.yaml they run."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def stop(proc: subprocess.Popen, grace: float = 20) -> None:
    """Stop a process started with start_new_session=True and everything in its group (code servers, run workers,
    training children): SIGTERM first, SIGKILL for whatever is left after `grace` seconds."""
    deadline = time.time() + grace
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
            while time.time() < deadline:
                proc.poll()  # reap the leader, so that its group can empty
                os.killpg(proc.pid, 0)
                time.sleep(0.2)
        except ProcessLookupError:
            break
        deadline = time.time() + 5
    proc.wait(5)


def project(tiny_model: Path) -> dict:
    """persona.yaml for a test run on the tiny model; tests that need a long training raise num_train_epochs."""
    return {"ops": {
        "base_model": {"config": {"model": str(tiny_model)}},
        "lora_adapter": {"config": {"device": "cpu", "learning_rate": 1e-2, "num_train_epochs": 2,
                                    "logging_steps": 1}},
        "baseline_answers": {"config": {"max_new_tokens": 12, "stability_samples": 2}},
    }}
