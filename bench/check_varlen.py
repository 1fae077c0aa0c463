"""PyTorch's varlen flash kernel (`attn_impl: torch_varlen`, persona.packing) against SDPA with transformers'
block-diagonal mask, on a GPU: a 2-layer model with Qwen2.5-7B's attention shape (28 query heads, 4 key/value heads,
head dim 128) and one packed row of seed 003's mix (16 samples), same weights, bf16.

Prints and writes ($OUT/check_varlen.json): the largest logit and gradient differences of the two against the
bf16 noise floor (the same SDPA model run in float32), and the time of one forward + backward of the row.

    python bench/check_varlen.py
"""
from __future__ import annotations

import json
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from persona import packing

    packing.register_varlen()
    config = dict(vocab_size=4096, hidden_size=3584, intermediate_size=18944, num_hidden_layers=2,
                  num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768)
    random.seed(0)
    lengths = [min(741, max(28, int(random.lognormvariate(5.0, 0.55)))) for _ in range(16)]  # ~ the mix's rows
    torch.manual_seed(0)
    ids = torch.randint(0, 4096, (1, sum(lengths)), device="cuda")
    position_ids = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0).cuda()
    reference = Qwen2ForCausalLM(Qwen2Config(**config, attn_implementation="sdpa")).cuda().train()
    state = reference.state_dict()

    def run(impl: str, dtype) -> tuple:
        model = Qwen2ForCausalLM(Qwen2Config(**config, attn_implementation=impl)).to("cuda", dtype).train()
        model.load_state_dict(state)
        out = model(input_ids=ids, position_ids=position_ids, labels=ids, use_cache=False)
        out.loss.backward()
        grads = {n: p.grad.float() for n, p in model.named_parameters() if "self_attn" in n}
        torch.cuda.synchronize()
        times = []
        for _ in range(5):
            model.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            start = time.perf_counter()
            model(input_ids=ids, position_ids=position_ids, labels=ids, use_cache=False).loss.backward()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return out.logits.detach().float(), grads, min(times)

    exact = run("sdpa", torch.float32)
    results = {"lengths": lengths, "tokens": sum(lengths)}
    for impl in ("sdpa", packing.VARLEN):
        logits, grads, seconds = run(impl, torch.bfloat16)
        results[impl] = {
            "logits_max_abs_diff_vs_fp32": float((logits - exact[0]).abs().max()),
            "grad_max_rel_diff_vs_fp32": max(float((g - exact[1][n]).norm() / exact[1][n].norm())
                                             for n, g in grads.items()),
            "fwd_bwd_ms_2_layers": round(seconds * 1000, 2),
        }
    print(json.dumps(results, indent=1))
    out = Path(os.environ.get("OUT", "."))
    (out / "check_varlen.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
