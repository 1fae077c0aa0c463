"""The graph's assets and a run config for the tiny test model, shared by the end-to-end tests."""
import hashlib
from pathlib import Path

import mlflow

from assets.base_model import base_model
from assets.baseline_answers import baseline_answers
from assets.champion import champion
from assets.curated_dataset import curated_dataset
from assets.evaluation_report import evaluation_report
from assets.lora_adapter import lora_adapter
from orchestration.checks import (adversarial_resisted, curated_dataset_is_intact, general_ability_kept,
                                  identity_learned)

ASSETS = [base_model, curated_dataset, baseline_answers, lora_adapter, evaluation_report, champion, curated_dataset_is_intact,
          identity_learned, adversarial_resisted, general_ability_kept]
STEP_METRICS = ["train/loss", "train/learning_rate", "train/grad_norm"]
SUMMARY_METRICS = ["train/seconds", "train/peak_memory_gib", "train/tokens_per_second",
                   "eval/identity_score_before", "eval/identity_score_after",
                   "eval/general_score_before", "eval/general_score_after"]


def run_config(model_dir: Path) -> dict:
    return {"ops": {
        "base_model": {"config": {"model": str(model_dir)}},
        "lora_adapter": {"config": {"device": "cpu", "learning_rate": 1e-2, "num_train_epochs": 3,
                                    "logging_steps": 1}},
        "baseline_answers": {"config": {"max_new_tokens": 12}},
    }}


def snapshot(home: Path, tracker) -> dict:
    """Everything a bad input or a fault must leave as it was."""
    files = {}
    for sub in ("adapters", "datasets"):
        for f in sorted((home / "outputs" / sub).rglob("*")):
            if f.is_file():
                files[str(f.relative_to(home))] = hashlib.sha256(f.read_bytes()).hexdigest()
    tracker.client()
    runs = {r.info.run_id: r.info.status for r in mlflow.search_runs(experiment_names=["persona"], output_format="list")}
    champ = tracker.champion()
    return {"files": files, "runs": runs, "champion": champ[0].version if champ else None,
            "partials": sorted(str(p) for p in (home / "outputs").rglob("*.partial-*"))}
