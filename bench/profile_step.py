"""Where one optimizer step of the seed workload goes, outside ms-swift: transformers + peft LoRA + (Liger) on the
7B-shaped model, 16 samples x ~94 tokens per step, the way ms-swift sets them up (bf16 weights, fp32 adapters,
autocast bf16, reentrant gradient checkpointing, fused AdamW, grad-norm clipping).

For each variant: wall time per step (synchronized), the time the CPU needs to issue the step (before the
final synchronize), and the peak allocated memory. Then a torch.profiler table for one step of the fast recipe.

    python bench/profile_step.py [--model-dir /tmp/q7] [--steps 8]

`--workload mix`: seed 003's mix instead (issue #19): each step one padding-free row of 16 samples with the mix's
lengths (log-normal, mean 166, std 103 tokens, clipped to 28-741, as bench/seed_mix.py), position_ids restarting
per sample; variants SDPA with transformers' block-diagonal mask, `torch_varlen` (the fast recipe's), LoRA
dropout 0, and Liger's RoPE/RMSNorm/SwiGLU; then the profile of one step of the fast recipe.

`--workload mix --ab-rounds N`: only an interleaved A/B of PEFT's float32 copy of each LoRA layer's input against
none (persona.adapter_casts, the fast recipe's `lora_input_cast: false`), N rounds of --steps steps each way.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from qwen7b_shape import DEFAULT_DIR, ensure_model  # noqa: E402


def make_batches(n: int, bs: int = 16, max_len: int = 94, vocab: int = 49152, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        lens = torch.randint(55, max_len + 1, (bs,), generator=g)
        lens[0] = max_len
        ids = torch.randint(10, vocab, (bs, max_len), generator=g)
        mask = (torch.arange(max_len)[None, :] < lens[:, None]).long()
        labels = ids.clone()
        labels[:, :30] = -100
        labels[mask == 0] = -100
        ids[mask == 0] = 2
        out.append({k: v.cuda() for k, v in dict(input_ids=ids, attention_mask=mask, labels=labels).items()})
    return out


def packed_rows(n: int, bs: int = 16, vocab: int = 49152, seed: int = 0):
    """n padding-free rows of bs samples with seed 003's mix lengths (see the module docstring)."""
    import math
    import random

    import torch

    rnd = random.Random(seed)
    mean, std = 166.2, 102.9
    sigma = math.sqrt(math.log(1 + (std / mean) ** 2))
    mu = math.log(mean) - sigma ** 2 / 2
    out = []
    for _ in range(n):
        lengths = [min(741, max(28, int(rnd.lognormvariate(mu, sigma)))) for _ in range(bs)]
        ids = torch.randint(10, vocab, (1, sum(lengths)))
        position_ids = torch.cat([torch.arange(k) for k in lengths]).unsqueeze(0)
        labels = ids.clone()
        labels[position_ids < 30] = -100  # each sample's prompt
        out.append({k: v.cuda() for k, v in dict(input_ids=ids, position_ids=position_ids, labels=labels).items()})
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workload", choices=["identity", "mix"], default="identity")
    ap.add_argument("--model-dir", default=DEFAULT_DIR)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--ab-rounds", type=int, default=0,
                    help="only an interleaved A/B of LoRA's float32 input copy (PEFT's default) against none "
                         "(persona.adapter_casts): this many rounds of --steps steps each way, in alternating order")
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "/tmp"), "profile_step.json"))
    args = ap.parse_args()
    ensure_model(args.model_dir)

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    t = time.time()
    if args.workload == "mix":
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from persona import packing

        packing.register_varlen()
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.bfloat16, device_map="cuda")
    model.config.use_cache = False
    cfg = LoraConfig(r=8, lora_alpha=32, lora_dropout=0.05, task_type="CAUSAL_LM",
                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    model = get_peft_model(model, cfg)
    model.enable_input_require_grads()
    print(f"load + peft {time.time() - t:.1f} s", flush=True)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    batches = packed_rows(4) if args.workload == "mix" else make_batches(4)

    def set_dropout(p: float) -> None:
        for m in model.modules():
            if hasattr(m, "lora_dropout"):
                m.lora_dropout["default"] = torch.nn.Dropout(p) if p > 0 else torch.nn.Identity()

    def set_gc(on: bool) -> None:
        if on:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        else:
            model.gradient_checkpointing_disable()
        model.train()

    def step(batch, sync_every: bool = False):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    def measure(label: str) -> dict:
        for i in range(3):
            step(batches[i % len(batches)])
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        issue, wall = [], []
        for i in range(args.steps):
            t0 = time.perf_counter()
            loss = step(batches[i % len(batches)])
            t1 = time.perf_counter()
            loss.item()  # the trainer reads the loss once per logging step
            t2 = time.perf_counter()
            issue.append(t1 - t0)
            wall.append(t2 - t0)
        med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
        row = {"variant": label, "step_s": med(wall), "issue_s": med(issue),
               "tokens_per_s": sum(int(b["input_ids"].numel()) for b in batches) / len(batches) / med(wall),
               "peak_alloc_gib": torch.cuda.max_memory_allocated() / 2**30}
        print(json.dumps(row), flush=True)
        return row

    from peft.tuners.tuners_utils import BaseTunerLayer

    def set_input_cast(on: bool) -> None:  # off: as persona.adapter_casts sets it (fast recipe, lora_input_cast)
        for m in model.modules():
            if isinstance(m, BaseTunerLayer):
                m.cast_input_dtype_enabled = on

    if args.ab_rounds:
        if args.workload != "mix":
            raise SystemExit("--ab-rounds runs on --workload mix")
        return ab_input_cast(args, model, set_gc, set_input_cast, step, batches)
    if args.workload == "mix":
        return profile_mix(args, model, set_gc, set_dropout, measure, step, batches)
    rows = []
    set_gc(True)
    rows.append(measure("hf+peft, GC, dropout 0.05"))
    set_input_cast(False)
    rows.append(measure("hf+peft, GC, dropout 0.05, no fp32 input cast"))
    set_input_cast(True)

    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    _apply_liger_kernel_to_instance(model=model.get_base_model(), rope=False, rms_norm=False, swiglu=False)
    set_gc(True)
    rows.append(measure("liger FLCE only, GC, dropout 0.05"))
    set_input_cast(False)
    rows.append(measure("liger FLCE only, GC, dropout 0.05, no fp32 input cast"))
    set_dropout(0.0)
    rows.append(measure("liger FLCE only, GC, dropout 0, no fp32 input cast"))
    set_dropout(0.05)

    # One profiled step of the fast recipe's configuration.
    set_gc(True)
    write_profile(args, rows, step, batches)


def write_profile(args, rows, step, batches) -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile

    step(batches[0])
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step(batches[1]).item()
        torch.cuda.synchronize()
    ka = prof.key_averages()
    by_cpu = ka.table(sort_by="self_cpu_time_total", row_limit=25)
    by_cuda = ka.table(sort_by="self_device_time_total", row_limit=25)
    launches = sum(e.count for e in ka if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC",
                                                      "cuLaunchKernelEx"))
    cuda_total = sum(e.self_device_time_total for e in ka) / 1e6
    print(by_cpu[-6000:], flush=True)
    print(by_cuda[-6000:], flush=True)
    summary = {"rows": rows, "kernel_launches_per_step": launches, "device_busy_s_per_step": cuda_total}
    print(json.dumps(summary), flush=True)
    Path(args.out).write_text(json.dumps({**summary, "by_cpu": by_cpu, "by_cuda": by_cuda}, indent=1))


def ab_input_cast(args, model, set_gc, set_input_cast, step, batches) -> None:
    """Rounds of --steps steps with the copy, then without (the order alternating by round), each step timed on
    its own; the same rows in both arms, so a round's two medians are a pair. Drift of the host (the step is bound by
    the CPU issuing kernels) moves both arms of a round alike."""
    import statistics

    import torch
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    _apply_liger_kernel_to_instance(model=model.get_base_model(), rope=False, rms_norm=False, swiglu=False)
    model.get_base_model().config._attn_implementation = "torch_varlen"  # the fast recipe's (persona.packing)
    set_gc(True)
    for i in range(4):  # warm-up, both ways
        set_input_cast(i % 2 == 0)
        step(batches[i % len(batches)]).item()
    times = {True: [], False: []}
    ratios = []
    for r in range(args.ab_rounds):
        medians = {}
        for cast in ((True, False) if r % 2 == 0 else (False, True)):
            set_input_cast(cast)
            step(batches[0]).item()  # (the first step after a switch is not timed)
            arm = []
            for i in range(args.steps):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                step(batches[i % len(batches)]).item()
                arm.append(time.perf_counter() - t0)
            times[cast] += arm
            medians[cast] = statistics.median(arm)
        ratios.append(medians[False] / medians[True])
        print(f"round {r + 1}: with the copy {medians[True]:.4f} s, without {medians[False]:.4f} s, "
              f"ratio {ratios[-1]:.3f}", flush=True)
    summary = {"rounds": args.ab_rounds, "steps_per_arm": args.steps,
               "median_step_s_with_copy": statistics.median(times[True]),
               "median_step_s_without_copy": statistics.median(times[False]),
               "round_ratios_without_over_with": ratios, "median_ratio": statistics.median(ratios),
               "rounds_faster_without": sum(x < 1 for x in ratios)}
    print(json.dumps(summary), flush=True)
    Path(args.out).write_text(json.dumps(summary, indent=1))


def profile_mix(args, model, set_gc, set_dropout, measure, step, batches) -> None:
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    config = model.get_base_model().config
    _apply_liger_kernel_to_instance(model=model.get_base_model(), rope=False, rms_norm=False, swiglu=False)
    set_gc(True)
    rows = []
    for impl in ("sdpa", "torch_varlen", "sdpa", "torch_varlen"):  # alternating: the spread shows
        config._attn_implementation = impl
        rows.append(measure(f"packed row, {impl}, GC, liger FLCE, dropout 0.05"))
    set_dropout(0.0)
    rows.append(measure("packed row, torch_varlen, GC, liger FLCE, dropout 0"))
    set_dropout(0.05)
    write_profile(args, rows, step, batches)  # the fast recipe as shipped
    _apply_liger_kernel_to_instance(model=model.get_base_model(), rope=True, rms_norm=True, swiglu=True,
                                    fused_linear_cross_entropy=False)
    rows.append(measure("packed row, torch_varlen, GC, liger all, dropout 0.05"))
    Path(args.out).write_text(json.dumps({**json.loads(Path(args.out).read_text()), "rows": rows}, indent=1))
    print(json.dumps(rows[-1]), flush=True)


if __name__ == "__main__":
    main()
