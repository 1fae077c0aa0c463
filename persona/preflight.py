"""Will this LoRA run fit on the GPU? An estimate from the model's config, the recipe and the data, checked
against free VRAM before any weight is loaded.

The estimate has four parts (bytes):
- weights: parameters x bytes of `torch_dtype`;
- LoRA state: adapter parameters in fp32 (peft upcasts them) with their gradients and two Adam moments (16 B each);
- activations at the configured micro-batch and the longest sample: per decoder layer and token, a sum of
  hidden/intermediate-sized tensors kept for the backward pass (all layers without gradient checkpointing; with it,
  one bf16 hidden state per layer plus one layer recomputed and its gradients);
- logits: (tokens x vocabulary) in bf16 and fp32 with their gradient, or a few small chunks with Liger's fused
  linear+cross-entropy.
With several GPUs (DDP), each GPU also holds a bucketed fp32 copy of the LoRA gradients and NCCL buffers.
The per-token coefficients were counted from the Qwen2/Llama layer with peft LoRA (dropout copies included), then
checked against the peaks measured on an H100 and two H200s (BENCHMARKS.md, "Pre-flight estimate"): the estimate
errs on the large side by 2-12 %.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

GIB = 2**30
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "bf16": 2, "fp16": 2, "fp32": 4}
LORA_STATE_BYTES = 16          # fp32 weight + fp32 grad + Adam exp_avg + exp_avg_sq
ALLOCATOR_OVERHEAD = 0.35 * GIB  # cuBLAS workspaces, optimizer temporaries, caching-allocator rounding
SAFETY_MARGIN = 1.05           # asked-for free memory = estimate x this
# Training without gradient checkpointing (a recipe's checkpointing_if_needed) asks for more room: an estimate that
# falls short then costs the run an out-of-memory error, where with checkpointing it would have fitted.
CHECKPOINTING_OFF_MARGIN = 1.25
DDP_OVERHEAD = 0.25 * GIB      # with several GPUs: NCCL buffers, besides DDP's fp32 gradient buckets

# Bytes per token per decoder layer kept for backward, as multiples of (hidden, intermediate, kv_dim), bf16.
# Eager HF layer: RMSNorm keeps fp32 copies (~10 h each), SiLU*up keeps 3 intermediate tensors; peft's LoRA dropout
# keeps one copy of each adapted linear's input plus a mask (~3 h or 3 i per module). Liger: RMSNorm keeps its
# input only, SwiGLU keeps gate and up.
_SAVED = {
    # (liger, dropout) -> (per hidden, per intermediate, per kv_dim)
    (False, True): (52.0, 11.0, 6.0),
    (False, False): (34.0, 8.0, 6.0),
    (True, True): (36.0, 9.0, 6.0),
    (True, False): (18.0, 6.0, 6.0),
}
# While one layer runs its backward, gradients of its activations live beside them: roughly this share more.
_BACKWARD_WORKSET = 0.5
# Logits without Liger: bf16 logits + fp32 upcast + fp32 log-softmax kept + fp32 gradient, per kept token.
_LOGIT_BYTES = 14
# Batches with replay rows (persona.distill) are computed without Liger's fused loss, plus the base model's logits
# (bf16, fp32 log-softmax and its exp) for the replay rows: at most every row.
_BASE_LOGIT_BYTES = 10


class PreflightError(RuntimeError):
    """The run will not fit; the message says by how much and what to change."""


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    layers: int
    intermediate: int
    vocab: int
    heads: int
    kv_heads: int
    head_dim: int
    parameters: int

    @classmethod
    def from_config(cls, cfg: dict, parameters: int | None = None) -> "ModelShape":
        cfg = cfg.get("text_config", cfg) if "hidden_size" not in cfg else cfg
        hidden = int(cfg["hidden_size"])
        heads = int(cfg["num_attention_heads"])
        kv_heads = int(cfg.get("num_key_value_heads") or heads)
        head_dim = int(cfg.get("head_dim") or hidden // heads)
        shape = cls(hidden, int(cfg["num_hidden_layers"]), int(cfg["intermediate_size"]), int(cfg["vocab_size"]),
                    heads, kv_heads, head_dim, 0)
        if parameters is None:
            tied = bool(cfg.get("tie_word_embeddings", False))
            parameters = shape.counted_parameters(tied)
        return cls(**{**shape.__dict__, "parameters": int(parameters)})

    @classmethod
    def from_dir(cls, model_dir: str | Path, parameters: int | None = None) -> "ModelShape":
        return cls.from_config(json.loads(Path(model_dir, "config.json").read_text()), parameters)

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear in one decoder layer, by the name 'all-linear' LoRA targets."""
        h, i = self.hidden, self.intermediate
        return {"q_proj": (h, self.q_dim), "k_proj": (h, self.kv_dim), "v_proj": (h, self.kv_dim),
                "o_proj": (self.q_dim, h), "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def counted_parameters(self, tied: bool) -> int:
        per_layer = sum(a * b for a, b in self.linear_shapes().values())
        per_layer += self.q_dim + 2 * self.kv_dim  # q/k/v biases (Qwen2); a rounding error elsewhere
        per_layer += 2 * self.hidden               # two RMSNorms
        embed = self.vocab * self.hidden
        return self.layers * per_layer + embed * (1 if tied else 2) + self.hidden

    def matmul_parameters(self, tied: bool = False) -> int:
        """Parameters that take part in a matrix multiply per token: every linear and the LM head."""
        return self.layers * sum(a * b for a, b in self.linear_shapes().values()) + self.vocab * self.hidden


def lora_parameters(shape: ModelShape, rank: int, target_modules: Iterable[str] = ("all-linear",)) -> int:
    targets = set(target_modules)
    total = 0
    for name, (fan_in, fan_out) in shape.linear_shapes().items():
        if "all-linear" in targets or name in targets:
            total += rank * (fan_in + fan_out)
    return shape.layers * total


@dataclass(frozen=True)
class VramEstimate:
    weights: int
    lora_state: int
    activations: int
    logits: int
    overhead: int
    micro_batch: int
    seq_len: int

    @property
    def total(self) -> int:
        return self.weights + self.lora_state + self.activations + self.logits + self.overhead

    def gib(self) -> dict:
        return {k: round(getattr(self, k) / GIB, 2)
                for k in ("weights", "lora_state", "activations", "logits", "overhead", "total")}

    def describe(self) -> str:
        g = self.gib()
        return (f"~{g['total']:.1f} GiB = weights {g['weights']:.1f} + LoRA state {g['lora_state']:.2f} + "
                f"activations {g['activations']:.2f} + logits {g['logits']:.2f} + overhead {g['overhead']:.2f} "
                f"(micro-batch {self.micro_batch} x {self.seq_len} tokens)")


def activation_bytes(shape: ModelShape, tokens: int, gradient_checkpointing: bool, liger: bool,
                     lora_dropout: float = 0.05, dtype_bytes: int = 2) -> int:
    """Activation memory at the peak of one micro-batch of `tokens` tokens (padding included)."""
    ch, ci, ckv = _SAVED[(bool(liger), lora_dropout > 0)]
    per_layer_token = (ch * shape.hidden + ci * shape.intermediate + ckv * shape.kv_dim) * dtype_bytes / 2
    one_layer = per_layer_token * tokens * (1 + _BACKWARD_WORKSET)
    if gradient_checkpointing:
        checkpoints = shape.layers * tokens * shape.hidden * dtype_bytes
        return int(checkpoints + one_layer)
    return int(shape.layers * per_layer_token * tokens + one_layer * _BACKWARD_WORKSET)


def logits_bytes(shape: ModelShape, tokens: int, liger: bool) -> int:
    if liger:
        # Liger FLCE: chunks of ~tokens/(vocab/hidden) rows of fp32 logits, plus an fp32 grad of the hidden states.
        chunk = 2 ** math.ceil(math.log2(max(1, math.ceil(tokens / max(1, math.ceil(shape.vocab / shape.hidden))))))
        return int(2 * chunk * shape.vocab * 4 + tokens * shape.hidden * 4)
    return int(tokens * shape.vocab * _LOGIT_BYTES)


def estimate_vram(shape: ModelShape, *, micro_batch: int, seq_len: int, gradient_checkpointing: bool,
                  lora_rank: int = 8, target_modules: Iterable[str] = ("all-linear",), torch_dtype: str = "bfloat16",
                  use_liger_kernel: bool = False, liger_kernels: Iterable[str] = ("all",),
                  lora_dropout: float = 0.05, world_size: int = 1, replay_kl: bool = False) -> VramEstimate:
    """`liger_kernels` matters only with `use_liger_kernel`: RMSNorm/SwiGLU shrink the layers' activations, the fused
    linear+cross-entropy removes the logits. `replay_kl`: the data has replay rows trained by persona.distill."""
    dtype_bytes = DTYPE_BYTES.get(torch_dtype, 2)
    tokens = micro_batch * seq_len
    kernels = set(liger_kernels)
    liger_layers = use_liger_kernel and bool(kernels & {"all", "rms_norm", "swiglu"})
    fused_ce = use_liger_kernel and bool(kernels & {"all", "fused_linear_cross_entropy"})
    n_lora = lora_parameters(shape, lora_rank, target_modules)
    ddp = n_lora * 4 + DDP_OVERHEAD if world_size > 1 else 0  # DDP keeps a bucketed fp32 copy of the gradients
    return VramEstimate(
        weights=shape.parameters * dtype_bytes,
        lora_state=n_lora * LORA_STATE_BYTES,
        activations=activation_bytes(shape, tokens, gradient_checkpointing, liger_layers, lora_dropout,
                                     dtype_bytes),
        logits=(tokens * shape.vocab * (_LOGIT_BYTES + _BASE_LOGIT_BYTES) if replay_kl
                else logits_bytes(shape, tokens, fused_ce)),
        overhead=int(ALLOCATOR_OVERHEAD + ddp),
        micro_batch=micro_batch,
        seq_len=seq_len,
    )


def estimate_for_recipe(shape: ModelShape, recipe, seq_len: int, world_size: int = 1,
                        replay_rows: bool = False) -> VramEstimate:
    """Per-GPU estimate. `recipe` is a persona.recipe.Recipe with per-device settings (duck-typed, so this module
    imports nothing heavy). `replay_rows`: the data holds replay rows (see has_replay_rows)."""
    return estimate_vram(shape, micro_batch=recipe.per_device_train_batch_size, seq_len=min(seq_len, recipe.max_length),
                         gradient_checkpointing=recipe.gradient_checkpointing, lora_rank=recipe.lora_rank,
                         target_modules=recipe.target_modules, torch_dtype=recipe.torch_dtype,
                         use_liger_kernel=recipe.use_liger_kernel,
                         liger_kernels=getattr(recipe, "liger_kernels", ("all",)), lora_dropout=recipe.lora_dropout,
                         world_size=world_size,
                         replay_kl=replay_rows and getattr(recipe, "replay_kl_weight", 0) > 0)


# --- the data's longest sample --------------------------------------------------------------------------------

def _texts(record) -> list[str]:
    if isinstance(record, str):
        return [record]
    if isinstance(record, dict):
        return [t for v in record.values() for t in _texts(v)]
    if isinstance(record, list):
        return [t for v in record for t in _texts(v)]
    return []


def has_replay_rows(dataset_path: str | Path) -> bool:
    from persona.distill import REPLAY_CHANNEL

    return any(isinstance(r, dict) and r.get("channel") == REPLAY_CHANNEL for r in read_records(dataset_path))


def read_records(dataset_path: str | Path) -> list:
    text = Path(dataset_path).read_text(encoding="utf-8")
    stripped = text.lstrip()
    if stripped.startswith("["):
        return json.loads(stripped)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def sample_tokens(dataset_path: str | Path, system: str = "", count=None, per_message: int = 5,
                  fixed: int = 8) -> list[int]:
    """Tokens of each sample with its chat template (system prompt and per-message markers included).

    `count(text) -> int` counts tokens; without it, one token per character (never less than a real tokenizer
    for CJK, generous for English), so the estimate errs on the large side.
    """
    count = count or len
    sys_tokens = count(system) if system else 0
    return [sys_tokens + fixed + sum(count(t) + per_message for t in _texts(record) if t)
            for record in read_records(dataset_path)]


def longest_sample_tokens(dataset_path: str | Path, system: str = "", count=None, per_message: int = 5,
                          fixed: int = 8) -> int:
    """Tokens of the longest sample (see sample_tokens)."""
    return max(sample_tokens(dataset_path, system, count, per_message, fixed), default=0)


def packed_tokens(lengths: list[int], batch: int, micro_batches: int = 1) -> int:
    """The longest padding-free micro-batch (one row of `batch` samples end to end) to expect in a run of
    `micro_batches` randomly drawn ones.

    Never more than the `batch` longest samples together, which is what a single micro-batch can make. Over many
    micro-batches of a larger set, that worst case is far off (seed 003's mix: the 16 longest of 1,050 rows make
    ~9,600 tokens, a random 16 ~2,700): the expected largest of n sums of `batch` random lengths is about their mean
    plus sqrt(2 ln n) standard deviations (the Gaussian bound on a maximum; drawing without replacement only
    narrows the sums), and that is taken when it is smaller. It is an expectation, not a guarantee: a run can draw
    a longer row, which is why the estimate keeps its margins (ALLOCATOR_OVERHEAD, SAFETY_MARGIN)."""
    worst = sum(sorted(lengths, reverse=True)[:batch])
    if micro_batches <= 1 or len(lengths) <= batch:
        return worst
    mean = sum(lengths) / len(lengths)
    std = math.sqrt(sum((n - mean) ** 2 for n in lengths) / len(lengths))
    expected_max = batch * mean + math.sqrt(2 * math.log(micro_batches)) * math.sqrt(batch) * std
    return min(worst, math.ceil(expected_max))


def tokenizer_counter(model_dir: str | Path):
    """A token counter from the model folder's tokenizer, or None if it cannot be loaded offline."""
    try:
        from persona.tokens import counting_tokenizer

        tok = counting_tokenizer(str(model_dir), None)
    except Exception:
        return None
    return lambda text: len(tok(text, add_special_tokens=False)["input_ids"])


# --- the check --------------------------------------------------------------------------------------------------

def suggestions(shape: ModelShape, recipe, seq_len: int, free_bytes: int, world_size: int = 1,
                replay_rows: bool = False) -> list[str]:
    """Concrete recipe changes that would fit in `free_bytes`, keeping samples per optimizer step."""
    out = []

    def fits(r) -> bool:
        return estimate_for_recipe(shape, r, seq_len, world_size, replay_rows).total * SAFETY_MARGIN <= free_bytes

    if replay_rows and getattr(recipe, "replay_kl_weight", 0) > 0 and fits(recipe.with_overrides(replay_kl_weight=0.0)):
        out.append("replay_kl_weight=0 (replay rows learned as plain targets; no logits kept for the KL)")

    if not recipe.gradient_checkpointing and fits(recipe.with_overrides(gradient_checkpointing=True)):
        out.append("gradient_checkpointing=True")
    if not recipe.use_liger_kernel and fits(recipe.with_overrides(use_liger_kernel=True)):
        out.append("use_liger_kernel=True (pip install liger-kernel)")
    bs, ga = recipe.per_device_train_batch_size, recipe.gradient_accumulation_steps
    while bs > 1:
        bs //= 2
        ga *= 2
        cand = recipe.with_overrides(per_device_train_batch_size=bs, gradient_accumulation_steps=ga,
                                     gradient_checkpointing=True)
        if fits(cand):
            out.append(f"per_device_train_batch_size={bs}, gradient_accumulation_steps={ga}, "
                       "gradient_checkpointing=True (same samples per step)")
            break
    if seq_len >= recipe.max_length > 256:  # only when max_length binds: shorter data is not truncated anyway
        shorter = max(256, recipe.max_length // 2)
        if fits(recipe.with_overrides(max_length=shorter)):
            out.append(f"max_length={shorter} (truncates the longest samples)")
    weights_only = estimate_for_recipe(shape, recipe.with_overrides(per_device_train_batch_size=1,
                                                                    gradient_checkpointing=True), seq_len, world_size,
                                       replay_rows)
    if weights_only.total * SAFETY_MARGIN > free_bytes:
        out.append(f"a GPU with at least {math.ceil(weights_only.total * SAFETY_MARGIN / GIB)} GiB free "
                   "(the seed tutorial asks for 24 GB for a 7B model), or a smaller base model")
    return out


def check_fits(estimate: VramEstimate, free_bytes: int, total_bytes: int | None = None, device_name: str = "GPU",
               hints: Iterable[str] = ()) -> None:
    """Raise PreflightError when the estimate (with a 5% margin) exceeds free memory."""
    need = estimate.total * SAFETY_MARGIN
    if need <= free_bytes:
        return
    of_total = f" of {total_bytes / GIB:.1f} GiB" if total_bytes else ""
    msg = (f"This LoRA run needs about {need / GIB:.1f} GiB of GPU memory but {device_name} has "
           f"{free_bytes / GIB:.1f} GiB free{of_total}. Estimate: {estimate.describe()}.")
    hints = list(hints)
    if hints:
        msg += " To fit, try: " + "; or ".join(hints) + "."
    msg += " (Set PERSONA_SKIP_PREFLIGHT=1 to try anyway.)"
    raise PreflightError(msg)


def free_cuda_memory(device_index: int = 0) -> tuple[int, int, str]:
    """(free, total, name) of a CUDA device, from the driver (torch.cuda.mem_get_info)."""
    import torch

    free, total = torch.cuda.mem_get_info(device_index)
    return int(free), int(total), f"GPU {device_index} ({torch.cuda.get_device_name(device_index)})"
