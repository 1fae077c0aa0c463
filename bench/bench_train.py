"""Seed workload, seed recipe vs ours, through the product's own training path.

The seed workload: the 50 samples of bench/self_cognition50_bench.json, 10 epochs, 16 samples per optimizer step
(40 steps), on a model with Qwen2.5-7B's shape (bench/qwen7b_shape.py). Each variant runs
persona.training.train_lora (a child process running ms-swift's sft_main, as the pipeline does) with a
persona.recipe recipe; the child reports torch.cuda.max_memory_reserved as the peak.

    python bench/bench_train.py                       # seed, then fast
    python bench/bench_train.py --variants fast fast+per_device_train_batch_size=8+gradient_accumulation_steps=2

A variant is a recipe name (seed, fast) with optional `+field=value` overrides, `+swift.ARG=value` for other
ms-swift arguments, `+env.NAME=value` for the training child's environment and `+data=mix` for seed 003's mixed
workload (bench/seed_mix.py: 500 zh + 500 en general rows and the 50 identity rows, 3 epochs) instead of the
identity rows. Every variant logs the loss at every step (logging_steps=1) so the loss curves can be compared step
by step with the baseline (--baseline, seed). `+env.PERSONA_STOP_AFTER_STEPS=N` ends a run after step N on the
whole run's schedule (persona.step_clock); its tokens/s are then read over the slice after --warmup-steps.

    python bench/bench_train.py --baseline seed+data=mix+env.PERSONA_STOP_AFTER_STEPS=24 \
        --variants fast+data=mix seed+data=mix+env.PERSONA_STOP_AFTER_STEPS=24

Printed and written to $OUT/bench_train.json (or --out): train time (HF train_runtime), the whole call's wall
time, real (non-padding) tokens, tokens/s, MFU = tokens x 4 x matmul parameters / time / peak bf16 FLOP/s
(LoRA: forward 2, backward for activations 2, no weight gradients for the frozen matrices; recomputation from
gradient checkpointing is not counted), peak reserved VRAM, the pre-flight estimate, the speed-up over the
baseline and the per-step loss differences.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from qwen7b_shape import DEFAULT_DIR, ROOT, ensure_model, versions, with_repo_on_path  # noqa: E402

from persona.preflight import ModelShape  # noqa: E402
from persona.recipe import GPU_RECIPES, Recipe  # noqa: E402
from persona.training import EXTRA_ARGS_ENV, train_lora  # noqa: E402

DATA = ROOT / "bench" / "self_cognition50_bench.json"
WORKLOADS = {"identity": DATA, "mix": ROOT / "bench" / "seed_mix_bench.json"}
H100_BF16_DENSE = 989e12


def parse_value(raw: str):
    if raw[:1] in "{[":
        return json.loads(raw)
    low = raw.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(raw)
        except ValueError:
            pass
    return raw


def variant_recipe(spec: str, logging_steps: int = 1) -> tuple[Recipe, dict, dict, Path]:
    """'fast+lora_rank=16+swift.logging_nan_inf_filter=false+env.TRITON_CACHE_DIR=/tmp/x+data=mix'
    -> (recipe, extra ms-swift arguments, extra environment for the training child, data file)."""
    name, *pairs = spec.split("+")
    if name not in GPU_RECIPES:
        raise SystemExit(f"unknown recipe {name!r} in variant {spec!r}; choose from {', '.join(GPU_RECIPES)}")
    overrides, extra, env, data = {}, {}, {}, DATA
    for pair in pairs:
        key, _, value = pair.partition("=")
        if key == "data":
            if value not in WORKLOADS:
                raise SystemExit(f"unknown workload {value!r} in {spec!r}; choose from {', '.join(WORKLOADS)}")
            data = WORKLOADS[value]
        elif key.startswith("swift."):
            extra[key[len("swift."):]] = parse_value(value)
        elif key.startswith("env."):
            env[key[len("env."):]] = value
        else:
            overrides[key] = parse_value(value)
    recipe = GPU_RECIPES[name].with_overrides(**overrides)
    if data == WORKLOADS["mix"] and "num_train_epochs" not in overrides:
        recipe = recipe.with_overrides(num_train_epochs=3)  # seed 003's mixed run
    return recipe.with_overrides(logging_steps=logging_steps), extra, env, data


def step_series(history: list[dict], key: str) -> dict[int, float]:
    return {int(h["step"]): float(h[key]) for h in history if key in h and "step" in h and h[key] is not None}


def compare(base: dict[int, float], other: dict[int, float]) -> dict:
    steps = sorted(set(base) & set(other))
    if not steps:
        return {"steps": 0}
    diffs = [other[s] - base[s] for s in steps]
    rel = [abs(d) / abs(base[s]) for d, s in zip(diffs, steps) if base[s]]
    values = [base[s] for s in steps]
    mean = sum(values) / len(values)
    spread = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
    step_to_step = [abs(values[i + 1] - values[i]) for i in range(len(values) - 1)]
    return {
        "steps": len(steps),
        "max_abs_diff": max(abs(d) for d in diffs),
        "mean_abs_diff": sum(abs(d) for d in diffs) / len(diffs),
        "mean_diff": sum(diffs) / len(diffs),
        "max_rel_diff": max(rel) if rel else None,
        "baseline_std_over_steps": spread,
        "baseline_mean_step_to_step_change": sum(step_to_step) / len(step_to_step) if step_to_step else None,
    }


def replay_marked(every: int, work: Path) -> Path:
    """The seed workload with every `every`-th row marked as a replay row (persona.distill's KL path). The rows are
    still identity rows: this measures the KL path's time and memory, not what it learns."""
    from persona.distill import REPLAY_CHANNEL

    out = work / f"seed-workload-replay-every-{every}.jsonl"
    with open(out, "w", encoding="utf-8") as fh:
        for i, r in enumerate(json.loads(DATA.read_text(encoding="utf-8"))):
            question = r["instruction"] + (f"\n{r['input']}" if r.get("input") else "")
            row = {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": r["output"]}]}
            if i % every == 0:
                row["channel"] = REPLAY_CHANNEL
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    return out


def run_variant(spec: str, base, shape: ModelShape, work: Path, peak_flops: float, log, data: Path | None = None,
                warmup_steps: int = 4) -> dict:
    recipe, extra, env, workload = variant_recipe(spec)
    data = data or workload
    adapter_dir = work / f"adapter-{len(list(work.glob('adapter-*')))}"
    log(f"\n===== variant {spec}: {recipe} {extra} {env}\n")
    saved = {k: os.environ.get(k) for k in [EXTRA_ARGS_ENV, *env]}
    os.environ.update({EXTRA_ARGS_ENV: json.dumps(extra), **env})
    started = time.time()
    try:
        result = train_lora(base, data, recipe, adapter_dir, "cuda", on_output=lambda line: log(line + "\n"))
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    call_s = time.time() - started
    matmul = shape.matmul_parameters()
    tps = result.num_tokens / result.train_seconds if result.train_seconds else 0.0
    slice_tps = result.slice_tokens_per_second(warmup_steps, result.global_step)
    row = {
        "variant": spec,
        "recipe": recipe.as_params(),
        "swift_extra": extra,
        "env": env,
        "world_size": result.world_size,
        "global_step": result.global_step,
        "train_s": result.train_seconds,
        "call_wall_s": call_s,
        "tokens": result.num_tokens,
        "tokens_per_s": tps,
        "mfu": tps * 4 * matmul / (peak_flops * result.world_size),  # per GPU
        "data": data.name,
        "slice": [warmup_steps + 1, result.global_step],
        "slice_tokens_per_s": slice_tps,
        "slice_mfu": slice_tps * 4 * matmul / (peak_flops * result.world_size) if slice_tps else None,
        "step_ends": result.step_ends,
        "tokens_seen": step_series(result.log_history, "num_input_tokens_seen"),
        "peak_gib": result.peak_memory_gib,
        "estimated_gib": result.estimated_peak_gib,
        "final_loss": result.final_loss,
        "loss": step_series(result.log_history, "loss"),
        "grad_norm": step_series(result.log_history, "grad_norm"),
        "learning_rate": step_series(result.log_history, "learning_rate"),
    }
    print(f"[bench] {spec}: train {row['train_s']:.1f} s, call {call_s:.1f} s, {row['tokens']} tokens, "
          f"{tps:,.0f} tok/s, MFU {row['mfu']:.1%}, peak {row['peak_gib']:.2f} GiB "
          f"(estimate {row['estimated_gib']:.2f}), steps {row['global_step']}, slice {row['slice']} "
          f"{slice_tps or 0:,.0f} tok/s", flush=True)
    return row


def rate(row: dict) -> float:
    """Tokens/s over the slice after warm-up where the step clock has it, else over the whole training."""
    return row.get("slice_tokens_per_s") or row["tokens_per_s"]


def table(rows: list[dict], base: dict) -> str:
    lines = ["| variant | data | GPUs | steps | train s | call wall s | tokens | tokens/s | slice tokens/s | slice MFU | "
             f"peak GiB | est. GiB | speed-up (tokens/s) | final loss | max abs Δloss vs {base['variant']} |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cmp = r.get("loss_vs_baseline", {})
        lines.append(
            f"| {r['run']}. {r['variant']} | {r.get('data', '')} | {r['world_size']} | {r['global_step']} | "
            f"{r['train_s']:.1f} | {r['call_wall_s']:.1f} | {r['tokens']} | {r['tokens_per_s']:,.0f} | "
            f"{r.get('slice_tokens_per_s') or 0:,.0f} | {r.get('slice_mfu') or 0:.1%} | "
            f"{r['peak_gib']:.2f} | {r['estimated_gib']:.2f} | "
            f"{rate(r) / rate(base):.1f}x | {r['final_loss']:.4f} | "
            f"{cmp.get('max_abs_diff', float('nan')):.4f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", nargs="+", default=["seed", "fast"])
    ap.add_argument("--baseline", default="seed", help="variant the speed-up and loss differences refer to")
    ap.add_argument("--model-dir", default=DEFAULT_DIR)
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "/tmp"), "bench_train.json"))
    ap.add_argument("--log", default=os.path.join(os.environ.get("OUT", "/tmp"), "bench_train.log"))
    ap.add_argument("--peak-tflops", type=float, default=H100_BF16_DENSE / 1e12,
                    help="bf16 dense peak of the GPU for MFU (H100/H200 SXM: 989)")
    ap.add_argument("--work", default="/tmp/persona-bench")
    ap.add_argument("--warmup-steps", type=int, default=4, help="steps left out of the slice's tokens/s")
    ap.add_argument("--replay-every", type=int, default=0,
                    help="mark every N-th sample as a replay row (time and memory of the replay KL path)")
    args = ap.parse_args()

    with_repo_on_path()
    t0 = time.time()
    base = ensure_model(args.model_dir)
    build_s = time.time() - t0
    shape = ModelShape.from_dir(base.path, parameters=base.parameters)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    logf = open(args.log, "a", encoding="utf-8")

    def log(text: str) -> None:
        logf.write(text)
        logf.flush()

    rows = []
    for run, spec in enumerate(args.variants, 1):
        try:
            data = replay_marked(args.replay_every, work) if args.replay_every else None
            rows.append({"run": run, **run_variant(spec, base, shape, work, args.peak_tflops * 1e12, log, data,
                                                   args.warmup_steps)})
        except Exception as exc:  # keep the other variants' numbers
            print(f"[bench] {spec} FAILED: {str(exc)[-3000:]}", flush=True)
            rows.append({"run": run, "variant": spec, "error": str(exc)[-5000:]})
        partial = {"rows": rows}
        Path(args.out).write_text(json.dumps(partial, indent=1, default=str))
    ok = [r for r in rows if "error" not in r]
    known = max((r["tokens"] for r in ok), default=0)
    for r in ok:  # a variant that turned token counting off trained on the same data
        if not r["tokens"] and known:
            r["tokens"] = known
            r["tokens_counted_by"] = "another variant (same data)"
            r["tokens_per_s"] = known / r["train_s"]
            r["mfu"] = r["tokens_per_s"] * 4 * shape.matmul_parameters() / (args.peak_tflops * 1e12 * r["world_size"])
    base_row = next((r for r in ok if r["variant"] == args.baseline), ok[0] if ok else None)
    if ok:
        for r in ok:
            r["loss_vs_baseline"] = compare(base_row["loss"], r["loss"])
            r["grad_norm_vs_baseline"] = compare(base_row["grad_norm"], r["grad_norm"])
            r["speedup_vs_baseline"] = rate(r) / rate(base_row)
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "versions": versions(),
        "model": {"path": base.path, "parameters": base.parameters, "matmul_parameters": shape.matmul_parameters(),
                  "bytes": base.bytes, "build_or_describe_s": build_s},
        "data": str(DATA),
        "peak_tflops": args.peak_tflops,
        "baseline": base_row["variant"] if base_row else None,
        "rows": rows,
    }
    Path(args.out).write_text(json.dumps(result, indent=1, default=str))
    if len(ok) >= 2:
        print("\nper-step loss, " + " vs ".join(r["variant"] for r in ok))
        for s in sorted(base_row["loss"]):
            print(f"  step {s:3d}: " + "  ".join(f"{r['loss'].get(s, float('nan')):.5f}" for r in ok))
    print("\n" + json.dumps({k: result[k] for k in ("date", "versions", "model")}, default=str))
    if ok:
        print("\n" + table(ok, base_row))
        for r in ok:
            if r is not base_row:
                print(f"loss vs {base_row['variant']} for {r['variant']}: {json.dumps(r['loss_vs_baseline'])}")


if __name__ == "__main__":
    main()
