"""`evaluation_report`: held-out probes put to three contenders — the base model, the base model with the identity in
its system prompt only, and base + adapter (the tutorials' before/after and prompt-only-vs-LoRA tables).

Scores per probe kind: identity (zh/en), adversarial, multi-turn, stability (sampled answers that stay
consistent) and general (checkable questions: arithmetic, facts, code).

The base and prompt-only answers depend only on the base weights, the probes and the decoding settings: a run that
changed only the training data reuses them from outputs/answer_cache and decodes the adapter's rows alone. On a GPU
that has room, `lora_adapter` loads the base model and decodes them while the adapter trains (`while_training`);
this step then puts the adapter on the loaded model.
"""
import json
import tempfile
from pathlib import Path

from dagster import AssetExecutionContext, MetadataValue, Output, asset

from assets.curated_dataset import CuratedDataset
from assets.lora_adapter import LoraAdapter
from orchestration.config import EvaluationConfig
from orchestration.resources import MlflowTracker, Workspace
from persona.data import Identity
from persona.evaluation import (EarlyEvaluation, as_json, comparison_table, metrics, retention_report,
                                scores_table)
from persona.models import BaseModel


@asset(group_name="persona", code_version="2", description=__doc__)
def evaluation_report(
    context: AssetExecutionContext,
    config: EvaluationConfig,
    base_model: BaseModel,
    curated_dataset: CuratedDataset,
    lora_adapter: LoraAdapter,
    mlflow_tracker: MlflowTracker,
    workspace: Workspace,
) -> Output[dict]:
    import mlflow

    identity = Identity(**lora_adapter.identity)
    setup = config.setup(base_model, curated_dataset.probes_path, identity, lora_adapter.system, lora_adapter.device,
                         workspace.output("answer_cache"))
    probes = setup.probes()
    early = EarlyEvaluation.take(setup)
    chat = early.chat() if early else None
    if early:
        context.log.info(f"Started while the adapter trained: {early.outcome} ({early.seconds:.1f} s).")
    if chat is None:
        chat = setup.load(lora_adapter.path)
    else:
        chat.attach_adapter(lora_adapter.path)
    context.log.info(f"Asking {len(probes)} probes to the base model, to the prompt-only variant and to base + adapter")
    results = setup.compare(chat, log=context.log.info,
                            on_batch=lambda done, total: context.log.info(f"answered {done}/{total}"))
    scores = metrics(results, identity.markers())
    kinds_table, answers_table, kept = scores_table(results), comparison_table(results), retention_report(results)
    context.log.info(kept.splitlines()[0] if kept else "no general retention (no adapter answers)")
    report = {"scores": scores, "by_kind": as_json(results), "table_markdown": answers_table,
              "kinds_markdown": kinds_table, "retention_markdown": kept, "adapter": lora_adapter.path,
              "mlflow_run_id": lora_adapter.mlflow_run_id,
              "answers": {name: [{"kind": a.probe.kind, "question": a.probe.question, "answer": a.text,
                                  "passed": a.passed, "truncated": a.truncated} for a in s.answers] for name, s in results.items()}}
    with mlflow_tracker.run(run_id=lora_adapter.mlflow_run_id):
        mlflow.log_metrics(scores)
        with tempfile.TemporaryDirectory() as tmp:
            Path(tmp, "evaluation.md").write_text(kinds_table + "\n\n" + kept + "\n\n" + answers_table + "\n",
                                                  encoding="utf-8")
            Path(tmp, "evaluation.json").write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
            mlflow.log_artifacts(tmp, artifact_path="evaluation")

    contract = {k.split("/")[1]: round(v, 3) for k, v in scores.items()
                if "_score_" in k or k.startswith(("eval/general_identity_leak_", "eval/general_retention",
                                                   "eval/truncated_"))}
    return Output(
        report,
        metadata={
            **contract,
            "probes": len(probes),
            "while_training": f"{early.outcome} ({early.seconds:.1f} s)" if early else "nothing",
            "scores_by_kind": MetadataValue.md(kinds_table),
            "retention_report": MetadataValue.md(kept or "not measured"),
            "before_after": MetadataValue.md(answers_table),
            "mlflow_run": MetadataValue.url(mlflow_tracker.run_url(lora_adapter.mlflow_run_id)),
        },
    )
