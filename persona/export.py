"""Merge an adapter into its base model: a standalone Hugging Face folder that plain transformers loads, no PEFT.

What `swift export --merge_lora true` gives ms-swift users: the LoRA deltas folded into the base weights with PEFT's
`merge_and_unload`, saved as safetensors with the tokenizer, the chat template and the generation config. The chat
template's default system prompt becomes the one the adapter was trained with, so a client that sends no system
message gets the trained behaviour (Qwen's template would otherwise say "You are Qwen, created by Alibaba Cloud").
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from persona.storage import staged_dir
from persona.targets import Target

EXPORT_MANIFEST = "persona_export.json"


def default_system_of(template_text: str) -> str | None:
    """The system prompt a Qwen-style chat template inserts when the conversation has none, if it has one."""
    import re

    found = re.search(r"You are Qwen, created by Alibaba Cloud\. You are a helpful assistant\.", template_text)
    return found.group(0) if found else None


def export_merged(target: Target, output: Path, dtype: str = "auto", log=print) -> dict:
    """Write base + adapter, merged, to `output` (replaced whole, never left half-written). `dtype`: 'auto' keeps
    the base folder's dtype (bf16 for the embedded default), or 'float32' / 'bfloat16' / 'float16'."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from persona.tokens import chat_tokenizer

    if target.adapter is None:
        raise ValueError("nothing to merge: the target has no adapter")
    started = time.time()
    log(f"export: loading {target.base_model} with {target.adapter}")
    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(target.base_model, dtype=torch_dtype)
    model = PeftModel.from_pretrained(model, target.adapter).merge_and_unload()
    tok = chat_tokenizer(target.base_model, target.template)
    default = default_system_of(tok.chat_template or "")
    if default and target.system and default != target.system:
        tok.chat_template = tok.chat_template.replace(default, target.system)
    manifest = {"base_model": target.base_model, "adapter": target.adapter, "mlflow_run_id": target.run_id,
                "label": target.label, "system": target.system, "template": target.template,
                "dtype": str(model.dtype).removeprefix("torch."), "exported_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    with staged_dir(Path(output)) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        Path(tmp, EXPORT_MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False), encoding="utf-8")
    manifest["seconds"] = round(time.time() - started, 1)
    log(f"export: {output} written in {manifest['seconds']:.0f} s ({manifest['dtype']})")
    return manifest
