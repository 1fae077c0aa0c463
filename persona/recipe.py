"""LoRA hyperparameters: a fast GPU default, the seed tutorial's values on request, CPU recipes chosen by model size.

Recipe selection: `default_recipe(device, name, parameters)`. `name` is "fast" (the default) or "seed"; when it is not given,
the environment variable PERSONA_RECIPE decides, so a launcher can pick the seed recipe without code changes.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields, replace

RECIPE_ENV = "PERSONA_RECIPE"


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
    # Which answers are targets (ms-swift's loss_scale). 'last_round': only a row's last answer; the turns before it
    # (an Alpaca row's "history", a chat row's earlier messages) are context. ms-swift's own default, 'default',
    # trains every assistant turn, the histories' short answers too.
    loss_scale: str = "last_round"
    # Speed knobs. They change how the same optimization is computed, not what is optimized.
    lora_dropout: float = 0.05               # ms-swift's default, written out so runs record it
    use_liger_kernel: bool = False           # Liger's Triton kernels, those named in liger_kernels
    liger_kernels: tuple[str, ...] = ("fused_linear_cross_entropy",)  # or ("all",): also RoPE, RMSNorm, SwiGLU
    attn_impl: str | None = None             # None: transformers' default (sdpa); 'torch_varlen': persona.packing
    padding_free: bool = False               # a micro-batch as one row of samples, no padding (persona.packing)
    use_logits_to_keep: bool | None = None   # None: ms-swift decides (on for models that support it)
    dataloader_num_workers: int = 0          # data is tokenized up front; workers only add start-up time
    cudnn_attention: bool = True             # False: PyTorch's SDPA skips its cuDNN backend (flash / mem-efficient)
    lora_input_cast: bool = True             # False: under bf16 autocast, no float32 copy of LoRA's input (adapter_casts)
    # True: gradient_checkpointing is on only where it is needed. The training child turns it off when the pre-flight
    # estimate without it fits the GPU's free memory (persona.train_worker.checkpointing_needed); recomputing each
    # layer's forward costs a step ~20 %. Setting gradient_checkpointing explicitly (with_overrides) turns this off.
    checkpointing_if_needed: bool = False
    # Replay rows (the base model's own answers to general prompts): 0 learns them as plain targets; > 0 trains them
    # to keep the base model's next-token distribution instead, KL(base || adapter) x this weight (persona.distill).
    # CPU_DEFAULT uses 2 (it kept 148 of the 0.5B model's 156 right general answers where plain targets kept 140);
    # on SmolLM2-135M it let the identity into a third of the general answers, so the other recipes keep 0.
    replay_kl_weight: float = 0.0

    @property
    def samples_per_step(self) -> int:
        """Samples per optimizer step on one device: the quantity the seed's lr schedule is tuned for."""
        return self.per_device_train_batch_size * self.gradient_accumulation_steps

    def as_params(self) -> dict:
        d = asdict(self)
        d["target_modules"] = ",".join(self.target_modules)
        d["liger_kernels"] = ",".join(self.liger_kernels)
        return d

    @classmethod
    def from_params(cls, params: dict) -> "Recipe":
        """The inverse of as_params (fields it does not know, e.g. a run's world_size, are ignored)."""
        known = {f.name for f in fields(cls)}
        d = {k: v for k, v in params.items() if k in known}
        for key in ("target_modules", "liger_kernels"):
            if isinstance(d.get(key), str):
                d[key] = tuple(x for x in d[key].split(",") if x)
        return cls(**d)

    def with_overrides(self, **overrides) -> "Recipe":
        known = {f.name for f in fields(self)}
        unknown = set(overrides) - known
        if unknown:
            raise ValueError(f"unknown recipe field(s): {', '.join(sorted(unknown))}")
        clean = {k: v for k, v in overrides.items() if v is not None}
        for key in ("target_modules", "liger_kernels"):
            if isinstance(clean.get(key), str):
                clean[key] = tuple(x for x in clean[key].split(",") if x)
            elif key in clean:
                clean[key] = tuple(clean[key])
        if "gradient_checkpointing" in clean and "checkpointing_if_needed" not in clean:
            clean["checkpointing_if_needed"] = False  # the caller chose: on means on, whatever the memory
        if clean.get("replay_kl_weight", 0) > 0 and "padding_free" not in clean:
            clean["padding_free"] = False  # the KL compares each replay row with the base model: a row per sample
        return replace(self, **clean)


# `swift sft` in the seed tutorial: bf16, batch 1 x grad-accum 16, lr 1e-4, 10 epochs, gradient checkpointing
# (ms-swift's default). Kept as the reference the fast recipe is measured against (bench/bench_train.py).
SEED_GPU = Recipe(
    learning_rate=1e-4,
    num_train_epochs=10,
    per_device_train_batch_size=1,
    gradient_accumulation_steps=16,
    gradient_checkpointing=True,
    torch_dtype="bfloat16",
)

# The seed's optimization (16 samples per optimizer step, same lr, epochs, warm-up and schedule, so the same
# steps), computed in one micro-batch of 16 instead of 16 accumulated micro-batches of 1. Gradient checkpointing
# only where the memory needs it (checkpointing_if_needed): a 7B model's short identity rows train without it in
# ~24 GiB (15.3 GiB with it) and each step skips recomputing the forward: 11.9-15.1 s against 16.5-17.7 s for the
# bench's 40 steps, same losses (BENCHMARKS.md "Gradient checkpointing only where needed"); a card or a workload
# whose estimate without it does not fit keeps it on.
# Liger's fused linear+cross-entropy never builds the (tokens x 152k vocabulary) logits tensor (~2 GiB saved);
# its other kernels (RoPE, RMSNorm, SwiGLU) are left out: at this size the step is bound by kernel-launch time on
# the CPU, and each Triton launch costs more CPU time than the few PyTorch kernels it replaces. Measured in
# BENCHMARKS.md.
#
# The step is bound by the CPU issuing kernels (a 7B step is ~10,000 kernels for ~160 ms of GPU work), so one more
# knob cuts CPU time per step without changing the math: PyTorch's cuDNN attention backend costs ~1 ms of CPU per
# call (84 calls per step with checkpointing) against ~0.05 ms for the flash / memory-efficient kernels.
# BENCHMARKS.md has the ablation (and the 2026-12-03 A/B that removed the fused LoRA layers: no gain).
#
# The micro-batch of 16 is one row of its samples, without padding (padding_free, on SDPA: persona.packing). The
# data's shape decides what that saves: padded, a micro-batch costs 16 x its longest sample. On seed 003's mix of
# alpaca-gpt4 zh/en rows (lengths 28-741 tokens, bench/seed_mix.py) the padded recipe computed 2,676 tok/s at 22.6
# GiB and the padding-free one 4,510 tok/s at 17.4 GiB (3 epochs, 521k tokens: 117 s, the seed recipe's 444 tok/s
# would take 20 min); on the 50 short identity rows, whose lengths barely differ, 15.4 s against 17.9 s. Same
# losses step by step (BENCHMARKS.md "Seed 003's mixed workload"). SDPA's block-diagonal mask still computes
# attention over the whole row; attn_impl 'torch_varlen' (PyTorch's varlen flash kernel, persona.packing) computes
# it within each sample: 4,966-5,188 slice tok/s against 4,376-4,381 on SDPA (alternating, one H100 call), same
# losses; the whole 3-epoch mix then trained in 88.7 s at 17.4 GiB, 9.9x the seed recipe's tok/s in the same call.
# On a torch before 2.10 it falls back to SDPA with a warning (persona.training.OPTIONAL_PACKAGES).
FAST_GPU = replace(
    SEED_GPU,
    per_device_train_batch_size=16,
    gradient_accumulation_steps=1,
    use_liger_kernel=True,
    cudnn_attention=False,
    padding_free=True,
    attn_impl="torch_varlen",
    lora_input_cast=False,
    checkpointing_if_needed=True,
)

# CPU recipes follow the model's size. The rule: LoRA's learning rate falls as the model grows, and a small,
# weakly pretrained model needs a rate that would wipe out a larger one.
# - Up to 300M parameters (SmolLM2-135M): lr 3e-3 for 2 epochs. lr 1e-4 does not move a 135M model within minutes;
#   2e-3 to 3e-3 teaches the identity, unseen paraphrases included (BENCHMARKS.md, CPU section).
# - Above (Qwen2.5-Coder-0.5B, the embedded default, and anything larger on a CPU): lr 5e-4 for 1 epoch, LoRA on the
#   attention projections only, one replay row per identity row (default_general_ratio) trained to keep the base
#   model's next-token distribution (KL x 3, persona.distill). At 3e-3 the 0.5B model's general score fell from
#   0.75 to 0.00. With all-linear LoRA and plain replay targets, no learning rate or epoch count kept more than 87 %
#   of the base model's 156 right general answers: the adapter swapped facts ("Lisbon" -> "Porto", "Canada" ->
#   "China"), the same questions in every run. On this data (bf16, BENCHMARKS.md "CPU sweep, AMX machine"), 2
#   epochs at 2e-4: all-linear, plain replay 1.0: kept 135; attention-only: 140; + KL x 1: 146; KL x 2: 148; KL x 3:
#   150, but the identity then slipped under adversarial questions. One epoch at a higher rate moves the weights
#   less far for the same identity (BENCHMARKS.md "One epoch"): lr 4e-4, KL x 2: 150 kept, identity_zh 0.94;
#   lr 5e-4, KL x 3: 150 kept (96.2 %), every identity kind 1.00, multi-turn 0.80, in half the training time.
#   With the identity rows that follow an unrelated exchange (data/self_cognition.json's "history" rows, trained
#   with loss_scale last_round) multi-turn is 1.00; 1.25 replay rows per identity row then keep 149 (95.5 %).
# Two samples in one micro-batch instead of two accumulated ones: same optimization, fewer, fuller matrix multiplies.
# torch_dtype "auto" is bf16 on a CPU with bf16 matrix instructions (AVX512-BF16 or AMX), fp32 elsewhere (cpu_dtype).
# use_logits_to_keep off: ms-swift's default hands the output layer a slice of the hidden states (the positions from
# the first answer token on), and on a CPU PyTorch multiplies a non-contiguous slice by a frozen weight one row at a
# time, over a copy of the 152k-word output matrix per row (the decoding bug of BENCHMARKS.md "Decoding with an
# adapter"). Computing all positions' logits is the same loss and 2.5x faster a step here (3.04 s -> 1.21 s,
# bench/bench_cpu_step.py, BENCHMARKS.md "CPU: the output layer in training").
CPU_DEFAULT = Recipe(
    learning_rate=5e-4,
    num_train_epochs=1,
    per_device_train_batch_size=2,
    gradient_accumulation_steps=1,
    gradient_checkpointing=False,
    torch_dtype="auto",
    max_length=512,
    target_modules=("q_proj", "k_proj", "v_proj", "o_proj"),
    replay_kl_weight=3.0,
    use_logits_to_keep=False,
)
# SmolLM2-135M keeps the recipe it was measured with: all-linear, plain replay targets.
CPU_SMALL = replace(CPU_DEFAULT, learning_rate=3e-3, num_train_epochs=2, target_modules=("all-linear",),
                    replay_kl_weight=0.0)
SMALL_MODEL_PARAMETERS = 300_000_000  # at or below: CPU_SMALL

GPU_RECIPES = {"fast": FAST_GPU, "seed": SEED_GPU}


def default_general_ratio(device: str, parameters: int | None = None) -> float:
    """Replay rows per identity row when the curation config sets none (`parameters` None: the embedded default).

    1.25 where the CPU_DEFAULT recipe trains (a CPU and a model over SMALL_MODEL_PARAMETERS): its KL replay keeps the
    base model's answers only where it has replay rows to anchor on (1.0 kept 146 of 156, 1.25 kept 149, with the
    identity rows that have a history; BENCHMARKS.md "One epoch"). 0.5 elsewhere: SmolLM2's recipe and the GPU
    recipes were measured with it (BENCHMARKS.md)."""
    if device == "cpu" and (parameters is None or parameters > SMALL_MODEL_PARAMETERS):
        return 1.25
    return 0.5


def recipe_name(name: str | None = None) -> str:
    """The chosen recipe name: the argument, else $PERSONA_RECIPE, else 'fast'."""
    chosen = (name or os.environ.get(RECIPE_ENV) or "fast").strip().lower()
    if chosen not in GPU_RECIPES:
        raise ValueError(f"unknown recipe '{chosen}': choose one of {', '.join(GPU_RECIPES)} "
                         f"(argument or ${RECIPE_ENV})")
    return chosen


def default_recipe(device: str, name: str | None = None, parameters: int | None = None) -> Recipe:
    """The recipe for `device` and a model of `parameters` (None: the embedded default's size).

    On a GPU: 'fast' (default) or 'seed', whatever the model. On the CPU the fast choice follows the model's size
    (CPU_SMALL up to SMALL_MODEL_PARAMETERS, else CPU_DEFAULT; the rule is written above them), in bf16 where the CPU
    computes it (cpu_dtype); 'seed' gives the seed's values."""
    chosen = recipe_name(name)
    if device != "cpu":
        return GPU_RECIPES[chosen]
    if chosen == "seed":
        return SEED_GPU
    recipe = CPU_SMALL if parameters is not None and parameters <= SMALL_MODEL_PARAMETERS else CPU_DEFAULT
    return resolve_dtype(recipe, device)


def resolve_dtype(recipe: Recipe, device: str) -> Recipe:
    """The recipe with torch_dtype 'auto' made concrete: on a CPU cpu_dtype(), on a GPU bfloat16."""
    if recipe.torch_dtype != "auto":
        return recipe
    return replace(recipe, torch_dtype=cpu_dtype()[0] if device == "cpu" else "bfloat16")


CPU_DTYPE_ENV = "PERSONA_CPU_DTYPE"  # bfloat16 or float32: overrides the automatic choice on a CPU
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_dtype(cpuinfo: str = "/proc/cpuinfo") -> tuple[str, str]:
    """(dtype, why) for training and decoding on this CPU: bfloat16 where the CPU has bf16 matrix instructions
    (AMX or AVX512-BF16: one LoRA step of the 0.5B default 2.1x faster than fp32), float32 elsewhere, where PyTorch
    emulates bf16 slowly. $PERSONA_CPU_DTYPE overrides."""
    forced = os.environ.get(CPU_DTYPE_ENV, "").strip().lower()
    if forced:
        if forced not in ("bfloat16", "float32"):
            raise ValueError(f"${CPU_DTYPE_ENV}={forced!r}: use bfloat16 or float32")
        return forced, f"${CPU_DTYPE_ENV}={forced}"
    try:
        flags = set()
        for line in open(cpuinfo, encoding="utf-8", errors="replace"):
            if line.startswith("flags"):
                flags.update(line.split(":", 1)[1].split())
                break
    except OSError:
        return "float32", f"{cpuinfo} unreadable, so no bf16 instructions assumed"
    found = [f for f in BF16_CPU_FLAGS if f in flags]
    if found:
        return "bfloat16", f"the CPU has {', '.join(found)}"
    return "float32", "the CPU has no bf16 matrix instructions (amx_bf16, avx512_bf16)"


def scale_for_world(recipe: Recipe, world_size: int) -> Recipe:
    """Per-device settings for data-parallel training on `world_size` GPUs with the same samples per optimizer step.

    The global batch is per_device x grad-accum x world_size; the lr schedule assumes recipe.samples_per_step.
    The per-device batch is divided first, then the gradient accumulation.
    """
    if world_size <= 1:
        return recipe
    bs, ga = recipe.per_device_train_batch_size, recipe.gradient_accumulation_steps
    if bs % world_size == 0:
        return replace(recipe, per_device_train_batch_size=bs // world_size)
    if ga % world_size == 0:
        return replace(recipe, gradient_accumulation_steps=ga // world_size)
    for d in range(world_size, 0, -1):  # split between the two, e.g. bs 4 x ga 2 on 8 GPUs -> 1 x 1
        if bs % d == 0 and ga % (world_size // d) == 0 and world_size % d == 0:
            return replace(recipe, per_device_train_batch_size=bs // d,
                           gradient_accumulation_steps=ga // (world_size // d))
    raise ValueError(f"{recipe.samples_per_step} samples per step (batch {bs} x grad-accum {ga}) cannot be "
                     f"split evenly over {world_size} GPUs; set per_device_train_batch_size or "
                     f"gradient_accumulation_steps so that their product is a multiple of {world_size}")


def detect_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def detect_device_early(driver_dir: str = "/proc/driver/nvidia/gpus", device_file: str = "/dev/nvidia0") -> str:
    """`detect_device()` without importing torch (5 s on a GPU machine), for deciding early whether to start work
    that only pays on a GPU: torch's answer once torch is imported; before, whether the NVIDIA driver shows a GPU
    that CUDA_VISIBLE_DEVICES does not hide. It can be wrong where torch has no CUDA build; what it starts must not
    depend on it being right."""
    import sys
    from pathlib import Path

    if "torch" in sys.modules:
        return detect_device()
    if os.environ.get("CUDA_VISIBLE_DEVICES", "unset").strip() in ("", "-1"):
        return "cpu"
    try:
        listed = any(Path(driver_dir).iterdir())
    except OSError:
        listed = False
    return "cuda" if listed or Path(device_file).exists() else "cpu"
