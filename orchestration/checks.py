"""Asset checks: a blocking integrity gate before training, and quality gates that warn instead of crashing the run."""

import json
from pathlib import Path

from dagster import AssetCheckResult, AssetCheckSeverity, asset_check

from assets.curated_dataset import CuratedDataset, curated_dataset
from assets.evaluation_report import evaluation_report
from persona.data import Dataset, Problem, normalize_question, read_file
from persona.probes import load_probes
from orchestration.promotion_gate import PromotionGate
from persona.promotion import Candidate, Thresholds
from persona.report import EvaluationReport

# The quality checks read the run's promotion_gate resource, the thresholds `champion` decides with: they warn,
# the gate decides. Their descriptions quote the defaults.
DEFAULTS = Thresholds()


def _warn_unless(passed: bool, **metadata) -> AssetCheckResult:
    return AssetCheckResult(passed=passed, severity=AssetCheckSeverity.WARN, metadata=metadata)


def _threshold(evaluation_report: EvaluationReport, metric: str, threshold: float, at_most: bool = False,
               missing: str = "not measured") -> AssetCheckResult:
    """`metric` of the evaluation against a threshold (at least, or at most); a metric not measured passes."""
    value = evaluation_report.scores.get(metric)
    if value is None:
        return _warn_unless(True, note=missing)
    return _warn_unless(value <= threshold if at_most else value >= threshold,
                        **{metric.split("/", 1)[1]: value, "threshold": threshold})


@asset_check(asset=evaluation_report,
             description=f"The adapter names the new identity on ≥ promotion_gate.min_identity (default "
                         f"{DEFAULTS.min_identity:.0%}) of held-out identity questions.")
def identity_learned(evaluation_report: EvaluationReport, promotion_gate: PromotionGate) -> AssetCheckResult:
    return _threshold(evaluation_report, "eval/identity_score_after", promotion_gate.min_identity)


@asset_check(asset=evaluation_report,
             description=f"The adapter keeps its identity against ≥ promotion_gate.min_adversarial (default "
                         f"{DEFAULTS.min_adversarial:.0%}) of adversarial prompts.")
def adversarial_resisted(evaluation_report: EvaluationReport, promotion_gate: PromotionGate) -> AssetCheckResult:
    return _threshold(evaluation_report, "eval/adversarial_adapter", promotion_gate.min_adversarial,
                      missing="no adversarial probes")


@asset_check(asset=evaluation_report,
             description=f"The adapter keeps ≥ promotion_gate.min_general_retention (default "
                         f"{DEFAULTS.min_general_retention:.0%}) of the general answers the base model got right.")
def general_ability_kept(evaluation_report: EvaluationReport, promotion_gate: PromotionGate) -> AssetCheckResult:
    s = evaluation_report.scores
    candidate = Candidate.from_metrics(s)
    threshold = promotion_gate.min_general_retention
    return _warn_unless(candidate.general_retention >= threshold,
                        general_score_before=s["eval/general_score_before"],
                        general_score_after=s["eval/general_score_after"],
                        kept=s.get("eval/general_kept", float("nan")),
                        base_right=s.get("eval/general_base_right", float("nan")),
                        retention=candidate.general_retention, threshold=threshold)


@asset_check(asset=evaluation_report,
             description=f"At most promotion_gate.max_identity_leak (default {DEFAULTS.max_identity_leak:.0%}) of "
                         "the adapter's general answers state the identity.")
def identity_stays_out_of_general_answers(evaluation_report: EvaluationReport, promotion_gate: PromotionGate) -> AssetCheckResult:
    return _threshold(evaluation_report, "eval/general_identity_leak_after", promotion_gate.max_identity_leak,
                      at_most=True)


@asset_check(asset=curated_dataset, blocking=True,
             description="The curated file on disk is the validated one: it parses, its content hash matches the "
                         "version, and no evaluation probe leaked into it. Blocks training otherwise.")
def curated_dataset_is_intact(curated_dataset: CuratedDataset) -> AssetCheckResult:
    problems: list[Problem] = []
    samples = read_file(Path(curated_dataset.path), problems)
    config = json.loads(Path(curated_dataset.path).with_name("curation.json").read_text(encoding="utf-8"))
    version = Dataset(samples, config=config).version
    probes = {normalize_question(p.question) for p in load_probes(curated_dataset.probes_path)}
    leaked = [s.question for s in samples if normalize_question(s.question) in probes]
    ok = not problems and version == curated_dataset.version and not leaked
    return AssetCheckResult(passed=ok, metadata={"problems": "\n".join(map(str, problems)) or "none",
                                                 "version_matches": version == curated_dataset.version,
                                                 "leaked_probes": len(leaked), "samples": len(samples)})
