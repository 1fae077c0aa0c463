"""General data mixed into identity training so the model does not forget everything else.

Two sources, as the tutorials suggest:
- `hub`: Alpaca datasets from ModelScope (the seeds' `AI-ModelScope/alpaca-gpt4-data-zh#500`);
- `replay`: offline self-distillation. The base model answers a shipped set of general prompts and
  those answers become training targets, so the adapter learns the identity while staying close to
  the base model elsewhere. Answers are cached by (base weights, prompts, generation settings); a cache file that
  does not match the sha256 on its first line, or that does not answer exactly the prompts asked, is discarded and
  the answers decoded again, with one line saying so.
"""
from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

from persona.data import EXTRA_PREFIX, HUB_PREFIX, Problem, DatasetError, Sample, language, read_jsonl
from persona.distill import REPLAY_CHANNEL
from persona.models import BaseModel
from persona.storage import atomic_write_text


class MixingError(RuntimeError):
    """General data could not be obtained; the message says what to do."""


def read_prompts(path: Path) -> list[str]:
    """The prompts of a JSONL file of {"prompt": ...} rows, read as the training files are (persona.data.read_jsonl:
    FIFOs, oversized files, deep nesting and duplicate keys are located problems)."""
    problems, prompts = [], []
    for n, row in read_jsonl(Path(path), problems, fix='write {"prompt": "..."}'):
        if isinstance(row, dict) and isinstance(row.get("prompt"), str) and row["prompt"].strip():
            prompts.append(row["prompt"])
        else:
            problems.append(Problem(str(path), n, "not a JSON object with a 'prompt'", 'write {"prompt": "..."}'))
    if problems:
        raise DatasetError(problems)
    return prompts


def pick(items: list, n: int, seed: int) -> list:
    """A deterministic sample of n items: the first n of one seeded shuffle, so a larger n keeps every item a
    smaller one picked (adding identity rows adds replay rows; it does not draw a new set)."""
    if n >= len(items):
        return list(items)
    order = list(items)
    random.Random(seed).shuffle(order)
    return order[:n]


def pick_by_language(prompts: list[str], wanted: dict[str, int], seed: int) -> list[str]:
    """`wanted[lang]` prompts of each language, so general data follows the identity data's languages.

    Identity rows in Chinese with general rows mostly in English teach "a Chinese question gets the identity
    answer"; matching the languages keeps the two apart. A language the prompt set lacks falls back to the others.
    """
    by_lang: dict[str, list[str]] = {}
    for p in prompts:
        by_lang.setdefault(language(p), []).append(p)
    chosen: list[str] = []
    for lang, n in sorted(wanted.items()):
        chosen += pick(by_lang.get(lang, []), n, seed)
    short = sum(wanted.values()) - len(chosen)
    if short > 0:
        taken = set(chosen)
        rest = [p for p in prompts if p not in taken]
        chosen += pick(rest, short, seed)
    return chosen


# The replay prompts are short and their answers capped, so a decoding step costs about the same for 16 rows as for
# 128, on a CPU too: 94 prompts took 46 s in batches of 16 and 18 s in one (BENCHMARKS "Replay answers in one batch").
REPLAY_BATCH_SIZE = 128


def replay_cache_file(cache_dir: Path, base: BaseModel, prompts: list[str], system: str, max_new_tokens: int,
                      batch_size: int, decoding: list) -> Path:
    """Where the replay answers for these settings are kept. The batch size is in the key: in bf16, the padding of
    a batch can change a greedy answer; so are the device and the dtype (`decoding`,
    persona.inference.decoding_settings)."""
    what = [base.weights_sha256, prompts, system, max_new_tokens, batch_size, decoding]
    key = hashlib.sha256(json.dumps(what).encode())
    return Path(cache_dir) / f"replay-{key.hexdigest()[:16]}.jsonl"


RECORD_KEY = "persona_replay_sha256"  # the first line's key: the sha256 of the UTF-8 text after that line


def write_replay_cache(cache: Path, rows: list[dict]) -> None:
    body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    record = {RECORD_KEY: hashlib.sha256(body.encode()).hexdigest(), "rows": len(rows)}
    atomic_write_text(cache, json.dumps(record) + "\n" + body)


def read_replay_cache(cache: Path, prompts: list[str]) -> tuple[list[dict] | None, str | None]:
    """(the cached rows, None), or (None, what is wrong): the text after the first line must have the sha256 that
    line records, and the rows must answer exactly `prompts`, in order (the file name is a hash of them). A file
    written before the record (no first line of it) is checked by its rows alone."""
    try:
        text = cache.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        return None, f"unreadable ({type(exc).__name__})"
    first, _, body = text.partition("\n")
    try:
        record = json.loads(first) if first.strip() else None
    except ValueError:
        record = None  # a damaged first line: the rows' check below says what is wrong
    if isinstance(record, dict) and RECORD_KEY in record:
        if hashlib.sha256(body.encode()).hexdigest() != record[RECORD_KEY]:
            return None, f"its rows do not match the sha256 on its first line ({len(body.encode()):,} bytes of rows)"
    else:
        body = text
    rows = []
    for n, line in enumerate(body.splitlines(), 1):
        try:
            row = json.loads(line)
        except ValueError:
            return None, f"line {n} is not JSON"
        if not (isinstance(row, dict) and isinstance(row.get("prompt"), str) and isinstance(row.get("answer"), str)):
            return None, f"line {n} is not a {{\"prompt\", \"answer\"}} row"
        rows.append(row)
    if [r["prompt"] for r in rows] != list(prompts):
        return None, f"it answers {len(rows)} prompts, not the {len(prompts)} asked"
    return rows, None


def replay_samples(base: BaseModel, prompts: list[str], cache_dir: Path, system: str, device: str | None = None,
                   max_new_tokens: int = 96, batch_size: int = REPLAY_BATCH_SIZE, log=print) -> list[Sample]:
    """The base model's own greedy answers to `prompts`, as training samples (cached). `device`: where to decode
    them on a cache miss (default: the GPU if there is one)."""
    from persona.inference import decoding_settings
    from persona.recipe import detect_device

    device = device or detect_device()
    cache = replay_cache_file(cache_dir, base, prompts, system, max_new_tokens, batch_size, decoding_settings(device))
    rows = None
    if cache.exists():
        rows, problem = read_replay_cache(cache, prompts)
        if rows is not None:
            log(f"replay: {len(rows)} cached answers from {cache}")
        else:
            cache.unlink(missing_ok=True)
            log(f"replay: the cached answers {cache} are damaged: {problem}. Discarded them; the base model answers "
                "again.")
    if rows is None:
        from persona.inference import Chat

        log(f"replay: the base model answers {len(prompts)} general prompts (cached afterwards)")
        chat = Chat(base.path, None, base.template, system, device)
        answers = chat.answer([(p, ()) for p in prompts], max_new_tokens=max_new_tokens, batch_size=batch_size,
                              on_batch=lambda done, total: log(f"replay: {done}/{total}"))
        rows = [{"prompt": p, "answer": a} for p, a in zip(prompts, answers)]
        write_replay_cache(cache, rows)
    own = [n.lower() for n in base.own_identity]
    samples = []
    for n, r in enumerate(rows, 1):
        # An answer in which the base model names itself would teach the old identity back: leave it out.
        if r["answer"].strip() and not any(o in r["answer"].lower() for o in own):
            samples.append(Sample([{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["answer"]}],
                                  f"{EXTRA_PREFIX}replay:{cache.name}", n, channel=REPLAY_CHANNEL))
    return samples


def hub_spec(spec: str) -> tuple[str, int | None]:
    """'AI-ModelScope/alpaca-gpt4-data-zh#500' -> (the dataset id, 500), as `swift sft --dataset` writes it;
    without '#N', (the id, None): that dataset's share of the general_ratio rows."""
    dataset_id, sep, count = spec.partition("#")
    if not sep:
        return spec, None
    if not count.isdigit() or int(count) < 1:
        raise MixingError(f"hub dataset {spec!r}: after '#' comes the number of rows to take, e.g. "
                          f"'{dataset_id}#500'")
    return dataset_id, int(count)


def hub_samples(dataset_specs: list[str], n: int, seed: int) -> list[Sample]:
    """Alpaca rows (instruction/input/output) from ModelScope datasets: N from each 'id#N' (all of it when it has
    fewer), and n spread over the ones without a count. Rows with an empty question or answer are left out here;
    load_dataset drops those that fail its checks (hub rows are not the user's to fix)."""
    from modelscope.msdatasets import MsDataset

    parsed = [hub_spec(s) for s in dataset_specs]
    uncounted = sum(1 for _, count in parsed if count is None)
    per = max(1, n // max(1, uncounted))
    samples: list[Sample] = []
    for dataset_id, count in parsed:
        try:
            ds = MsDataset.load(dataset_id, split="train")
        except Exception as exc:  # the hub client raises many kinds; one line is what the user needs
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise MixingError(f"Could not load '{dataset_id}' from ModelScope: {first}. Without hub access, "
                              "use general_mix: replay (offline self-distillation) or general_mix: none.") from None
        rows = [dict(r) for r in ds]
        for i, r in enumerate(pick(rows, per if count is None else count, seed), 1):
            query = (r.get("instruction") or "").strip()
            if (r.get("input") or "").strip():
                query += "\n" + r["input"].strip()
            answer = (r.get("output") or "").strip()
            if query and answer:
                samples.append(Sample([{"role": "user", "content": query}, {"role": "assistant", "content": answer}],
                                      f"{HUB_PREFIX}{dataset_id}", i))
    return samples
