"""The whole graph on a tiny model, end to end: artifacts, metadata, MLflow params and metrics, and bad data."""
import json
from pathlib import Path

import mlflow
import pytest
from dagster import DagsterInstance, materialize

from pipeline import ASSETS, STEP_METRICS, SUMMARY_METRICS, run_config

pytestmark = [pytest.mark.slow]


def mlflow_runs(resources) -> list:
    tracker = resources["mlflow_tracker"]
    tracker.client()
    return mlflow.search_runs(experiment_names=[tracker.experiment], output_format="list")


def test_whole_graph_then_bad_data_loses_nothing(tiny_model, home, resources, real_trainer, capsys):
    resources = {**resources, "trainer": real_trainer}
    instance = DagsterInstance.ephemeral()
    result = materialize(ASSETS, resources=resources, run_config=run_config(tiny_model), instance=instance)
    assert result.success

    checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert checks["curated_dataset_is_intact"] is True

    adapter = result.output_for_node("lora_adapter")
    files = {p.name for p in Path(adapter.path).iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files
    assert json.loads(Path(adapter.path, "adapter_config.json").read_text())["r"] == 8

    mats = {e.asset_key.path[-1]: e.materialization.metadata for e in result.get_asset_materialization_events()}
    assert mats["base_model"]["parameters"].value > 0 and len(mats["base_model"]["weights_sha256"].value) == 64
    samples = mats["curated_dataset"]["samples"].value
    assert 22 < samples <= 22 + 11  # identity rows plus replay answers (general_ratio 0.5)
    assert mats["lora_adapter"]["global_step"].value == -(-samples // 2) * 3  # batch 2, 3 epochs
    assert "| kind | question | base model | identity in system prompt only | LoRA adapter |" in \
        mats["evaluation_report"]["before_after"].value
    decision = result.output_for_node("champion")
    assert decision.candidate_run_id == adapter.mlflow_run_id and decision.reasons
    assert mats["evaluation_report"]["mlflow_run"].value.endswith(adapter.mlflow_run_id)
    assert mats["evaluation_report"]["baseline"].value == "from baseline_answers"
    assert mats["baseline_answers"]["answers"].value == {"base": 5, "prompt_only": 4}  # 2 showcase + 3 probes; prompt-only skips the general one

    (run,) = mlflow_runs(resources)
    assert run.info.status == "FINISHED"
    assert run.data.tags["dagster_run_id"] == result.run_id
    params = run.data.params
    assert params["learning_rate"] == "0.01" and params["lora_rank"] == "8" and params["target_modules"] == "all-linear"
    assert params["base_model"] == str(tiny_model.resolve())
    assert params["dataset_version"] == result.output_for_node("curated_dataset").version
    assert set(SUMMARY_METRICS) <= set(run.data.metrics)
    assert {"eval/identity_en_base", "eval/identity_en_prompt_only", "eval/identity_en_adapter",
            "eval/general_adapter"} <= set(run.data.metrics)
    client = mlflow.MlflowClient()
    for name in STEP_METRICS:
        assert len(client.get_metric_history(run.info.run_id, name)) >= 5, name
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"adapter", "evaluation"} <= artifacts
    # The registry's copy carries the manifest, so `persona chat --champion` works without the local folder.
    assert "adapter/persona_adapter.json" in {a.path for a in client.list_artifacts(run.info.run_id, "adapter")}
    assert {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")} >= {
        "evaluation/evaluation.md", "evaluation/evaluation.json"}

    # The CLI evaluates any probe file against any adapter the pipeline produced.
    from orchestration.cli import main

    cases = home / "cases.jsonl"
    cases.write_text(json.dumps({"kind": "general", "question": "What is 2 + 3?", "expect_any": ["5"]}) + "\n"
                     + json.dumps({"kind": "identity_en", "question": "Who made you?", "expect_any": ["{{AUTHOR}}"]}) + "\n")
    assert main(["evaluate", "--adapter", adapter.path, "--cases", str(cases), "--json", "--max-new-tokens", "8"]) == 0
    shape = json.loads(capsys.readouterr().out)
    assert set(shape) == {"base", "prompt_only", "adapter"}
    # prompt-only is asked the identity probes only: general retention compares the base model and the adapter
    kinds = {"base": {"general", "identity_en"}, "prompt_only": {"identity_en"}, "adapter": {"general", "identity_en"}}
    assert all(set(v) == kinds[k] and all(0 <= x <= 1 for x in v.values()) for k, v in shape.items())
    assert main(["ask", "Who are you?", "--max-new-tokens", "4"]) == 0  # the champion, else the newest adapter
    said = capsys.readouterr()
    assert said.out.strip() != "" and ("champion" in said.err or "newest adapter" in said.err)

    # A malformed dataset: located error, training never starts, nothing earlier is touched.
    adapter_before = {p.name: p.read_bytes() for p in Path(adapter.path).iterdir()}
    datasets_before = sorted(p.name for p in (home / "outputs" / "datasets").iterdir())
    data = home / "data" / "self_cognition.json"
    rows = json.loads(data.read_text())
    del rows[3]["output"]
    data.write_text(json.dumps(rows, indent=1))
    bad = materialize(ASSETS, resources=resources, run_config=run_config(tiny_model), raise_on_error=False)
    assert not bad.success
    failure = next(e for e in bad.all_events if e.is_step_failure)
    assert failure.step_key == "curated_dataset"
    description = failure.step_failure_data.user_failure_data.description
    assert f"{data}:{rows_line(data, 3)}: missing 'output'" in description
    assert {p.name: p.read_bytes() for p in Path(adapter.path).iterdir()} == adapter_before
    assert sorted(p.name for p in (home / "outputs" / "datasets").iterdir()) == datasets_before
    assert [r.info.run_id for r in mlflow_runs(resources)] == [run.info.run_id]


def rows_line(path: Path, index: int) -> int:
    """The line on which the index-th record of an indent=1 JSON array starts."""
    starts = [n for n, line in enumerate(path.read_text().splitlines(), 1) if line.startswith(" {")]
    return starts[index]
