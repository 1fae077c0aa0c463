"""Asset checks: quality gates that report a severity in the UI instead of crashing the run."""

from dagster import AssetCheckResult, AssetCheckSeverity, asset_check

from assets.evaluation_report import evaluation_report

IDENTITY_TARGET = 0.8


@asset_check(asset=evaluation_report, description=f"The adapter names the new identity on ≥ {IDENTITY_TARGET:.0%} of held-out identity questions.")
def identity_learned(evaluation_report: dict) -> AssetCheckResult:
    after = evaluation_report["scores"]["eval/identity_score_after"]
    return AssetCheckResult(passed=after >= IDENTITY_TARGET, severity=AssetCheckSeverity.WARN,
                            metadata={"identity_score_after": after, "target": IDENTITY_TARGET})


@asset_check(asset=evaluation_report, description="The adapter answers the checkable general questions no worse than the base model.")
def general_ability_kept(evaluation_report: dict) -> AssetCheckResult:
    s = evaluation_report["scores"]
    before, after = s["eval/general_score_before"], s["eval/general_score_after"]
    return AssetCheckResult(passed=after >= before, severity=AssetCheckSeverity.WARN,
                            metadata={"general_score_before": before, "general_score_after": after})
