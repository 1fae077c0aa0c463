"""What mid-run checkpoints cost: the embedded default's CPU training with and without them, alternated.

The same `train_lora` call the lora_adapter asset makes (the CPU recipe for the model, its curated dataset), once with
`checkpoint_root` (checkpoints by the clock of persona.checkpointing: adapter, optimizer, scheduler, RNG, trainer
state; $PERSONA_CHECKPOINT_MIN_SECONDS sets the least gap, default 60 s) and once without (no mid-run save). Rounds
alternate the order. Prints ms-swift's train_runtime for each, and what each mid-run save took.

    .venv/bin/python bench/bench_checkpoints.py [--rounds 2] [--model outputs/base_models/<folder>]
        [--data outputs/datasets/<version>/train.jsonl]
"""
import argparse
import glob
import json
import os
import tempfile
import time
from pathlib import Path

from persona.models import from_local_dir
from persona.recipe import default_recipe
from persona.training import train_lora


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=(glob.glob("outputs/base_models/qwen*") or [""])[0])
    ap.add_argument("--data", default=max(glob.glob("outputs/datasets/*/train.jsonl"), key=os.path.getmtime,
                                          default=""))
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    base = from_local_dir(args.model)
    recipe = default_recipe("cpu", parameters=base.parameters)
    print(f"model {args.model} ({base.parameters / 1e6:.0f}M), data {args.data}, recipe {recipe}", flush=True)
    results = {"with": [], "without": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for arm in (("with", "without") if r % 2 == 0 else ("without", "with")):
                started = time.time()
                root = Path(tmp, "checkpoints") if arm == "with" else None
                lines = []
                res = train_lora(base, args.data, recipe, Path(tmp, f"adapter-{r}-{arm}"), "cpu",
                                 checkpoint_root=root, owner=f"bench-{r}", on_output=lines.append)
                saves = [line.split("(")[1].split(" s;")[0] for line in lines if "[persona] checkpoint at" in line]
                row = {"round": r, "arm": arm, "steps": res.global_step, "mid_run_saves_s": saves,
                       "train_runtime_s": round(res.train_seconds, 1), "call_s": round(time.time() - started, 1)}
                results[arm].append(row)
                print(json.dumps(row), flush=True)
    mean = {k: sum(x["train_runtime_s"] for x in v) / len(v) for k, v in results.items()}
    spread = {k: max(x["train_runtime_s"] for x in v) - min(x["train_runtime_s"] for x in v) for k, v in results.items()}
    cost = (mean["with"] - mean["without"]) / mean["without"]
    print(f"train_runtime mean: with checkpoints {mean['with']:.1f} s, without {mean['without']:.1f} s "
          f"(spread {spread['with']:.1f} / {spread['without']:.1f} s): cost {100 * cost:+.1f} %")


if __name__ == "__main__":
    main()
