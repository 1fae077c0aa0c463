"""Decoding batch size on a CPU, on the converted embedded default: the baseline's base rows (every probe, 40 new
tokens, stability rows sampled) and the replay prompts (48 new tokens) at several batch sizes, alternating, in one
process; then how many answers differ from the smallest batch's (bf16 padding can change a greedy answer).

    .venv/bin/python bench/bench_decode_batch.py --model-dir outputs/base_models/<folder> \
        --probes outputs/datasets/<version>/probes.jsonl [--rounds 2]
"""
import argparse
import time
from pathlib import Path

from persona.evaluation import Contender, decode
from persona.inference import Chat
from persona.mixing import read_prompts
from persona.models import BaseModel
from persona.probes import load_probes
from persona.scoring import score


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--probes", required=True)
    ap.add_argument("--prompts", default="data/general_prompts.jsonl")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    base = BaseModel.from_dir(args.model_dir)
    probes = load_probes(args.probes)
    prompts = read_prompts(Path(args.prompts))[:94]  # as many as the default's replay draw
    chat = Chat(base.path, None, base.template, "You are a helpful assistant.", "cpu")
    chat.answer([("hi", ())], max_new_tokens=4, batch_size=1)  # warm-up
    answers = {}
    for _ in range(args.rounds):
        for bs in (32, 64, 128, 256):
            started = time.perf_counter()
            d = decode(chat, probes, {"base": Contender(None, False)}, 3, max_new_tokens=40, batch_size=bs)["base"]
            s = score(d.asked, d.texts, base.own_identity, d.truncated)
            print(f"probes bs {bs}: {time.perf_counter() - started:.1f} s rows {len(d.texts)} general {s.general:.3f}",
                  flush=True)
            answers[("probes", bs)] = d.texts
        for bs in (16, 32, 47, 94):
            started = time.perf_counter()
            answers[("replay", bs)] = chat.answer([(p, ()) for p in prompts], max_new_tokens=48, batch_size=bs)
            print(f"replay bs {bs}: {time.perf_counter() - started:.1f} s", flush=True)
    for kind, sizes in (("probes", (32, 64, 128, 256)), ("replay", (16, 32, 47, 94))):
        ref = answers[(kind, sizes[0])]
        for bs in sizes[1:]:
            print(f"{kind} answers changed vs batch {sizes[0]}: batch {bs}:",
                  sum(x != y for x, y in zip(ref, answers[(kind, bs)])))


if __name__ == "__main__":
    main()
