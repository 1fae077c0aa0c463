"""Read, validate and normalize training data: Alpaca JSON/JSONL and chat JSONL, with located errors.

Every problem is reported as `file:line: problem — how to fix`, all at once, before anything is written.
The normalized form is ms-swift's `messages` format, one JSON object per line.

Why this module is long: most of it is the located error for each way a row can be malformed (the reliability
tests try 30 of them).
"""
from __future__ import annotations

import difflib
import hashlib
import json
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from persona.distill import REPLAY_CHANNEL

EXTRA_PREFIX = "mix:"  # file names of samples added by general-data mixing
HUB_PREFIX = EXTRA_PREFIX + "hub:"  # ModelScope rows: dropped, not raised, when they fail a check

ROLES = ("system", "user", "assistant")
PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_]+)\s*\}\}")


def language(text: str) -> str:
    return "zh" if any("\u4e00" <= ch <= "\u9fff" for ch in text) else "en"


@dataclass(frozen=True)
class Identity:
    """Who the model becomes. Fills {{NAME}} and {{AUTHOR}}, in the language of the question (as ms-swift's self-cognition)."""

    name_zh: str = "Swift-Robot"
    name_en: str = "Swift-Robot"
    author_zh: str = "CSDN 迪菲赫尔曼"
    author_en: str = "CSDN Diffie-Hellman"

    def values(self, lang: str) -> dict[str, str]:
        return {"NAME": getattr(self, f"name_{lang}"), "AUTHOR": getattr(self, f"author_{lang}")}

    def fill(self, text: str, lang: str) -> str:
        values = self.values(lang)
        return PLACEHOLDER.sub(lambda m: values.get(m.group(1).upper(), m.group(0)), text)

    def markers(self) -> tuple[str, ...]:
        """Strings any of which marks an answer as the new identity's."""
        return tuple(dict.fromkeys([self.author_zh, self.author_en, self.name_zh, self.name_en]))


@dataclass(frozen=True)
class Problem:
    file: str
    line: int
    problem: str
    fix: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.problem} — {self.fix}"


class DatasetError(ValueError):
    """One or more problems in the input files; nothing was written."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        head = f"{len(problems)} problem(s) in the training data; nothing was trained:"
        super().__init__("\n".join([head, *map(str, problems)]))


@dataclass
class Sample:
    """One training conversation and where it came from."""

    messages: list[dict]
    file: str
    line: int
    tokens: int | None = None
    channel: str | None = None  # ms-swift's per-row `channel`; "replay" rows are trained by persona.distill

    @property
    def question(self) -> str:
        return next(m["content"] for m in reversed(self.messages) if m["role"] == "user")

    @property
    def answer(self) -> str:
        return self.messages[-1]["content"]

    @property
    def is_replay(self) -> bool:
        """An answer of the base model itself (general-data replay), trained by persona.distill."""
        return self.channel == REPLAY_CHANNEL


@dataclass
class Dataset:
    samples: list[Sample]
    sources: dict[str, int] = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    dropped: list[Problem] = field(default_factory=list)  # hub rows left out, and why

    def records(self) -> list[dict]:
        """ms-swift's messages format; replay rows are marked with ms-swift's `channel` field."""
        return [{"messages": s.messages, **({"channel": s.channel} if s.channel else {})} for s in self.samples]

    @property
    def version(self) -> str:
        """Content hash of the normalized records and the curation config: formatting and key order do not change it."""
        canon = json.dumps([self.records(), self.config], ensure_ascii=False, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canon.encode()).hexdigest()

    def write_jsonl(self, path: Path) -> None:
        with open(path, "w", encoding="utf-8") as fh:
            for r in self.records():
                fh.write(json.dumps(r, ensure_ascii=False) + "\n")


# --- reading --------------------------------------------------------------------------------

def _line_of(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _read_text(path: Path, problems: list[Problem]) -> str | None:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        problems.append(Problem(str(path), line, f"not UTF-8 (byte 0x{raw[e.start]:02x})",
                                "save the file as UTF-8"))
        return None


def _json_array_items(path: Path, text: str, problems: list[Problem]) -> list[tuple[int, object]]:
    """Each element of a top-level JSON array with the line it starts on."""
    dec = json.JSONDecoder()
    items: list[tuple[int, object]] = []
    i = len(text) - len(text.lstrip())
    if not text.startswith("[", i):
        problems.append(Problem(str(path), _line_of(text, i), "a .json dataset must be a JSON array of records",
                                "wrap the records in [ ... ], or save one record per line as .jsonl"))
        return items
    i += 1
    ws = re.compile(r"\s*")
    while True:
        i = ws.match(text, i).end()
        if text.startswith("]", i):
            return items
        try:
            obj, end = dec.raw_decode(text, i)
        except json.JSONDecodeError as e:
            problems.append(Problem(str(path), e.lineno, f"invalid JSON at column {e.colno}: {e.msg}",
                                    "fix the JSON syntax (a missing comma, quote or bracket is typical)"))
            return items
        items.append((_line_of(text, i), obj))
        i = ws.match(text, end).end()
        if text.startswith(",", i):
            i = ws.match(text, i + 1).end()
            if text.startswith("]", i):
                problems.append(Problem(str(path), _line_of(text, i), "invalid JSON: trailing comma before ']'",
                                        "remove the comma after the last record"))
                return items
        elif not text.startswith("]", i):
            line, col = _line_of(text, i), i - text.rfind("\n", 0, i)
            problems.append(Problem(str(path), line, f"invalid JSON at column {col}: expected ',' or ']'",
                                    "separate records with commas and close the array with ]"))
            return items


def _jsonl_items(path: Path, text: str, problems: list[Problem]) -> list[tuple[int, object]]:
    items = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            items.append((n, json.loads(line)))
        except json.JSONDecodeError as e:
            problems.append(Problem(str(path), n, f"invalid JSON at column {e.colno}: {e.msg}",
                                    "each line of a .jsonl file must be one complete JSON object"))
    return items


def _to_messages(item: object, where: tuple[str, int], problems: list[Problem]) -> list[dict] | None:
    file, line = where

    def bad(problem: str, fix: str) -> None:
        problems.append(Problem(file, line, problem, fix))

    if not isinstance(item, dict):
        bad(f"a record must be a JSON object, got {type(item).__name__}",
            'write {"instruction": ..., "output": ...} or {"messages": [...]}')
        return None
    if "messages" in item:
        msgs = item["messages"]
        if not isinstance(msgs, list) or not msgs:
            bad("'messages' must be a non-empty list", 'write "messages": [{"role": "user", "content": ...}, ...]')
            return None
        out = []
        for k, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("content"), str):
                bad(f"messages[{k}] needs a string 'content'", 'write {"role": "user", "content": "..."}')
                return None
            if m.get("role") not in ROLES:
                bad(f"messages[{k}] has unknown role {m.get('role')!r}", f"use one of {', '.join(ROLES)}")
                return None
            if not m["content"].strip():
                bad(f"messages[{k}] has empty content", "write the message text, or remove the message")
                return None
            out.append({"role": m["role"], "content": m["content"].strip()})
        if out[-1]["role"] != "assistant":
            bad("the last message must be the assistant's answer", 'end "messages" with {"role": "assistant", ...}')
            return None
        if not any(m["role"] == "user" for m in out):
            bad("no user message", 'add {"role": "user", "content": "..."} before the answer')
            return None
        return out
    for key in ("instruction", "output"):
        if key not in item:
            bad(f"missing '{key}'", f'add "{key}": "..." to this record (Alpaca format: instruction, input, output)')
            return None
        if not isinstance(item[key], str):
            bad(f"'{key}' must be a string, got {type(item[key]).__name__}", f'write "{key}" as a quoted string')
            return None
        if not item[key].strip():
            bad(f"empty '{key}'", f"write the {'question' if key == 'instruction' else 'answer'} text, or remove the record")
            return None
    for key in ("input", "system"):
        if item.get(key) is not None and not isinstance(item[key], str):
            bad(f"'{key}' must be a string, got {type(item[key]).__name__}", f'write "{key}" as a quoted string')
            return None
    history = item.get("history") or []
    if not isinstance(history, list) or not all(
        isinstance(t, list) and len(t) == 2 and all(isinstance(x, str) for x in t) for t in history
    ):
        bad("'history' must be a list of [question, answer] pairs", 'write "history": [["q1", "a1"], ...]')
        return None
    msgs = [{"role": "system", "content": item["system"].strip()}] if (item.get("system") or "").strip() else []
    for q, a in history:
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    query = item["instruction"].strip()
    if (item.get("input") or "").strip():
        query = f"{query}\n{item['input'].strip()}"
    msgs += [{"role": "user", "content": query}, {"role": "assistant", "content": item["output"].strip()}]
    return msgs


def read_file(path: Path, problems: list[Problem]) -> list[Sample]:
    path = Path(path)
    if not path.exists():
        problems.append(Problem(str(path), 0, "file not found", "check the path in the dataset configuration"))
        return []
    text = _read_text(path, problems)
    if text is None:
        return []
    items = _json_array_items(path, text, problems) if path.suffix == ".json" else _jsonl_items(path, text, problems)
    samples = []
    for line, item in items:
        msgs = _to_messages(item, (str(path), line), problems)
        if msgs is not None:
            channel = item.get("channel") if isinstance(item, dict) else None
            samples.append(Sample(msgs, str(path), line, channel=channel if isinstance(channel, str) else None))
    return samples


def normalize_question(text: str) -> str:
    """Lowercase, NFKC, no punctuation or spaces: the key for duplicate and leak checks."""
    text = unicodedata.normalize("NFKC", text).lower()
    return "".join(ch for ch in text if ch.isalnum())


def _similar(a: str, b: str) -> bool:
    """Near-exact: equal after normalization, or differing by a character or two."""
    if a == b:
        return True
    if min(len(a), len(b)) < 8 or abs(len(a) - len(b)) > 2:
        return False
    return difflib.SequenceMatcher(None, a, b).ratio() >= 0.9


def load_dataset(
    paths: list[Path],
    eval_questions: Iterable[str] = (),
    min_samples: int = 1,
    identity: Identity | None = Identity(),
    own_identity: Iterable[str] = (),
    count_tokens: Callable[[list[dict]], int] | None = None,
    max_length: int | None = None,
    extra: Iterable[Sample] = (),
    config: dict | None = None,
) -> Dataset:
    """Read every file, fill identity placeholders, validate everything, and raise one DatasetError listing all problems.

    `extra` samples (general-data mixing) are validated with the same rules but do not count toward `min_samples`;
    hub rows that fail are dropped (Dataset.dropped) instead of stopping the run.
    """
    problems: list[Problem] = []
    samples: list[Sample] = []
    sources: dict[str, int] = {}
    for p in paths:
        got = read_file(Path(p), problems)
        sources[str(p)] = len(got)
        samples += got
    samples += list(extra)

    for s in samples:
        lang = language(s.question)
        for m in s.messages:
            if identity is not None:
                m["content"] = identity.fill(m["content"], lang)
            for name in {x.group(1) for x in PLACEHOLDER.finditer(m["content"])}:
                problems.append(Problem(s.file, s.line, f"unknown placeholder {{{{{name}}}}}",
                                        "use {{NAME}} or {{AUTHOR}}, which the identity settings fill"))

    seen: dict[str, Sample] = {}
    unique: list[Sample] = []
    for s in samples:
        key = normalize_question(json.dumps(s.messages[:-1], ensure_ascii=False))
        first = seen.get(key)
        if first is None:
            seen[key] = s
            unique.append(s)
        elif first.answer != s.answer:
            problems.append(Problem(s.file, s.line, f"same question as {first.file}:{first.line} with a different answer",
                                    "keep one consistent answer per question"))
        # an exact duplicate is dropped: it adds nothing

    own = [n for n in own_identity if n]
    for s in unique:
        named = [n for n in own if n.lower() in s.answer.lower()]
        if named:
            problems.append(Problem(s.file, s.line, f"the answer names the base model's own identity ({', '.join(named)})",
                                    "answer with the new identity, or leave that name out"))

    held_out = [(normalize_question(q), q) for q in eval_questions]
    for s in unique:  # every user turn, the history's too: a probe in a history is seen in training as well
        for asked in [m["content"] for m in s.messages if m["role"] == "user"]:
            mine = normalize_question(asked)
            hit = next((q for key, q in held_out if _similar(mine, key)), None)
            if hit is not None:
                problems.append(Problem(s.file, s.line, f"training question {asked!r} is (nearly) the evaluation probe "
                                        f"{hit!r}", "remove it from training or from the evaluation probes, so scores "
                                        "stay honest"))
                break

    if count_tokens is not None and max_length:
        for s in unique:
            n = count_tokens(s.messages)
            s.tokens = n
            if n > max_length:
                problems.append(Problem(s.file, s.line, f"{n} tokens, longer than max_length {max_length}",
                                        "shorten the sample or raise max_length"))

    # Hub rows are not the user's to fix: one that fails a check (too long, names the base model, a probe) is left
    # out and counted in Dataset.dropped. The user's own rows stay strict.
    dropped = [p for p in problems if p.file.startswith(HUB_PREFIX)]
    if dropped:
        bad = {(p.file, p.line) for p in dropped}
        unique = [s for s in unique if (s.file, s.line) not in bad]
        problems = [p for p in problems if not p.file.startswith(HUB_PREFIX)]

    kept_own = sum(1 for s in unique if not s.file.startswith(EXTRA_PREFIX))
    if not problems and kept_own < min_samples:
        where = paths[0] if paths else "<no files>"
        problems.append(Problem(str(where), 0, f"only {kept_own} samples; at least {min_samples} are needed",
                                "add question variants (the tutorials recommend 50-100), or train on these anyway "
                                f"with min_samples: {max(kept_own, 1)} (persona.yaml: ops: curated_dataset: config: "
                                f"min_samples: {max(kept_own, 1)})"))
    if problems:
        raise DatasetError(problems)
    return Dataset(unique, sources, config or {}, dropped)
