"""The one Definitions object: every asset, check, job, sensor, schedule and resource of persona.

The executor is Dagster's in-process one, for every run: `persona run`'s, the sensor's and the schedule's. A run's
steps then share one process that imports torch and transformers once (a multiprocess executor pays that import
in every step, 5-20 s each), the training itself already runs in a child process of its own (ms-swift, or torchrun
on several GPUs), and no two steps hold a model on the GPU at once. So every run takes the path that was timed.
"""
from __future__ import annotations

from dagster import AssetSelection, Definitions, define_asset_job, in_process_executor

from assets.base_model import base_model
from assets.baseline_answers import baseline_answers
from assets.champion import champion
from assets.curated_dataset import curated_dataset
from assets.evaluation_report import evaluation_report
from assets.lora_adapter import lora_adapter
from orchestration.checks import (adversarial_resisted, curated_dataset_is_intact, general_ability_kept,
                                  identity_learned, identity_stays_out_of_general_answers)
from orchestration.promotion_gate import PromotionGate
from orchestration.resources import MlflowTracker, ModelHub, Trainer, Workspace
from orchestration.schedules import retrain_schedule
from orchestration.sensors import dataset_sensor

train_persona = define_asset_job(
    "train_persona",
    selection=AssetSelection.assets(base_model, curated_dataset, baseline_answers, lora_adapter, evaluation_report,
                                   champion),
    description="Base model → curated dataset → baseline answers and LoRA adapter → evaluation → champion "
                "(promotion gate).",
)

defs = Definitions(
    assets=[base_model, curated_dataset, baseline_answers, lora_adapter, evaluation_report, champion],
    asset_checks=[curated_dataset_is_intact, identity_learned, adversarial_resisted, general_ability_kept,
                  identity_stays_out_of_general_answers],
    jobs=[train_persona],
    sensors=[dataset_sensor],
    schedules=[retrain_schedule],
    resources={"workspace": Workspace(), "model_hub": ModelHub(), "mlflow_tracker": MlflowTracker(),
               "trainer": Trainer(), "promotion_gate": PromotionGate()},
    executor=in_process_executor,
)
