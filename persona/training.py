"""LoRA SFT through ms-swift's Python API, run in a child process.

A child process keeps an OOM, a CUDA error or a kill from taking the orchestrator down. It trains
into a scratch folder; the adapter is moved to its final place only when training succeeded.
"""
from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from persona.models import BaseModel
from persona.recipe import Recipe
from persona.storage import staged_dir

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "args.json", "additional_config.json")
RESULT_FILE = "persona_train_result.json"


class TrainingError(RuntimeError):
    """ms-swift failed; the message carries the child's last output lines."""


@dataclass
class TrainResult:
    adapter_dir: str
    global_step: int
    final_loss: float
    train_seconds: float
    peak_memory_gib: float
    num_tokens: int
    tokens_per_second: float
    log_history: list[dict]

    def summary(self) -> dict:
        d = asdict(self)
        d.pop("log_history")
        return d


def swift_arguments(base: BaseModel, dataset_path: str, recipe: Recipe, device: str, output_dir: str) -> dict:
    """Keyword arguments for `swift.SftArguments`: the seed's `swift sft` flags, as Python."""
    kw = dict(
        model=base.path,
        tuner_type="lora",
        dataset=[dataset_path],
        torch_dtype=recipe.torch_dtype,
        num_train_epochs=recipe.num_train_epochs,
        per_device_train_batch_size=recipe.per_device_train_batch_size,
        gradient_accumulation_steps=recipe.gradient_accumulation_steps,
        gradient_checkpointing=recipe.gradient_checkpointing,
        learning_rate=recipe.learning_rate,
        lora_rank=recipe.lora_rank,
        lora_alpha=recipe.lora_alpha,
        target_modules=list(recipe.target_modules),
        max_length=recipe.max_length,
        system=recipe.system,
        warmup_ratio=recipe.warmup_ratio,
        logging_steps=recipe.logging_steps,
        seed=recipe.seed,
        output_dir=output_dir,
        add_version=False,
        create_checkpoint_symlink=False,
        split_dataset_ratio=0,          # evaluation is its own stage; no mid-run eval
        save_steps=10**9,               # ms-swift always saves the last step; no mid-run checkpoints
        save_only_model=True,
        report_to=["none"],             # persona logs to MLflow itself, under its own metric names
        check_model=False,              # no hub lookups: works offline
        dataloader_num_workers=0,
        include_num_input_tokens_seen=True,
    )
    if base.model_type:
        kw["model_type"] = base.model_type
    if base.template:
        kw["template"] = base.template
    if device == "cpu":
        kw["use_cpu"] = True
    return kw


def parse_progress(line: str) -> dict | None:
    """ms-swift prints one dict per logging step, e.g. {'loss': '3.01', 'global_step/max_steps': '5/192', ...}."""
    line = line.strip()
    if not (line.startswith("{") and "global_step/max_steps" in line):
        return None
    try:
        d = ast.literal_eval(line)
    except (ValueError, SyntaxError):
        return None
    return d if isinstance(d, dict) else None


def train_lora(
    base: BaseModel,
    dataset_path: str | Path,
    recipe: Recipe,
    adapter_dir: str | Path,
    device: str = "cpu",
    on_progress: Callable[[dict], None] | None = None,
    on_output: Callable[[str], None] | None = None,
) -> TrainResult:
    """Train a LoRA adapter; `adapter_dir` appears only if training succeeds."""
    adapter_dir = Path(adapter_dir)
    with staged_dir(adapter_dir) as staged, tempfile.TemporaryDirectory(prefix="persona-train-") as work:
        job = {"swift_args": swift_arguments(base, str(dataset_path), recipe, device, work), "device": device}
        job_file = Path(work, "job.json")
        job_file.write_text(json.dumps(job))
        tail: list[str] = []
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        proc = subprocess.Popen(
            [sys.executable, "-m", "persona.train_worker", str(job_file)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, bufsize=1,
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            tail = (tail + [line.rstrip()])[-40:]
            if on_output:
                on_output(line.rstrip())
            progress = parse_progress(line)
            if progress and on_progress:
                on_progress(progress)
        code = proc.wait()
        result_file = Path(work, RESULT_FILE)
        if code != 0 or not result_file.exists():
            how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
            raise TrainingError(f"ms-swift training failed ({how}). Last output:\n" + "\n".join(tail[-15:]))
        raw = json.loads(result_file.read_text())
        checkpoint = Path(raw["last_model_checkpoint"])
        for f in checkpoint.iterdir():
            if f.is_file():
                shutil.copy2(f, staged / f.name)
        (staged / "persona_recipe.json").write_text(json.dumps(recipe.as_params(), indent=2, ensure_ascii=False))
    return _result(raw, adapter_dir)


def _result(raw: dict, adapter_dir: Path) -> TrainResult:
    history = raw["log_history"]
    losses = [h["loss"] for h in history if "loss" in h]
    summary = next((h for h in reversed(history) if "train_runtime" in h), {})
    seconds = float(summary.get("train_runtime") or raw["wall_seconds"])
    tokens = int(max((h.get("num_input_tokens_seen", 0) for h in history), default=0))
    return TrainResult(
        adapter_dir=str(adapter_dir),
        global_step=int(raw["global_step"]),
        final_loss=float(losses[-1]) if losses else float("nan"),
        train_seconds=seconds,
        peak_memory_gib=float(raw["peak_memory_gib"]),
        num_tokens=tokens,
        tokens_per_second=tokens / seconds if seconds else 0.0,
        log_history=history,
    )
