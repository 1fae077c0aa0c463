"""A/B of decoding on a CPU (persona.inference.Chat.decode_batch): finished rows leave the batch every 8 tokens, in
batches of 128 rows of like prompt length, the prompts' shared beginning computed once; the same without the shared
beginning; and one `generate` call per file-order batch of 32 (the code before).

The evaluation's own call (persona.evaluation.decode) of the adapter contender over the run's probes (every probe,
stability sampled 3 times), adapter loaded, 40 new tokens, the three arms alternating in one process `--runs`
times: the same machine, the same warm caches.

    .venv/bin/python bench/bench_shedding.py --adapter outputs/adapters/<run id> [--runs 2]
"""
import argparse
import json
import statistics
import time
from pathlib import Path

import persona.inference
from persona.evaluation import Contender, decode
from persona.inference import shared_prefix
from persona.probes import load_probes
from persona.targets import adapter_target

ARMS = {"one generate call, batches of 32": (None, 32, True),
        "shedding every 8 tokens, batches of 128, shared prefix once": (8, 128, True),
        "the same, every prompt computed whole": (8, 128, False)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--adapter", required=True)
    ap.add_argument("--runs", type=int, default=2)
    args = ap.parse_args()
    target = adapter_target(args.adapter)
    probes = load_probes(Path(target.manifest["dataset_probes"]))
    chat = persona.inference.Chat(target.base_model, target.adapter, target.template, target.system, "cpu")
    chat.answer_rows([("hi", (), None, True)] * 2, max_new_tokens=4, batch_size=2)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in ARMS}
    answers: dict[str, list[str]] = {}
    for _ in range(args.runs):
        for name, (every, batch, share) in ARMS.items():
            persona.inference.shed_every = lambda device, every=every: every
            persona.inference.shared_prefix = shared_prefix if share else (lambda prompts: 0)
            started = time.perf_counter()
            out = decode(chat, probes, {"adapter": Contender(None, True)}, 3, max_new_tokens=40, batch_size=batch)
            times[name].append(time.perf_counter() - started)
            answers[name] = out["adapter"].texts
            cut = sum(out["adapter"].truncated)
            print(f"{name}: {times[name][-1]:.1f} s, {len(answers[name])} rows, {cut} cut at 40 tokens", flush=True)
    for name, ts in times.items():
        print(f"{name}: " + ", ".join(f"{t:.1f}" for t in ts) + f" s (median {statistics.median(ts):.1f})")
    before, *others = answers.values()
    for name, out in zip(list(answers)[1:], others):
        print(f"{name}: same answers as before: {sum(x == y for x, y in zip(before, out))}/{len(out)}")
    print(json.dumps({k: [round(t, 2) for t in v] for k, v in times.items()}))


if __name__ == "__main__":
    main()
