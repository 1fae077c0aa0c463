"""What a trained adapter depends on, as run tags: the dataset's content hash (the sensor's key) and a digest per
upstream thing (data, base model, training recipe, code; the schedule's key), so that a later tick can tell whether
anything changed since the last adapter was trained.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from orchestration.config import BaseModelConfig, CurationConfig, TrainingConfig
from orchestration.run_config import op_config

TRIGGER_TAG = "persona/trigger"      # sensor, schedule or cli
DATA_HASH_TAG = "persona/data_hash"  # content hash of the dataset sources and the curation config
UPSTREAM_TAG = "persona/upstream"    # JSON: a digest per thing the adapter depends on


def dataset_sources(run_config: dict) -> list[str]:
    """The files in the data folder that curation reads with this run config."""
    cfg = CurationConfig(**op_config(run_config, "curated_dataset"))
    return [*cfg.sources, cfg.probes] + ([cfg.replay_prompts] if cfg.general_mix == "replay" else [])


def dataset_hash(run_config: dict, data_dir: str | Path) -> str:
    """Content hash of the dataset sources and the curation config; a missing file hashes as missing."""
    h = hashlib.sha256(_canonical(CurationConfig(**op_config(run_config, "curated_dataset")).model_dump()).encode())
    for name in dataset_sources(run_config):
        path = Path(data_dir, name)
        h.update(f"\0{name}\0".encode())
        h.update(path.read_bytes() if path.is_file() else b"\0missing")
    return h.hexdigest()


def upstream(run_config: dict, data_dir: str | Path) -> dict[str, str]:
    """A digest per thing `lora_adapter` depends on: the data, the base model, the training recipe, the code."""
    from assets.base_model import base_model
    from assets.curated_dataset import curated_dataset
    from assets.lora_adapter import lora_adapter
    from persona.recipe import default_recipe

    code = {key.to_user_string(): version for asset in (base_model, curated_dataset, lora_adapter)
            for key, version in asset.code_versions_by_key.items()}
    # The default recipes' values count, not only the config's overrides: editing persona/recipe.py changes them.
    training = {"config": TrainingConfig(**op_config(run_config, "lora_adapter")).model_dump(),
                "defaults": {device: default_recipe(device).as_params() for device in ("cpu", "cuda")},
                "small_cpu": default_recipe("cpu", parameters=0).as_params()}
    return {
        "data": dataset_hash(run_config, data_dir)[:16],
        "base_model": _digest(BaseModelConfig(**op_config(run_config, "base_model")).model_dump()),
        "training": _digest(training),
        "code": _digest(code),
    }


def run_tags(run_config: dict, data_dir: str | Path, trigger: str) -> dict[str, str]:
    return {TRIGGER_TAG: trigger, DATA_HASH_TAG: dataset_hash(run_config, data_dir),
            UPSTREAM_TAG: _canonical(upstream(run_config, data_dir))}


def last_adapter_run(instance):
    """The run of the latest `lora_adapter` materialization, or None if there is none."""
    from dagster import AssetKey

    event = instance.get_latest_materialization_event(AssetKey("lora_adapter"))
    return instance.get_run_by_id(event.run_id) if event else None


def _canonical(value) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def _digest(value) -> str:
    return hashlib.sha256(_canonical(value).encode()).hexdigest()[:16]
