"""Seed 003's mixed workload, synthesized: 500 zh + 500 en general rows + the 50 identity rows, for bench_train.py.

Seed 003 trains `'AI-ModelScope/alpaca-gpt4-data-zh#500' 'AI-ModelScope/alpaca-gpt4-data-en#500' 'self_cognition.json'`
for 3 epochs. No hub is reachable here, so the general rows are made of real text cut to the lengths those datasets
have. The lengths come from ms-swift's own dataset table (docs "Supported models and datasets", column
"Statistic (token)": the whole encoded sample, counted with the Qwen tokenizer):

    alpaca-gpt4-data-en  52,002 rows  178.2 ± 125.8 tokens, min 28, max 742
    alpaca-gpt4-data-zh  48,818 rows  164.1 ±  93.9 tokens, min 28, max 858

Each row's length is drawn from the log-normal distribution with that mean and standard deviation (answer lengths
are right-skewed: a few long essays, many short answers), clipped to [min, max], with random.Random(seed). A row is
one question (a sentence of the text, asked about) and an answer (the text that follows it) cut so that the row
under the qwen2_5 template, system prompt included, has that many tokens (bench/tokenizer, Qwen2.5's tokenizer).

The text: Chinese from the four seed tutorials (../shared/seeds: prose, commands, JSON and code, as alpaca-gpt4-zh
answers mix them), English from Python's language reference (the standard library's pydoc_data.topics). The result
is written to bench/seed_mix_bench.json (alpaca format, what bench_train.py --data reads) with its measured length
statistics in bench/seed_mix_bench.stats.json:

    python bench/seed_mix.py [--seed 0] [--seeds-dir ../shared/seeds]
"""
from __future__ import annotations

import argparse
import json
import math
import random
import re
import statistics
from pathlib import Path

HERE = Path(__file__).resolve().parent
TOKENIZER = HERE / "tokenizer" / "tokenizer.json"
IDENTITY = HERE / "self_cognition50_bench.json"
OUT = HERE / "seed_mix_bench.json"
SYSTEM = "You are a helpful assistant."  # the seeds' --system, persona.recipe's default
# (mean, standard deviation, min, max) tokens: ms-swift's dataset table, quoted above.
LENGTHS = {"zh": (164.1, 93.9, 28, 858), "en": (178.2, 125.8, 28, 742)}
ROWS = {"zh": 500, "en": 500}
ASK = {"zh": ["请解释下面这句话：{}", "这句话是什么意思？{}", "请展开讲讲：{}", "{}\n请详细说明。"],
       "en": ["Explain the following: {}", "What does this mean? {}", "Expand on this: {}", "{}\nPlease elaborate."]}


def render(question: str, answer: str) -> str:
    """A row as ms-swift's qwen2_5 template encodes it for training (system, user turn, answer, end token)."""
    return (f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n"
            f"<|im_start|>assistant\n{answer}<|im_end|>")


def lognormal_lengths(n: int, mean: float, std: float, lo: int, hi: int, rng: random.Random) -> list[int]:
    sigma = math.sqrt(math.log(1 + (std / mean) ** 2))
    mu = math.log(mean) - sigma ** 2 / 2
    return [min(hi, max(lo, round(rng.lognormvariate(mu, sigma)))) for _ in range(n)]


def chinese_text(seeds_dir: Path) -> str:
    text = "\n".join(p.read_text(encoding="utf-8") for p in sorted(seeds_dir.glob("*.txt")))
    return re.sub(r"[ \t]+", " ", text)


def english_text() -> str:
    import pydoc_data.topics as topics

    return "\n".join(topics.topics[k] for k in sorted(topics.topics))


def sentences(text: str) -> list[str]:
    parts = re.split(r"(?<=[。！？.!?])\s*|\n+", text)
    return [p.strip() for p in parts if 6 <= len(p.strip()) <= 80]


def build(seed: int, seeds_dir: Path) -> tuple[list[dict], dict]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(TOKENIZER))
    rng = random.Random(seed)
    rows, lengths = [], {}
    for lang, make_text in (("zh", lambda: chinese_text(seeds_dir)), ("en", english_text)):
        text = make_text()
        enc = tok.encode(text, add_special_tokens=False)
        questions = sentences(text)
        targets = lognormal_lengths(ROWS[lang], *LENGTHS[lang], rng)
        got = []
        for target in targets:
            question = rng.choice(ASK[lang]).format(rng.choice(questions))
            overhead = len(tok.encode(render(question, ""), add_special_tokens=False).ids)
            budget = max(1, target - overhead)
            start = rng.randrange(0, len(enc.ids) - budget - 1)
            begin, end = enc.offsets[start][0], enc.offsets[start + budget - 1][1]
            answer = text[begin:end].strip() or text[begin:begin + 8]
            n = len(tok.encode(render(question, answer), add_special_tokens=False).ids)
            while n > target and len(answer) > 1:  # re-tokenizing at the cut can merge differently: trim to fit
                answer = answer[:-1]
                n = len(tok.encode(render(question, answer), add_special_tokens=False).ids)
            rows.append({"instruction": question, "input": "", "output": answer})
            got.append(n)
        lengths[lang] = got
    identity = json.loads(IDENTITY.read_text(encoding="utf-8"))
    lengths["identity"] = [len(tok.encode(render(r["instruction"] + (f"\n{r['input']}" if r.get("input") else ""),
                                                 r["output"]), add_special_tokens=False).ids) for r in identity]
    rows += identity
    return rows, {k: describe(v) for k, v in {**lengths, "all": sum(lengths.values(), [])}.items()}


def describe(values: list[int]) -> dict:
    s = sorted(values)
    return {"rows": len(s), "tokens": sum(s), "mean": round(statistics.fmean(s), 1),
            "std": round(statistics.pstdev(s), 1), "min": s[0], "median": s[len(s) // 2],
            "p95": s[min(len(s) - 1, math.ceil(0.95 * len(s)) - 1)], "max": s[-1]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seeds-dir", type=Path, default=HERE.parent.parent / "shared" / "seeds")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    rows, stats = build(args.seed, args.seeds_dir)
    args.out.write_text(json.dumps(rows, ensure_ascii=False, indent=0) + "\n", encoding="utf-8")
    stats["epochs"] = 3
    stats["tokens_3_epochs"] = 3 * stats["all"]["tokens"]
    stats["source"] = {"seed": args.seed, "lengths": "ms-swift docs, Supported models and datasets: Statistic (token)",
                       "target": {k: dict(zip(("mean", "std", "min", "max"), v)) for k, v in LENGTHS.items()}}
    args.out.with_suffix(".stats.json").write_text(json.dumps(stats, indent=1) + "\n")
    print(json.dumps(stats, indent=1))


if __name__ == "__main__":
    main()
