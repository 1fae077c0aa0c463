"""Padding-free micro-batches on PyTorch's SDPA: ms-swift's `padding_free` without a flash-attention wheel.

With padding_free, ms-swift's collator concatenates a micro-batch's samples into one row whose position_ids restart
at 0 for each sample (Template.packing_row), and passes no attention mask. transformers (since 4.53,
masking_utils.find_packed_sequence_indices) reads the sample boundaries from such position_ids and gives SDPA a
block-diagonal causal mask, so no token attends across samples, and the loss is the mean over the same answer
tokens as with padding. ms-swift 4.6 still refuses padding_free unless attn_impl names a flash-attention
implementation (SftArguments._check_padding_free); flash-attn has no wheel for the GPU machines here (it builds from
source) and FlashAttention 4's CUTLASS libraries are a 92 MB wheel. So `sft_arguments` lets padding_free through
for SDPA: it builds the arguments with the flag off, then turns it on before ms-swift builds its template.
tests/test_packing.py trains the same rows both ways and gets the same losses.

SDPA given a block-diagonal mask still computes attention over the whole packed row (a 2,600-token row of 16
samples: ~16x the work of the samples alone), with the memory-efficient kernel. `attn_impl: torch_varlen` (VARLEN)
instead hands each packed row to PyTorch's own flash-attention kernel for variable-length batches
(torch.nn.attention.varlen, PyTorch >= 2.10, CUDA): causal attention within each sample, from the sample
boundaries in the position_ids, and nothing across them. It is registered with transformers' AttentionInterface (its
documented extension point), under a name of its own, and falls back to SDPA with transformers' mask wherever it
does not apply (CPU, padded batches, inference). BENCHMARKS.md "Seed 003's mixed workload" has the A/B.
"""
from __future__ import annotations

import functools
import inspect

FLASH_IMPLS = ("flash_attn", "flash_attention_2", "flash_attention_3", "flash_attention_4")
VARLEN = "torch_varlen"


def packs_with_sdpa(args: dict) -> bool:
    """True when the ms-swift arguments ask for padding_free on an attention that transformers masks per sample from
    the position_ids (no attn_impl or 'sdpa': a block-diagonal mask; 'flex_attention': a block mask; VARLEN: the
    boundaries)."""
    return (bool(args.get("padding_free")) and not args.get("packing")
            and args.get("attn_impl") in (None, "sdpa", "flex_attention", VARLEN))


def sft_arguments(cls, args: dict):
    """`cls(**args)` (cls: swift.SftArguments), with padding_free allowed on SDPA (see the module docstring)."""
    if not packs_with_sdpa(args):
        return cls(**args)
    built = cls(**{**args, "padding_free": False})
    built.padding_free = True  # read when ms-swift builds the template (TemplateArguments.get_template_kwargs)
    return built


def sample_boundaries(position_ids) -> tuple:
    """(cu_seqlens int32, longest sample) of one packed row whose position_ids restart for each sample: what
    transformers computes for its own flash-attention path."""
    from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

    (cu, _), (longest, _) = prepare_fa_kwargs_from_position_ids(position_ids)
    return cu, int(longest)


# Attention variants the varlen kernel does not compute (Gemma 2's logit soft-capping, gpt-oss's sinks): SDPA's path.
_NOT_VARLEN = ("softcap", "s_aux")
_last_row: list = [None, None]  # [position_ids, boundaries]: one row's boundaries serve all its layers


def _boundaries(position_ids) -> tuple:
    if _last_row[0] is not position_ids:  # a new forward (recomputation under checkpointing reuses the tensor)
        _last_row[:] = [position_ids, sample_boundaries(position_ids)]
    return _last_row[1]


def on_kernel_device(tensor) -> bool:
    return tensor.is_cuda  # PyTorch's varlen kernel is CUDA-only


@functools.cache
def _varlen_kernel() -> tuple:
    """(PyTorch's varlen_attn, its extra keywords): GQA is native before 2.13 and asked for from 2.13 on."""
    from torch.nn.attention.varlen import varlen_attn

    return varlen_attn, ({"enable_gqa": True} if "enable_gqa" in inspect.signature(varlen_attn).parameters else {})


def varlen_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                             scaling: float | None = None, sliding_window=None, position_ids=None, **kwargs):
    """transformers' attention-function signature; query (1, heads, tokens, dim), key/value (1, kv heads, tokens,
    dim). Returns (attention output (1, tokens, heads, dim), None), as transformers' SDPA function does."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    plain = not dropout and sliding_window is None and all(kwargs.get(k) is None for k in _NOT_VARLEN)
    packed_row = (plain and module.training and on_kernel_device(query) and query.shape[0] == 1
                  and position_ids is not None and position_ids.dim() == 2)  # (not multimodal 3-D positions)
    if not packed_row:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      sliding_window=sliding_window, position_ids=position_ids, **kwargs)
    cu, longest = _boundaries(position_ids)
    kernel, extra = _varlen_kernel()
    out = kernel(query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1), cu, cu, longest,
                 longest, scale=scaling, window_size=(-1, 0), **extra)  # (-1, 0): causal
    return out.unsqueeze(0), None


def register_varlen() -> None:
    """Make `attn_implementation='torch_varlen'` known to transformers (in the process that loads the model)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(VARLEN, varlen_attention_forward)
    AttentionMaskInterface.register(VARLEN, sdpa_mask)  # the SDPA fallback's mask; the packed path ignores it
