"""The project's run config (`persona.yaml`) and what a trained adapter depends on.

The dataset sensor, the retrain schedule and `persona run` launch `train_persona` with the same run config and tag
each run with what it was made from, so a later tick can tell whether anything changed since.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import yaml

from orchestration.config import BaseModelConfig, CurationConfig, TrainingConfig
from orchestration.resources import PROJECT_ROOT

PROJECT_FILE = "persona.yaml"
INSTANCE_FILE = "dagster.yaml"  # the shipped instance config: one training run at a time

TRIGGER_TAG = "persona/trigger"      # sensor, schedule or cli
DATA_HASH_TAG = "persona/data_hash"  # content hash of the dataset sources and the curation config
UPSTREAM_TAG = "persona/upstream"    # JSON: a digest per thing the adapter depends on


def switched_off(env: str) -> bool:
    return os.environ.get(env, "").strip().lower() in ("0", "off", "false", "no")


def switched_on(env: str) -> bool:
    return os.environ.get(env, "").strip().lower() in ("1", "on", "true", "yes")


def project_file() -> Path:
    return Path(os.environ.get("PERSONA_HOME", PROJECT_ROOT), PROJECT_FILE)


def load_run_config(overrides: dict | None = None) -> dict:
    """persona.yaml's Dagster run config ({} when there is no file), with `overrides` merged on top."""
    path = project_file()
    base = yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else None
    if base is None:
        base = {}
    if not isinstance(base, dict):
        raise ValueError(f"{path}: expected Dagster run config such as 'ops: {{curated_dataset: {{config: ...}}}}', "
                         f"found a {type(base).__name__}")
    return _merge(base, overrides or {})


def _merge(base: dict, top: dict) -> dict:
    merged = dict(base)
    for key, value in top.items():
        merged[key] = _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) \
            else value
    return merged


def op_config(run_config: dict, op: str) -> dict:
    return ((run_config.get("ops") or {}).get(op) or {}).get("config") or {}


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


def link_instance_config(dagster_home: str | Path) -> None:
    """Make $DAGSTER_HOME use the shipped dagster.yaml, unless it already has an instance config of its own."""
    target = Path(dagster_home, INSTANCE_FILE)
    if not target.exists() and not target.is_symlink():
        Path(dagster_home).mkdir(parents=True, exist_ok=True)
        target.symlink_to(PROJECT_ROOT / INSTANCE_FILE)


def _canonical(value) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def _digest(value) -> str:
    return hashlib.sha256(_canonical(value).encode()).hexdigest()[:16]
