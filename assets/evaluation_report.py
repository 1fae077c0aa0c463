"""`evaluation_report`: held-out probes put to three contenders — the base model, the base model with the identity in
its system prompt only, and base + adapter (the tutorials' before/after and prompt-only-vs-LoRA tables).

Scores per probe kind: identity (zh/en), adversarial, multi-turn, stability (sampled answers that stay
consistent) and general (checkable questions: arithmetic, facts, code).

The base and prompt-only answers come from `baseline_answers`, decoded with the same settings; this step decodes the
adapter's rows (and the baseline's too, should the adapter have been trained with another system prompt or on
another device than the baseline was decoded with).
"""
import json
import tempfile
from dataclasses import replace
from pathlib import Path

from dagster import AssetExecutionContext, MetadataValue, Output, asset

from assets.baseline_answers import BaselineAnswers
from assets.lora_adapter import LoraAdapter
from orchestration.resources import MlflowTracker
from persona.data import Identity
from persona.report import EvaluationReport, comparison_table, retention_report, scores_table
from persona.scoring import as_json, metrics


@asset(group_name="persona", code_version="2", description=__doc__)
def evaluation_report(
    context: AssetExecutionContext,
    baseline_answers: BaselineAnswers,
    lora_adapter: LoraAdapter,
    mlflow_tracker: MlflowTracker,
) -> Output[EvaluationReport]:
    import mlflow

    identity = Identity(**lora_adapter.identity)
    setup = replace(baseline_answers.setup, identity=identity, system=lora_adapter.system, device=lora_adapter.device)
    baseline = baseline_answers.answers
    if setup != baseline_answers.setup:
        baseline = None
        context.log.warning(f"The adapter was trained with system prompt {lora_adapter.system!r} on "
                            f"{lora_adapter.device}; the baseline answers were decoded with "
                            f"{baseline_answers.setup.system!r} on {baseline_answers.setup.device}: decoding them "
                            "again with the adapter's.")
    probes = setup.probes()
    chat = setup.load(lora_adapter.path)
    context.log.info(f"Asking {len(probes)} probes to base + adapter"
                     + ("" if baseline else ", to the base model and to the prompt-only variant"))
    results = setup.compare(chat, baseline, on_batch=lambda done, total: context.log.info(f"answered {done}/{total}"))
    scores = metrics(results, identity.markers())
    kinds_table, answers_table, kept = scores_table(results), comparison_table(results), retention_report(results)
    context.log.info(kept.splitlines()[0] if kept else "no general retention (no adapter answers)")
    report = EvaluationReport(
        scores=scores, adapter=lora_adapter.path, mlflow_run_id=lora_adapter.mlflow_run_id,
        kinds_markdown=kinds_table, table_markdown=answers_table, retention_markdown=kept, by_kind=as_json(results),
        answers={name: [{"kind": a.probe.kind, "question": a.probe.question, "answer": a.text, "passed": a.passed,
                         "truncated": a.truncated} for a in s.answers] for name, s in results.items()})
    with mlflow_tracker.run(run_id=lora_adapter.mlflow_run_id):
        mlflow.log_metrics(scores)
        with tempfile.TemporaryDirectory() as tmp:
            Path(tmp, "evaluation.md").write_text(kinds_table + "\n\n" + kept + "\n\n" + answers_table + "\n",
                                                  encoding="utf-8")
            Path(tmp, "evaluation.json").write_text(json.dumps(report.as_json(), indent=2, ensure_ascii=False), encoding="utf-8")
            mlflow.log_artifacts(tmp, artifact_path="evaluation")

    contract = {k.split("/")[1]: round(v, 3) for k, v in scores.items()
                if "_score_" in k or k.startswith(("eval/general_identity_leak_", "eval/general_retention",
                                                   "eval/truncated_"))}
    return Output(
        report,
        metadata={
            **contract,
            "probes": len(probes),
            "baseline": "decoded again" if baseline is None else "from baseline_answers",
            "scores_by_kind": MetadataValue.md(kinds_table),
            "retention_report": MetadataValue.md(kept or "not measured"),
            "before_after": MetadataValue.md(answers_table),
            "mlflow_run": MetadataValue.url(mlflow_tracker.run_url(lora_adapter.mlflow_run_id)),
        },
    )
