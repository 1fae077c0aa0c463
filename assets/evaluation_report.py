"""`evaluation_report`: held-out questions put to the base model and to base + adapter (the tutorials' before/after table).

Identity score: share of identity answers that name the new identity and not the base model's own.
General score: share of checkable questions (arithmetic, facts, code) answered correctly.
"""

import json
import tempfile
from pathlib import Path

from dagster import AssetExecutionContext, MetadataValue, Output, asset

from assets.curated_dataset import CuratedDataset
from assets.lora_adapter import LoraAdapter
from orchestration.config import EvaluationConfig
from orchestration.resources import MlflowTracker
from persona.evaluation import Chat, comparison_table, evaluate, load_probes
from persona.models import BaseModel


@asset(group_name="persona", code_version="1", description=__doc__)
def evaluation_report(
    context: AssetExecutionContext,
    config: EvaluationConfig,
    base_model: BaseModel,
    curated_dataset: CuratedDataset,
    lora_adapter: LoraAdapter,
    mlflow_tracker: MlflowTracker,
) -> Output[dict]:
    import mlflow

    probes = load_probes(curated_dataset.probes_path)
    chat = Chat(base_model.path, lora_adapter.path, base_model.template, lora_adapter.system, lora_adapter.device)
    kw = dict(max_new_tokens=config.max_new_tokens, batch_size=config.batch_size,
              on_batch=lambda done, total: context.log.info(f"answered {done}/{total} probes"))
    context.log.info(f"Asking {len(probes)} probes to the base model, then to base + adapter")
    before = evaluate(chat, probes, base_model.own_identity, use_adapter=False, **kw)
    after = evaluate(chat, probes, base_model.own_identity, use_adapter=True, **kw)
    table = comparison_table(before, after)
    scores = {
        "eval/identity_score_before": before.identity,
        "eval/identity_score_after": after.identity,
        "eval/general_score_before": before.general,
        "eval/general_score_after": after.general,
    }
    report = {
        "scores": scores,
        "by_kind": {"before": before.by_kind, "after": after.by_kind},
        "answers": [{"kind": b.probe.kind, "question": b.probe.question, "before": b.text, "after": a.text,
                     "passed_before": b.passed, "passed_after": a.passed}
                    for b, a in zip(before.answers, after.answers)],
        "table_markdown": table,
        "adapter": lora_adapter.path,
        "mlflow_run_id": lora_adapter.mlflow_run_id,
    }
    with mlflow_tracker.run(run_id=lora_adapter.mlflow_run_id):
        mlflow.log_metrics(scores)
        with tempfile.TemporaryDirectory() as tmp:
            Path(tmp, "evaluation.md").write_text(table + "\n", encoding="utf-8")
            Path(tmp, "evaluation.json").write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
            mlflow.log_artifacts(tmp, artifact_path="evaluation")

    return Output(
        report,
        metadata={
            **{k.split("/")[1]: round(v, 3) for k, v in scores.items()},
            "probes": len(probes),
            "before_after": MetadataValue.md(table),
            "mlflow_run": MetadataValue.url(mlflow_tracker.run_url(lora_adapter.mlflow_run_id)),
        },
    )
