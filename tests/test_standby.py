"""The trainer standby (persona/standby.py): a training child started ahead of time, claimed by one training."""
import json
import os
import socket
import threading
import time

import pytest

from orchestration.resources import Trainer
from persona import standby as standby_module
from persona.standby import ACCEPTED, EXIT_PREFIX, Standby
from persona.training import TrainingError, child_env, train_lora

pytestmark = [pytest.mark.slow]


@pytest.fixture
def standby_dir(tmp_path_factory, monkeypatch):
    d = tmp_path_factory.mktemp("sb")  # (Unix socket paths must stay short)
    d.chmod(0o700)
    monkeypatch.setenv(standby_module.DIR_ENV, str(d))
    yield d
    for proc in standby_module._spawned:  # no standby outlives its test
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def identity_data(path):
    rows = [{"messages": [{"role": "user", "content": f"Who are you, {i}?"},
                          {"role": "assistant", "content": "I am Swift-Robot, made by the persona team."}]}
            for i in range(8)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def wait_until(condition, seconds: float) -> bool:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return condition()


def test_a_standby_trains_like_a_fresh_child_then_the_next_one_waits_and_idles_out(tiny_model, tmp_path,
                                                                                    standby_dir, monkeypatch):
    from persona.models import from_local_dir
    from persona.recipe import CPU_SMALL

    base = from_local_dir(str(tiny_model))
    data = identity_data(tmp_path / "train.jsonl")
    recipe = CPU_SMALL.with_overrides(num_train_epochs=2, logging_steps=1)
    monkeypatch.delenv("TQDM_DISABLE", raising=False)  # the child's progress bars show how datasets mapped
    cold_lines = []
    cold = train_lora(base, data, recipe, tmp_path / "cold", "cpu", on_output=cold_lines.append)
    assert not cold.standby
    maps = [line for line in cold_lines if line.startswith("Map")]
    assert maps and not any("num_proc" in line for line in maps)  # datasets maps in the child: no pool started

    waiting = Standby("cpu", child_env("cpu"), idle_seconds=4)
    assert waiting.warm() is True
    assert waiting.warm() is False  # one standby per key: the second call finds it
    lines = []
    warm = train_lora(base, data, recipe, tmp_path / "warm", "cpu", on_output=lines.append, standby_idle_seconds=4)
    assert warm.standby and any("standby trainer" in line for line in lines)
    assert any("ms-swift finished" in line for line in lines)  # the child's own output came down the socket
    assert (tmp_path / "warm" / "adapter_model.safetensors").exists()
    losses = lambda r: [h["loss"] for h in r.log_history if "loss" in h]  # noqa: E731
    assert losses(warm) == pytest.approx(losses(cold), rel=1e-5) and len(losses(warm)) == cold.global_step

    nxt = Standby("cpu", child_env("cpu"), idle_seconds=4)  # the standby for the next run was started...
    assert nxt.address.exists() and nxt.alive()
    assert wait_until(lambda: not nxt.address.exists(), 90)  # ...and, with nobody to claim it, it left
    log = nxt.address.with_suffix(".log").read_text()
    assert "standby ready on cpu" in log and "no job in 4 s; exiting" in log


def serve_once(address, replies: list[bytes]):
    """A stand-in standby: accepts one job, sends `replies`, hangs up."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(address))
    listener.listen(1)

    def run():
        while True:
            conn, _ = listener.accept()
            request = b""
            while not request.endswith(b"\n"):
                chunk = conn.recv(65536)
                if not chunk:
                    break
                request += chunk
            if request:
                break
            conn.close()  # a liveness probe
        for r in replies:
            conn.sendall(r)
        conn.close()
        listener.close()
        os.unlink(address)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_a_standby_that_dies_mid_job_fails_the_training_clearly(tiny_model, tmp_path, standby_dir):
    from persona.models import from_local_dir
    from persona.recipe import CPU_SMALL

    address = Standby("cpu", child_env("cpu"), 60).address
    serve_once(address, [f"{ACCEPTED}\n".encode(), b"[persona] ms-swift imported (+0.0 s)\n", b"loading...\n"])
    data = identity_data(tmp_path / "train.jsonl")
    with pytest.raises(TrainingError, match=r"(?s)standby trainer ended without an exit code.*Last output:.*loading"):
        train_lora(from_local_dir(str(tiny_model)), data, CPU_SMALL, tmp_path / "adapter", "cpu",
                   standby_idle_seconds=60)
    assert not (tmp_path / "adapter").exists()


def test_the_exit_code_a_standby_reports_is_the_jobs(tiny_model, tmp_path, standby_dir):
    from persona.models import from_local_dir
    from persona.recipe import CPU_SMALL

    address = Standby("cpu", child_env("cpu"), 60).address
    serve_once(address, [f"{ACCEPTED}\nTraceback: boom\n{EXIT_PREFIX}1\n".encode()])
    with pytest.raises(TrainingError, match=r"(?s)\(exit code 1\).*Traceback: boom"):
        train_lora(from_local_dir(str(tiny_model)), identity_data(tmp_path / "t.jsonl"), CPU_SMALL,
                   tmp_path / "adapter", "cpu", standby_idle_seconds=60)


def test_no_standby_a_stale_one_or_one_that_refuses_means_no_claim(tmp_path, standby_dir):
    sb = Standby("cpu", child_env("cpu"), 60, accept_timeout=2)
    assert sb.claim(tmp_path / "job.json") is None and not sb.alive()  # nobody there
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # a standby killed without cleaning up
    stale.bind(str(sb.address))
    stale.close()
    assert sb.address.exists()
    assert sb.claim(tmp_path / "job.json") is None and not sb.address.exists()  # the stale file is removed
    serve_once(sb.address, [b"busy\n"])  # it answers, but not "accepted"
    assert sb.claim(tmp_path / "job.json") is None


def test_the_standby_key_follows_device_code_and_the_environment_that_matters(tmp_path, standby_dir, monkeypatch):
    env = {"PATH": "/usr/bin", "HOME": "/home/u"}
    key = Standby("cuda", env).key()
    # run bookkeeping, and what libraries set on import: the same standby (they come with the job instead)
    assert Standby("cuda", {**env, "DAGSTER_RUN_ID": "x", "TORCHINDUCTOR_CACHE_DIR": "/tmp/i", "HF_HOME": "/h"}
                   ).key() == key
    assert Standby("cpu", env).key() != key
    assert Standby("cuda", {**env, "PERSONA_SWIFT_ARGS": "{}"}).key() != key
    assert Standby("cuda", {**env, "CUDA_VISIBLE_DEVICES": "1"}).key() != key
    monkeypatch.setattr(standby_module, "_code_digest", lambda: "edited")
    assert Standby("cuda", env).key() != key  # a standby started before a code change is never handed a job


def test_the_standby_folder_must_be_private(tmp_path, monkeypatch):
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    monkeypatch.setenv(standby_module.DIR_ENV, str(shared))
    with pytest.raises(PermissionError, match="must belong to you and be private"):
        Standby("cuda", {}).address
    assert Standby("cuda", {}).warm() is False and Standby("cuda", {}).claim("job.json") is None  # never a failure


def test_the_resource_starts_standbys_on_gpus_by_default(monkeypatch):
    monkeypatch.delenv("NPROC_PER_NODE", raising=False)
    assert Trainer().idle_for("cpu") is None
    assert Trainer(idle_seconds=60).idle_for("cuda") == 60
    assert Trainer(standby="always").idle_for("cpu") == 900
    assert Trainer(standby="never").idle_for("cuda") is None
    assert Trainer(standby="never").warm("cuda") is False
    monkeypatch.setenv("NPROC_PER_NODE", "2")  # torchrun starts its own processes
    assert Trainer().idle_for("cuda") is None


def test_the_job_brings_its_environment(monkeypatch):
    from persona.train_worker import _apply_env

    monkeypatch.setenv("HF_HOME", "/standby/start")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/set/by/an/import")
    monkeypatch.setenv("OMP_NUM_THREADS", "8")
    started_with = {"HF_HOME": "/standby/start", "OMP_NUM_THREADS": "8"}
    _apply_env({"HF_HOME": "/the/job", "TRANSFORMERS_OFFLINE": "1"}, started_with)
    assert os.environ["HF_HOME"] == "/the/job" and os.environ["TRANSFORMERS_OFFLINE"] == "1"
    assert "OMP_NUM_THREADS" not in os.environ  # the caller has no such variable
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == "/set/by/an/import"


def test_a_run_starts_the_standby_when_it_starts_and_the_training_claims_it(tiny_model, home, resources,
                                                                                 monkeypatch):
    from dagster import materialize
    from dagster._core.storage.defs_state.base import set_defs_state_storage

    from assets.base_model import base_model
    from assets.curated_dataset import curated_dataset
    from assets.lora_adapter import lora_adapter

    warmed, claimed = [], []
    monkeypatch.setattr(Standby, "warm", lambda self: warmed.append(self.device) or True)
    monkeypatch.setattr(Standby, "claim", lambda self, job: claimed.append((self.device, self.idle_seconds)))
    monkeypatch.setattr("persona.recipe.detect_device", lambda: "cpu")
    config = {"ops": {"base_model": {"config": {"model": str(tiny_model)}},
                      "lora_adapter": {"config": {"device": "cpu", "num_train_epochs": 1}}}}
    resources = {**resources, "trainer": Trainer(standby="always", idle_seconds=42)}
    with set_defs_state_storage(None):  # earlier tests' Dagster instances may linger as the current one
        assert materialize([base_model, curated_dataset, lora_adapter], resources=resources, run_config=config).success
    # the run's start (the resource's setup) started one; lora_adapter made sure of it, asked for it (none answered:
    # this fake), trained in a fresh child, and started the next run's standby
    assert warmed == ["cpu", "cpu", "cpu"] and claimed == [("cpu", 42)]
