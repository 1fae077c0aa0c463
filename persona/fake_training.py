"""A stand-in for `persona.training.train_lora` for tests of everything around training (sensor, gate, MLflow,
reliability): seconds instead of a ms-swift child, and no learning.

It writes what a real training writes into the adapter folder: a valid PEFT LoRA adapter for the base model, with
the recipe's rank and target modules and its B matrices at zero as PEFT initialises them (so it answers as the base
model does), and persona_recipe.json. Its loss history is synthetic and says so: one falling entry per optimizer
step, as many steps as the recipe would take over the dataset.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable

from persona.models import BaseModel
from persona.recipe import Recipe, resolve_dtype
from persona.storage import staged_dir
from persona.training import TrainResult


def fake_train_lora(base: BaseModel, dataset_path: str | Path, recipe: Recipe, adapter_dir: str | Path,
                    device: str = "cpu", on_progress: Callable[[dict], None] | None = None) -> TrainResult:
    import time

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    started = time.time()
    rows = sum(1 for line in Path(dataset_path).read_text(encoding="utf-8").splitlines() if line.strip())
    per_step = recipe.per_device_train_batch_size * recipe.gradient_accumulation_steps
    steps = math.ceil(rows / per_step) * recipe.num_train_epochs
    history = [{"loss": round(2.0 * 0.9 ** i, 4), "learning_rate": recipe.learning_rate, "grad_norm": 1.0,
                "step": i + 1, "global_step/max_steps": f"{i + 1}/{steps}"} for i in range(steps)]
    history.append({"train_runtime": 0.0, "train_loss": history[-1]["loss"] if history else float("nan"),
                    "step": steps})
    targets = "all-linear" if "all-linear" in recipe.target_modules else list(recipe.target_modules)
    with staged_dir(Path(adapter_dir)) as staged:
        model = AutoModelForCausalLM.from_pretrained(base.path, dtype=torch.float32)
        get_peft_model(model, LoraConfig(r=recipe.lora_rank, lora_alpha=recipe.lora_alpha,
                                         target_modules=targets)).save_pretrained(staged)
        (staged / "persona_recipe.json").write_text(json.dumps(
            {**resolve_dtype(recipe, device).as_params(), "world_size": 1, "fake": True}, indent=2))
    for h in history[:-1]:
        if on_progress:
            on_progress(h)
    return TrainResult(adapter_dir=str(adapter_dir), global_step=steps, final_loss=history[-2]["loss"] if steps else
                       float("nan"), train_seconds=0.0, peak_memory_gib=0.0, num_tokens=0, tokens_per_second=0.0,
                       log_history=history, wall_seconds=time.time() - started)
