"""A model folder with Qwen2.5-7B's exact shape and random bf16 weights, as a persona BaseModel.

Speed and memory do not depend on the weights' values, and no hub is reachable from the GPU machines. Built like
../shared/reference/seed_recipe_h100.py: torch.manual_seed(0), initialised on the GPU, saved as safetensors, with
the SmolLM2 tokenizer in bench/tokenizer (it has the <|im_start|>/<|im_end|> tokens the qwen2_5 template uses).

    python bench/qwen7b_shape.py build /tmp/q7
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TOKENIZER_DIR = ROOT / "bench" / "tokenizer"
DEFAULT_DIR = "/tmp/q7"
QWEN25_7B = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                 num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768, rope_theta=1e6,
                 rms_norm_eps=1e-6, tie_word_embeddings=False, hidden_act="silu", bos_token_id=1, eos_token_id=2)


def build(model_dir: str) -> None:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    t0 = time.time()
    cfg = Qwen2Config(**QWEN25_7B)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Qwen2ForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(model_dir, max_shard_size="4GB")  # four shards, as Qwen/Qwen2.5-7B-Instruct ships
    for f in TOKENIZER_DIR.iterdir():
        shutil.copy2(f, Path(model_dir, f.name))
    print(f"built {model_dir} in {time.time() - t0:.1f} s", flush=True)


def ensure_model(model_dir: str = DEFAULT_DIR):
    """Build the folder once (in a child process, so this process holds no CUDA memory) and describe it."""
    from persona.models import QWEN2, QWEN_CODER_05B, BaseModel, count_parameters

    if not Path(model_dir, "config.json").exists():
        subprocess.run([sys.executable, __file__, "build", model_dir], check=True)
    files = sorted(Path(model_dir).glob("*.safetensors"))
    return BaseModel(
        path=model_dir, source="random Qwen2.5-7B shape (bench/qwen7b_shape.py)", revision="torch.manual_seed(0)",
        # A Qwen2.5 shape in a folder whose name ms-swift does not know: the embedded Qwen's explicit settings.
        model_type=QWEN_CODER_05B.model_type, template=QWEN_CODER_05B.template, own_identity=QWEN2.own_identity,
        weights_sha256="", parameters=count_parameters(Path(model_dir)), bytes=sum(f.stat().st_size for f in files),
    )


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "transformers", "peft", "ms-swift", "liger-kernel", "trl", "accelerate"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    try:
        import torch

        out["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
        out["gpus"] = torch.cuda.device_count()
        out["cuda"] = torch.version.cuda
    except Exception:
        pass
    return out


def with_repo_on_path() -> None:
    """Child processes (`python -m persona.train_worker`) must import persona from this checkout."""
    parts = [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(parts))


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "build":
        build(sys.argv[2] if len(sys.argv) > 2 else DEFAULT_DIR)
    else:
        print(json.dumps(versions(), indent=2))
