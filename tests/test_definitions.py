"""The Definitions load and name the four stages, their lineage, checks and the main job."""
from dagster import AssetKey

from orchestration.definitions import defs


def test_definitions_load_with_lineage():
    graph = defs.resolve_asset_graph()
    keys = {k.path[-1] for k in graph.get_all_asset_keys()}
    assert keys == {"base_model", "curated_dataset", "baseline_answers", "lora_adapter", "evaluation_report", "champion"}
    parents = lambda name: {k.path[-1] for k in graph.get(AssetKey(name)).parent_keys}
    assert parents("curated_dataset") == {"base_model"}
    assert parents("lora_adapter") == {"base_model", "curated_dataset"}
    assert parents("baseline_answers") == {"base_model", "curated_dataset"}
    assert parents("evaluation_report") == {"baseline_answers", "lora_adapter"}
    assert parents("champion") == {"evaluation_report", "lora_adapter"}
    assert {c.name for c in graph.asset_check_keys} >= {"curated_dataset_is_intact", "identity_learned",
                                                        "adversarial_resisted", "general_ability_kept",
                                                        "identity_stays_out_of_general_answers"}
    job = defs.resolve_job_def("train_persona")
    assert job.executor_def.name == "in_process"  # the sensor's and the schedule's runs take persona run's path


def test_shipped_data_is_valid_and_held_out():
    from orchestration.resources import PROJECT_ROOT
    from persona.data import load_dataset
    from persona.probes import load_probes

    probes = load_probes(PROJECT_ROOT / "data" / "probes.jsonl")
    ds = load_dataset([PROJECT_ROOT / "data" / "self_cognition.json"], [p.question for p in probes], min_samples=50)
    langs = {"zh": 0, "en": 0}
    for s in ds.samples:
        langs["zh" if any("\u4e00" <= ch <= "\u9fff" for ch in s.question) else "en"] += 1
    assert min(langs.values()) >= 20
    assert {p.kind for p in probes} >= {"identity_zh", "identity_en", "general", "adversarial", "multi_turn", "stability"}
    assert sum(p.kind == "general" for p in probes) >= 30
