"""`champion`: the promotion decision. The evaluated adapter takes the MLflow Model Registry alias `champion` only
when it passes the gate (thresholds, and better than the current champion); otherwise the champion stays and
the metadata says why.
"""
from dagster import AssetExecutionContext, MetadataValue, Output, asset

from assets.lora_adapter import LoraAdapter
from orchestration.promotion_gate import PromotionGate
from orchestration.resources import MlflowTracker
from persona.promotion import Candidate, PromotionDecision, decide
from persona.report import EvaluationReport


@asset(group_name="persona", code_version="1", description=__doc__)
def champion(context: AssetExecutionContext, evaluation_report: EvaluationReport, lora_adapter: LoraAdapter,
             mlflow_tracker: MlflowTracker, promotion_gate: PromotionGate) -> Output[PromotionDecision]:
    candidate = Candidate.from_metrics(evaluation_report.scores)
    # Compare and set as one step: two runs that finish together never both beat the same champion.
    with mlflow_tracker.promotion_lock(on_wait=context.log.info):
        current = mlflow_tracker.champion()
        holder = Candidate.from_metrics(current[1]) if current else None
        decision = decide(candidate, holder, promotion_gate.thresholds())
        context.log.info(str(decision))
        if decision.promote:
            version = mlflow_tracker.promote(lora_adapter.mlflow_run_id, str(decision))
            run_id = lora_adapter.mlflow_run_id
        else:
            version = current[0].version if current else None
            run_id = current[0].run_id if current else None
    result = PromotionDecision(promoted=decision.promote, reasons=decision.reasons,
                               candidate_run_id=lora_adapter.mlflow_run_id,
                               champion_version=None if version is None else str(version), champion_run_id=run_id)
    return Output(result, metadata={
        "promoted": decision.promote,
        "decision": str(decision),
        "champion_version": str(version),
        "champion_run": MetadataValue.url(mlflow_tracker.run_url(run_id)) if run_id else "none",
    })
