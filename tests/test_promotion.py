"""The promotion gate and the MLflow Model Registry alias `champion`."""
import mlflow

from persona.promotion import Candidate, Thresholds, decide
from persona.report import EvaluationReport


def report_of(scores: dict) -> EvaluationReport:
    """An evaluation's report with these metrics and nothing else (what the checks and the gate read)."""
    return EvaluationReport(scores=scores, adapter="", mlflow_run_id="")


def trained_adapter(tracker, tmp_path, scores: dict):
    """An MLflow run with an (empty) adapter artifact and evaluation scores, as lora_adapter and evaluation log them."""
    from assets.lora_adapter import LoraAdapter

    with tracker.run() as run:
        adapter_dir = tmp_path / run.info.run_id
        adapter_dir.mkdir()
        (adapter_dir / "adapter_config.json").write_text("{}")
        mlflow.log_artifacts(str(adapter_dir), artifact_path="adapter")
        mlflow.log_metrics(scores)
    return LoraAdapter(str(adapter_dir), run.info.run_id, "cpu", "s", "v")


def cand(identity=0.9, general=0.6, general_base=0.6, adversarial=0.8):
    return Candidate(identity, general, general_base, adversarial)


def test_thresholds():
    assert decide(cand(), None).promote
    assert decide(cand(identity=0.5), None).reasons == ("identity 0.50 < 0.80",)
    assert decide(cand(adversarial=0.2), None).reasons == ("adversarial 0.20 < 0.50",)
    assert decide(cand(general=0.3), None).reasons == ("general retention 0.50 < 0.90",)
    assert decide(cand(identity=0.7), None, Thresholds(min_identity=0.6)).promote


def test_an_adapter_that_answers_general_questions_with_its_identity_is_not_promoted():
    leaky = Candidate(identity=1.0, general=0.6, general_base=0.5, adversarial=1.0, identity_leak=12 / 36)
    assert decide(leaky, None).reasons == ("33% of general answers state the identity (at most 10%)",)
    assert decide(Candidate(1.0, 0.6, 0.5, 1.0, identity_leak=1 / 36), None).promote
    assert decide(cand(), None).promote  # an evaluation from before the leak was measured
    m = {"eval/identity_score_after": 1.0, "eval/general_score_after": 0.5, "eval/general_score_before": 0.5,
         "eval/general_identity_leak_after": 0.25}
    assert Candidate.from_metrics(m).identity_leak == 0.25


def test_must_beat_the_champion_without_losing_general_ability():
    champ = cand(identity=0.9, general=0.6)
    assert decide(cand(identity=1.0, general=0.6), champ).promote
    assert decide(cand(identity=0.9, general=0.65, general_base=0.6), champ).promote
    assert not decide(cand(identity=0.9, general=0.6), champ).promote  # a tie does not beat it
    worse = decide(cand(identity=1.0, general=0.55, general_base=0.6), champ)
    assert not worse.promote and "general 0.55 < champion's 0.60" in str(worse)


def test_worse_second_adapter_does_not_take_the_champion_alias(home, resources, tmp_path):
    """Through the real asset and a real (SQLite) Model Registry."""
    from dagster import build_asset_context

    from assets.champion import champion
    from assets.lora_adapter import LoraAdapter
    from orchestration.promotion_gate import PromotionGate

    tracker = resources["mlflow_tracker"]

    def trained(scores: dict) -> tuple[EvaluationReport, LoraAdapter]:
        return report_of(scores), trained_adapter(tracker, tmp_path, scores)

    def promote(report, adapter):
        return champion(build_asset_context(), evaluation_report=report, lora_adapter=adapter,
                        mlflow_tracker=tracker, promotion_gate=PromotionGate()).value

    good = {"eval/identity_score_after": 0.95, "eval/general_score_after": 0.6, "eval/general_score_before": 0.6,
            "eval/adversarial_adapter": 0.8}
    first = promote(*trained(good))
    assert first.promoted and str(first.champion_version) == "1"
    version, _ = tracker.champion()
    assert version.run_id == first.candidate_run_id
    assert version.source.endswith("/adapter")  # adapter-only artifacts

    worse = promote(*trained({**good, "eval/identity_score_after": 0.85}))
    assert not worse.promoted and "does not beat the champion" in " ".join(worse.reasons)
    assert tracker.champion()[0].run_id == first.candidate_run_id

    better = promote(*trained({**good, "eval/identity_score_after": 1.0}))
    assert better.promoted and tracker.champion()[0].run_id == better.candidate_run_id


def test_quality_checks_warn_against_the_gate_thresholds():
    from orchestration.checks import adversarial_resisted, identity_learned, identity_stays_out_of_general_answers
    from orchestration.promotion_gate import PromotionGate

    gate = PromotionGate()
    leaky = identity_stays_out_of_general_answers(report_of({"eval/general_identity_leak_after": 12 / 36}), gate)
    assert not leaky.passed and leaky.metadata["threshold"].value == 0.1
    assert identity_stays_out_of_general_answers(report_of({"eval/general_identity_leak_after": 0.0}), gate).passed
    assert identity_stays_out_of_general_answers(report_of({}), gate).passed  # an evaluation that did not measure it
    assert not adversarial_resisted(report_of({"eval/adversarial_adapter": 0.2}), gate).passed
    assert adversarial_resisted(report_of({}), gate).metadata["note"].value == "no adversarial probes"
    assert identity_learned(report_of({"eval/identity_score_after": 0.8}), gate).passed


def test_the_checks_and_the_gate_read_the_same_configured_thresholds(tiny_model, home, resources):
    """One source of truth: persona.yaml's resources.promotion_gate moves the gate and the checks together."""
    from dagster import materialize

    from pipeline import ASSETS, run_config

    config = run_config(tiny_model)
    config["resources"] = {"promotion_gate": {"config": {"min_identity": 0, "min_adversarial": 0,
                                                         "min_general_retention": 0, "max_identity_leak": 1}}}
    result = materialize(ASSETS, resources=resources, run_config=config)
    checks = {e.event_specific_data.check_name: e.event_specific_data for e in result.all_events
              if e.event_type_value == "ASSET_CHECK_EVALUATION"}
    assert checks["identity_learned"].passed and checks["identity_learned"].metadata["threshold"].value == 0
    assert checks["general_ability_kept"].metadata["threshold"].value == 0
    assert result.output_for_node("champion").promoted  # the untrained adapter passes the opened gate
    strict = materialize(ASSETS, resources=resources, run_config=run_config(tiny_model))
    checks = {e.event_specific_data.check_name: e.event_specific_data for e in strict.all_events
              if e.event_type_value == "ASSET_CHECK_EVALUATION"}
    assert checks["identity_learned"].metadata["threshold"].value == 0.8  # the defaults, for both
    assert not strict.output_for_node("champion").promoted


def test_two_runs_that_finish_together_never_both_become_champion(home, resources, tmp_path, monkeypatch):
    """Compare and set: two equally good adapters decide at the same moment (each decision is held open so that the
    other reads the champion meanwhile); one is promoted, the other then ties with it and is not."""
    import threading
    import time

    from dagster import build_asset_context

    import assets.champion
    from assets.champion import champion
    from orchestration.promotion_gate import PromotionGate

    tracker = resources["mlflow_tracker"]
    good = {"eval/identity_score_after": 0.95, "eval/general_score_after": 0.6, "eval/general_score_before": 0.6,
            "eval/adversarial_adapter": 0.8}
    candidates = [trained_adapter(tracker, tmp_path, good) for _ in range(2)]
    slow_decide = assets.champion.decide

    def decide(*args, **kw):
        time.sleep(1.0)  # the window between reading the champion and moving the alias, made wide
        return slow_decide(*args, **kw)

    monkeypatch.setattr(assets.champion, "decide", decide)
    outcomes = []
    threads = [threading.Thread(target=lambda a=a: outcomes.append(champion(
        build_asset_context(), evaluation_report=report_of(good), lora_adapter=a, mlflow_tracker=tracker,
        promotion_gate=PromotionGate()).value)) for a in candidates]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(o.promoted for o in outcomes) == [False, True]
    (winner,) = [o for o in outcomes if o.promoted]
    assert tracker.champion()[0].run_id == winner.candidate_run_id
    assert len(mlflow.MlflowClient().search_model_versions(f"name='{tracker.registered_model}'")) == 1


def test_persona_yaml_sets_the_gate_under_resources_and_says_so_for_the_old_place():
    from orchestration.run_config import check_run_config

    assert check_run_config({"resources": {"promotion_gate": {"config": {"min_identity": 0.9}}}}) == []
    (old,) = check_run_config({"ops": {"champion": {"config": {"min_identity": 0.9}}}})
    assert old[0] == ("ops", "champion", "config") and "resources.promotion_gate.config" in old[1]
    (typo,) = check_run_config({"resources": {"promotion_gate": {"config": {"min_identiy": 0.9}}}})
    assert "did you mean min_identity?" in typo[1]
    (other,) = check_run_config({"resources": {"trainer": {"config": {}}}})
    assert "allowed: promotion_gate" in other[1]
