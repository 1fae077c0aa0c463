"""The whole pipeline on one GPU for the 7B shape, stage by stage, with the functions the Dagster assets call.

    base_model       starts the trainer standby (persona.standby: a training child that imports torch and ms-swift
                     ahead of time), then persona.models.from_local_dir (reads config, counts parameters, hashes
                     the weights)
    curated_dataset  persona.evaluation.load_probes + persona.data.load_dataset, with every sample counted by the
                     base model's tokenizer against max_length as the asset does -> train.jsonl
    lora_adapter     persona.training.train_lora with default_recipe('cuda') (the fast recipe), claiming the
                     standby, and starting the next one for the next run
    evaluation       persona.evaluation.Chat on cuda with the adapter, then persona.evaluation.compare: every probe
                     answered by the three contenders (base, identity in the system prompt, base + adapter), with
                     the pipeline's defaults (40 new tokens, batch 128 on a GPU). As in the pipeline, the base and
                     prompt-only answers are remembered (--answer-cache) and reused while base, probes and settings
                     stay the same.

The pass runs twice (--runs): the first is the first run after a download (the weights are hashed, the baseline
answers decoded); the second is a re-training run, e.g. after the dataset sensor fired (the weight digests and
baseline answers are remembered, caches are warm). The training call's output is kept with the seconds at which
each line came (train_timeline in the JSON), which shows where its start-up time goes.

Dagster and MLflow are left out (their bookkeeping is milliseconds; they are not installed on the GPU machine).
With random weights no answer ever stops early, so every probe runs to max_new_tokens: the slowest case.

The standby is left out with --no-standby (every training call then starts a fresh child, as before 2026-11-23's
fourth session).

    python bench/bench_pipeline.py [--model-dir /tmp/q7] [--eval-batch-size 16] [--runs 1] [--no-standby]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from qwen7b_shape import DEFAULT_DIR, ROOT, ensure_model, versions, with_repo_on_path  # noqa: E402


def run_once(args, base_dir: str) -> dict:
    """One pass of the graph's work; returns seconds per stage and what the report needs."""
    from persona.data import Identity, load_dataset
    from persona.evaluation import (BaselineAnswers, Chat, compare, default_batch_size, identity_system_prompt,
                                    load_probes, token_counter)
    from persona.models import from_local_dir
    from persona.recipe import default_recipe
    from persona.standby import Standby
    from persona.training import child_env, train_lora

    stages: dict[str, float] = {}
    t_all = time.time()
    idle = None if args.no_standby else args.standby_idle  # (Dagster is not installed on the GPU machine: the
    # TrainerStandby resource's decision, made here by hand)

    t = time.time()
    if idle:
        Standby("cuda", child_env("cuda"), idle).warm()  # as the base_model asset does
    base = from_local_dir(base_dir)
    stages["base_model"] = time.time() - t

    work = Path(tempfile.mkdtemp(prefix="persona-pipeline-"))
    t = time.time()
    identity = Identity()
    probes = [p.filled(identity) for p in load_probes(args.probes)]
    dataset = load_dataset([Path(args.data)], [p.question for p in probes], min_samples=20, identity=identity,
                           own_identity=base.own_identity, count_tokens=token_counter(base.path, base.template),
                           max_length=512)  # CurationConfig.max_length's default
    train_path = work / "train.jsonl"
    dataset.write_jsonl(train_path)
    stages["curated_dataset"] = time.time() - t

    recipe = default_recipe("cuda")
    batch = args.eval_batch_size or default_batch_size("cuda")
    remembered = None if args.forget_answers else BaselineAnswers(args.answer_cache, base.weights_sha256)
    prompt_only = identity_system_prompt(identity, recipe.system)
    baseline = None
    if args.overlap_baseline and remembered is not None:
        # An experiment, not what the assets do: the base and prompt-only answers decoded in this process while the
        # standby trains, on the same GPU; the evaluation below then finds them remembered.
        import threading

        def decode_baseline() -> None:
            t0 = time.time()
            before = Chat(base.path, None, base.template, recipe.system, "cuda")
            compare(before, probes, base.own_identity, prompt_only, max_new_tokens=args.max_new_tokens,
                    batch_size=batch, remembered=remembered)
            del before
            stages["baseline_while_training"] = time.time() - t0

        baseline = threading.Thread(target=decode_baseline)
    t = time.time()
    timeline: list[tuple[float, str]] = []  # the training child's output, seconds since the call began
    if baseline is not None:
        baseline.start()
    result = train_lora(base, train_path, recipe, work / "adapter", "cuda",
                        on_output=lambda line: timeline.append((round(time.time() - t, 2), line[:200])),
                        standby_idle_seconds=idle)
    stages["lora_adapter"] = time.time() - t
    if baseline is not None:
        baseline.join()
        stages["lora_adapter_and_baseline"] = time.time() - t
        import gc

        import torch

        gc.collect()
        torch.cuda.empty_cache()

    t = time.time()
    chat = Chat(base.path, result.adapter_dir, base.template, recipe.system, "cuda")
    stages["evaluation_load"] = time.time() - t
    t = time.time()
    results = compare(chat, probes, base.own_identity, prompt_only,
                      max_new_tokens=args.max_new_tokens, batch_size=batch, remembered=remembered,
                      log=lambda line: print(f"[evaluation] {line}", flush=True))
    stages["evaluation_three_contenders"] = time.time() - t
    stages["total"] = time.time() - t_all
    del chat
    import gc

    import torch

    gc.collect()
    torch.cuda.empty_cache()
    return {"stages_s": stages, "train": result.summary(), "standby": result.standby, "samples": len(dataset.samples), "probes": len(probes),
            "eval_batch_size": batch, "identity_adapter": results["adapter"].identity, "train_timeline": timeline}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", default=DEFAULT_DIR)
    ap.add_argument("--data", default=str(ROOT / "data" / "self_cognition.json"))
    ap.add_argument("--probes", default=str(ROOT / "data" / "probes.jsonl"))
    ap.add_argument("--eval-batch-size", type=int, default=None, help="default: the pipeline's (128 on a GPU)")
    ap.add_argument("--max-new-tokens", type=int, default=40, help="default: the pipeline's "
                    "(EvaluationConfig.max_new_tokens)")
    ap.add_argument("--runs", type=int, default=2, help="passes: the first after the download, then re-training runs")
    ap.add_argument("--answer-cache", default="/tmp/persona-bench-answers",
                    help="where the base and prompt-only answers are remembered between runs, as the pipeline does")
    ap.add_argument("--forget-answers", action="store_true", help="decode all three contenders in every run")
    ap.add_argument("--overlap-baseline", action="store_true", help="experiment: decode the base and prompt-only "
                    "answers while the standby trains (same GPU)")
    ap.add_argument("--no-standby", action="store_true", help="no trainer standby: a fresh child trains every run")
    ap.add_argument("--standby-idle", type=float, default=300.0, help="seconds a standby waits for its job")
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "/tmp"), "bench_pipeline.json"))
    args = ap.parse_args()

    with_repo_on_path()
    ensure_model(args.model_dir)  # building the random weights stands in for a download: not timed

    import torch

    runs = []
    for i in range(args.runs):
        runs.append(run_once(args, args.model_dir))
        print(f"\n| stage (run {i + 1}, {'standby' if runs[-1]['standby'] else 'fresh child'}) | seconds |\n|---|---|")
        for k, v in runs[-1]["stages_s"].items():
            print(f"| {k} | {v:.1f} |", flush=True)
        print("training call, stage by stage (s since the call began):")
        for at, line in runs[-1]["train_timeline"]:
            if line.startswith("[persona]") or "train_runtime" in line:
                print(f"  {at:6.1f}  {line}")
    out = {
        "date": time.strftime("%Y-%m-%d"),
        "versions": versions(),
        "runs": runs,
        "max_new_tokens": args.max_new_tokens,
        "peak_reserved_gib_in_this_process": torch.cuda.max_memory_reserved() / 2**30,
    }
    Path(args.out).write_text(json.dumps(out, indent=1, default=str))
    print(json.dumps({k: v for k, v in out.items() if k != "runs"}, indent=1, default=str))


if __name__ == "__main__":
    main()
