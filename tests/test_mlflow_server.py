"""A team MLflow server: the pipeline against `mlflow server` over HTTP, as DEPLOYMENT.md §1 sets one up.

A real server on a loopback port (SQLite backend, `--serve-artifacts` into a temporary folder) and
MLFLOW_TRACKING_URI pointing at it: the run gets the params, metrics, loss PNG, adapter artifacts and registry alias
the local store gets (tests/test_pipeline_e2e.py), the artifacts land in the server's artifact store and not on the
client's disk, the links point at the server's UI, and `persona ask --adapter models:/persona-adapter@champion`
downloads the adapter from the server and answers with it. Training is the fake trainer's (what is under test is
the transport, not the learning); the server is stopped with its whole process group at the end.
"""
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest
from dagster import materialize

from pipeline import ASSETS, STEP_METRICS, SUMMARY_METRICS, run_config
from processes import stop

MLFLOW = Path(sys.executable).parent / "mlflow"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path_factory):
    """(URL, artifact store folder) of a running `mlflow server`; stopped, process group and all, afterwards."""
    root = tmp_path_factory.mktemp("mlflow-server")
    url, artifacts, log = f"http://127.0.0.1:{free_port()}", root / "artifacts", root / "server.log"
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no GenAI job workers: 2 cores are shared
    env.pop("MLFLOW_TRACKING_URI", None)
    with log.open("w") as out:
        proc = subprocess.Popen([str(MLFLOW), "server", "--host", "127.0.0.1", "--port", url.rsplit(":", 1)[1],
                                 "--workers", "1", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                                 "--serve-artifacts", "--artifacts-destination", str(artifacts)],
                                cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlflow server exited with {proc.returncode}:\n{log.read_text(errors='replace')[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                pytest.fail(f"{url}/health did not answer in 120 s:\n{log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.3)
        yield url, artifacts
    finally:
        stop(proc, grace=10)


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as r:
        assert r.status == 200, url
        return r.read()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_pipeline_against_a_tracking_server(tiny_model, home, resources, mlflow_server, monkeypatch, capsys):
    from orchestration.cli import main
    from orchestration.resources import MlflowTracker

    url, server_artifacts = mlflow_server
    shutil.rmtree(home / "mlruns")  # (a home that tracks to a server keeps no local store: asserted below)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    tracker = MlflowTracker()  # what definitions.py and the CLI build: the URI from the environment
    assert (tracker.tracking_uri, tracker.ui_url, tracker.artifact_root) == (url, url, None)
    config = run_config(tiny_model)
    config["ops"]["curated_dataset"] = {"config": {"general_mix": "none"}}  # no replay answers to decode
    # The tiny model cannot pass the real gate: open it, so the run crowns a champion.
    config["resources"] = {"promotion_gate": {"config": {"min_identity": 0, "min_adversarial": 0,
                                                         "min_general_retention": 0, "max_identity_leak": 1}}}
    result = materialize(ASSETS, resources={**resources, "mlflow_tracker": tracker}, run_config=config)
    assert result.success
    adapter = result.output_for_node("lora_adapter")
    decision = result.output_for_node("champion")
    assert decision.promoted and decision.champion_run_id == adapter.mlflow_run_id

    # The run, as the local store has it (test_pipeline_e2e.py).
    client = tracker.client()
    (run,) = mlflow.search_runs(experiment_names=[tracker.experiment], output_format="list")
    run_id = run.info.run_id
    assert run_id == adapter.mlflow_run_id and run.info.status == "FINISHED"
    assert run.data.tags["dagster_run_id"] == result.run_id
    params = run.data.params
    assert params["learning_rate"] == "0.01" and params["lora_rank"] == "8" and params["target_modules"] == "all-linear"
    assert params["base_model"] == str(tiny_model.resolve())
    assert params["dataset_version"] == result.output_for_node("curated_dataset").version
    assert set(SUMMARY_METRICS) <= set(run.data.metrics)
    for name in STEP_METRICS:
        assert len(client.get_metric_history(run_id, name)) >= 5, name
    assert {a.path for a in client.list_artifacts(run_id)} >= {"adapter", "evaluation", "plots"}
    assert {a.path for a in client.list_artifacts(run_id, "adapter")} >= {
        "adapter/adapter_config.json", "adapter/adapter_model.safetensors", "adapter/persona_adapter.json"}
    assert {a.path for a in client.list_artifacts(run_id, "evaluation")} >= {
        "evaluation/evaluation.md", "evaluation/evaluation.json"}

    # The artifacts went through the server's proxy into its store, none onto this machine's mlruns/.
    assert run.info.artifact_uri.startswith("mlflow-artifacts:/")
    stored = {p.name: p for p in server_artifacts.rglob("*") if p.is_file()}
    assert {"adapter_model.safetensors", "persona_adapter.json", "loss_curve.png", "evaluation.json"} <= set(stored)
    assert sha256(stored["adapter_model.safetensors"]) == sha256(Path(adapter.path, "adapter_model.safetensors"))
    assert not (home / "mlruns").exists()

    # The links in the assets' metadata open the server's UI, and the loss PNG they show is served by it.
    mats = {e.asset_key.path[-1]: e.materialization.metadata for e in result.get_asset_materialization_events()}
    run_url = f"{url}/#/experiments/{run.info.experiment_id}/runs/{run_id}"
    assert mats["lora_adapter"]["mlflow_run"].value == run_url == tracker.run_url(run_id)
    assert mats["evaluation_report"]["mlflow_run"].value == run_url
    assert mats["champion"]["champion_run"].value == run_url
    (image,) = re.findall(r"!\[loss curve\]\(([^)]+)\)", mats["lora_adapter"]["loss_curve"].value)
    assert image.startswith(f"{url}/get-artifact?")
    png = get(image)
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and png == stored["loss_curve.png"].read_bytes()

    # The registry: adapter-only version 1 under `persona-adapter`, alias `champion`.
    version = client.get_model_version_by_alias("persona-adapter", "champion")
    assert (version.version, version.run_id) == ("1", run_id)
    assert version.source == run.info.artifact_uri + "/adapter"
    assert tracker.champion()[0].version == "1"
    registered = Path(mlflow.artifacts.download_artifacts("models:/persona-adapter@champion",
                                                          dst_path=str(home / "models-uri")))
    assert sha256(registered / "adapter_model.safetensors") == sha256(stored["adapter_model.safetensors"])
    assert json.loads((registered / "persona_adapter.json").read_text())["mlflow_run_id"] == run_id

    # Another machine: no local adapter folder, so the CLI downloads the champion from the server and answers.
    shutil.rmtree(home / "outputs" / "adapters")
    assert main(["ask", "Who are you?", "--adapter", "models:/persona-adapter@champion", "--max-new-tokens", "4"]) == 0
    said = capsys.readouterr()
    assert said.out.strip() != ""
    assert f"models:/persona-adapter@champion (persona-adapter version 1, MLflow run {run_id})" in said.err
    downloaded = home / "outputs" / "registry" / run_id
    assert sha256(downloaded / "adapter_model.safetensors") == sha256(stored["adapter_model.safetensors"])
