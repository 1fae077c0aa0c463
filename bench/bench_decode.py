"""A/B of Chat's contiguous output-layer input (persona/evaluation.py), on the path the evaluation runs.

Decodes the first 32 general probes (one CPU batch, 40 new tokens, greedy) with the adapter loaded, alternating
the fix on and off, `--runs` times each, in one process: the same machine, the same warm caches.

    .venv/bin/python bench/bench_decode.py --adapter outputs/adapters/<run id> [--runs 3]
"""
import argparse
import json
import statistics
import time
from pathlib import Path

from persona.inference import Chat
from persona.probes import load_probes
from persona.targets import adapter_target


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--adapter", required=True)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()
    target = adapter_target(args.adapter)
    probes = [p for p in load_probes(Path(target.manifest["dataset_probes"])) if p.kind == "general"]
    rows = [(p.question, (), None, use) for p in probes[:args.batch_size] for use in (True,)]
    chat = Chat(target.base_model, target.adapter, target.template, target.system, "cpu")
    head = chat.model.get_output_embeddings()
    fix = dict(head._forward_pre_hooks)  # the hook Chat registered
    times = {"fix on": [], "fix off": []}
    answers = {}
    chat.answer_rows(rows[:2], max_new_tokens=4, batch_size=2)  # warm-up
    for _ in range(args.runs):
        for name in ("fix on", "fix off"):
            head._forward_pre_hooks.clear()
            if name == "fix on":
                head._forward_pre_hooks.update(fix)
            started = time.perf_counter()
            answers[name] = chat.answer_rows(rows, max_new_tokens=40, batch_size=args.batch_size)
            times[name].append(time.perf_counter() - started)
    head._forward_pre_hooks.update(fix)
    for name, ts in times.items():
        print(f"{name}: " + ", ".join(f"{t:.1f}" for t in ts) + f" s per batch of {len(rows)} "
              f"(median {statistics.median(ts):.1f})")
    print(f"same answers: {sum(a == b for a, b in zip(answers['fix on'], answers['fix off']))}/{len(rows)}")
    print(json.dumps({k: [round(t, 2) for t in v] for k, v in times.items()}))


if __name__ == "__main__":
    main()
