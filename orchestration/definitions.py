"""The one Definitions object: every asset, check, job, sensor, schedule and resource of persona."""
from __future__ import annotations

from dagster import AssetSelection, Definitions, define_asset_job

from assets.base_model import base_model
from assets.champion import champion
from assets.curated_dataset import curated_dataset
from assets.evaluation_report import evaluation_report
from assets.lora_adapter import lora_adapter
from orchestration.checks import (adversarial_resisted, curated_dataset_is_intact, general_ability_kept,
                                  identity_learned, identity_stays_out_of_general_answers)
from orchestration.resources import MlflowTracker, ModelHub, TrainerStandby, Workspace
from orchestration.schedules import retrain_schedule
from orchestration.sensors import dataset_sensor

train_persona = define_asset_job(
    "train_persona",
    selection=AssetSelection.assets(base_model, curated_dataset, lora_adapter, evaluation_report, champion),
    description="Base model → curated dataset → LoRA adapter → evaluation → champion (promotion gate).",
)

defs = Definitions(
    assets=[base_model, curated_dataset, lora_adapter, evaluation_report, champion],
    asset_checks=[curated_dataset_is_intact, identity_learned, adversarial_resisted, general_ability_kept,
                  identity_stays_out_of_general_answers],
    jobs=[train_persona],
    sensors=[dataset_sensor],
    schedules=[retrain_schedule],
    resources={"workspace": Workspace(), "model_hub": ModelHub(), "mlflow_tracker": MlflowTracker(),
               "trainer_standby": TrainerStandby()},
)
