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
"""
from __future__ import annotations

FLASH_IMPLS = ("flash_attn", "flash_attention_2", "flash_attention_3", "flash_attention_4")


def packs_with_sdpa(args: dict) -> bool:
    """True when the ms-swift arguments ask for padding_free on an attention that transformers masks per sample from
    the position_ids (no attn_impl or 'sdpa': a block-diagonal mask; 'flex_attention': a block mask)."""
    return (bool(args.get("padding_free")) and not args.get("packing")
            and args.get("attn_impl") in (None, "sdpa", "flex_attention"))


def sft_arguments(cls, args: dict):
    """`cls(**args)` (cls: swift.SftArguments), with padding_free allowed on SDPA (see the module docstring)."""
    if not packs_with_sdpa(args):
        return cls(**args)
    built = cls(**{**args, "padding_free": False})
    built.padding_free = True  # read when ms-swift builds the template (TemplateArguments.get_template_kwargs)
    return built
