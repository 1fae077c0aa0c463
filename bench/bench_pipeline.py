"""The whole pipeline on one GPU for the 7B shape, stage by stage, with the functions the Dagster assets call.

    base_model       persona.models.from_local_dir (reads config, counts parameters, hashes the weights)
    curated_dataset  persona.evaluation.load_probes + persona.data.load_dataset -> train.jsonl
    lora_adapter     persona.training.train_lora with default_recipe('cuda') (the fast recipe)
    evaluation       persona.evaluation.Chat on cuda with the adapter; probes answered by the base model
                     (adapter bypassed: "before") and by base + adapter ("after"), greedy, max_new_tokens 64

Dagster and MLflow are left out (their bookkeeping is milliseconds; they are not installed on the GPU machine).
With random weights no answer ever stops early, so every probe runs to max_new_tokens: the slowest case.

    python bench/bench_pipeline.py [--model-dir /tmp/q7] [--eval-batch-size 16]
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", default=DEFAULT_DIR)
    ap.add_argument("--data", default=str(ROOT / "data" / "self_cognition.json"))
    ap.add_argument("--probes", default=str(ROOT / "data" / "probes.jsonl"))
    ap.add_argument("--eval-batch-size", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "/tmp"), "bench_pipeline.json"))
    args = ap.parse_args()

    with_repo_on_path()
    ensure_model(args.model_dir)  # building the random weights stands in for a download: not timed

    from persona.data import load_dataset
    from persona.evaluation import Chat, evaluate, load_probes
    from persona.models import from_local_dir
    from persona.recipe import default_recipe
    from persona.training import train_lora

    stages: dict[str, float] = {}
    t_all = time.time()

    t = time.time()
    base = from_local_dir(args.model_dir)
    stages["base_model"] = time.time() - t

    work = Path(tempfile.mkdtemp(prefix="persona-pipeline-"))
    t = time.time()
    probes = load_probes(args.probes)
    dataset = load_dataset([Path(args.data)], [p.question for p in probes], min_samples=20)
    train_path = work / "train.jsonl"
    dataset.write_jsonl(train_path)
    stages["curated_dataset"] = time.time() - t

    recipe = default_recipe("cuda")
    t = time.time()
    result = train_lora(base, train_path, recipe, work / "adapter", "cuda")
    stages["lora_adapter"] = time.time() - t
    train = result.summary()

    t = time.time()
    chat = Chat(base.path, result.adapter_dir, base.template, recipe.system, "cuda")
    stages["eval_load"] = time.time() - t
    kw = dict(max_new_tokens=args.max_new_tokens, batch_size=args.eval_batch_size)
    t = time.time()
    before = evaluate(chat, probes, base.own_identity, use_adapter=False, **kw)
    stages["eval_before"] = time.time() - t
    t = time.time()
    after = evaluate(chat, probes, base.own_identity, use_adapter=True, **kw)
    stages["eval_after"] = time.time() - t
    stages["total"] = time.time() - t_all

    import torch

    print("\n| stage | seconds |\n|---|---|")
    for k, v in stages.items():
        print(f"| {k} | {v:.1f} |", flush=True)
    extra = {}
    try:
        extra = {
            "generated_tokens_per_eval": sum(len(chat.tok(a.text, add_special_tokens=False)["input_ids"])
                                             for a in after.answers),
            "scores": {"identity_before": before.identity, "identity_after": after.identity},
            "sample_answer_after": after.answers[0].text[:200],
        }
    except Exception as exc:  # evaluation's result type may grow; the timings are what this measures
        extra = {"extra_error": repr(exc)}
    out = {
        "date": time.strftime("%Y-%m-%d"),
        "versions": versions(),
        "stages_s": stages,
        "train": train,
        "samples": len(dataset.samples),
        "probes": len(probes),
        "eval_batch_size": args.eval_batch_size,
        "max_new_tokens": args.max_new_tokens,
        "eval_peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
        **extra,
    }
    Path(args.out).write_text(json.dumps(out, indent=1, default=str))
    print(json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
    main()
