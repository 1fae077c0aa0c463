"""LoRA hyperparameters: the seed tutorial's values on a GPU, a recipe that really teaches a 135M model on a CPU."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace


@dataclass(frozen=True)
class Recipe:
    learning_rate: float
    num_train_epochs: int
    per_device_train_batch_size: int
    gradient_accumulation_steps: int
    gradient_checkpointing: bool
    torch_dtype: str
    lora_rank: int = 8
    lora_alpha: int = 32
    target_modules: tuple[str, ...] = ("all-linear",)
    max_length: int = 2048
    system: str = "You are a helpful assistant."
    warmup_ratio: float = 0.05
    logging_steps: int = 5
    seed: int = 42

    def as_params(self) -> dict:
        d = asdict(self)
        d["target_modules"] = ",".join(self.target_modules)
        return d

    def with_overrides(self, **overrides) -> "Recipe":
        known = {f.name for f in fields(self)}
        unknown = set(overrides) - known
        if unknown:
            raise ValueError(f"unknown recipe field(s): {', '.join(sorted(unknown))}")
        clean = {k: v for k, v in overrides.items() if v is not None}
        if "target_modules" in clean:
            clean["target_modules"] = tuple(clean["target_modules"])
        return replace(self, **clean)


# `swift sft` in the seed tutorial: bf16, batch 1 x grad-accum 16, lr 1e-4, 10 epochs.
SEED_GPU = Recipe(
    learning_rate=1e-4,
    num_train_epochs=10,
    per_device_train_batch_size=1,
    gradient_accumulation_steps=16,
    gradient_checkpointing=True,
    torch_dtype="bfloat16",
)

# Measured on 2 CPU cores with SmolLM2-135M: lr 1e-4 does not move a 135M model within minutes;
# lr 2e-3 with 2 samples per step teaches the identity, unseen paraphrases included. Two samples in one
# micro-batch instead of two accumulated ones: same optimization, fewer, fuller matrix multiplies.
CPU_DEFAULT = Recipe(
    learning_rate=2e-3,
    num_train_epochs=3,
    per_device_train_batch_size=2,
    gradient_accumulation_steps=1,
    gradient_checkpointing=False,
    torch_dtype="float32",
    max_length=512,
)


def default_recipe(device: str) -> Recipe:
    return CPU_DEFAULT if device == "cpu" else SEED_GPU


def detect_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
