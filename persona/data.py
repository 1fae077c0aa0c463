"""Read, validate and normalize training data: Alpaca JSON/JSONL and chat JSONL, with located errors.

Every problem is reported as `file:line: problem — how to fix`, all at once, before anything is written.
The normalized form is ms-swift's `messages` format, one JSON object per line.

Why this module is long: most of it is the located error for each way a row can be malformed (the reliability
tests try 30 of them).
"""
from __future__ import annotations

import difflib
import errno
import functools
import hashlib
import json
import os
import re
import stat
import sys
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
# Hostile files: every step is linear in the file's size (line numbers are counted by one forward cursor, not from
# the file's start per record: that was quadratic, 76 s for a 12 MB one-line file); a FIFO or device is refused from
# its stat() before it is opened (opening a FIFO to read waits for a writer, forever); too deep nesting and duplicate
# keys are located problems, not a RecursionError or a silently dropped value.

# Bigger data files are refused before they are read (README "Hostile files"). Parsing is linear (a 50 MB one-line
# file parses in ~3 s), but the checks after it are not free: each row's question is compared with the probes and its
# tokens are counted, ~0.3 ms a row, so `persona validate` takes 31 s over a 16 MiB file (101,736 rows, 2 CPU cores)
# and would take about 90 s over 50 MB, before a training of days on a CPU. The identity data the tutorials describe is
# 50-100 rows, a few KB; general data comes from general_mix (replay or hub), not from a file here.
MAX_FILE_BYTES = 16 * 2**20
_TOO_BIG_FIX = (f"keep a data file under {MAX_FILE_BYTES // 2**20} MiB: identity data needs 50-100 rows (a few KB), "
                "and general data comes from general_mix (replay or hub), not from a file in the data folder")

_KINDS = ((stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))
_NOT_REGULAR_FIX = "save the records in a regular .json or .jsonl file and name that file"


def _not_regular(path: Path) -> Problem | None:
    """Why `path` is not a regular file that can be read, from os.stat alone (nothing is opened); None if it is one."""
    file = str(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            return Problem(file, 0, f"a symbolic link to {os.readlink(path)}, which does not exist",
                           "point the link at the data file, or put the file itself here")
        return Problem(file, 0, "file not found", "check the path in the dataset configuration")
    except OSError as e:
        if e.errno == errno.ELOOP:
            return Problem(file, 0, "a symbolic link loop (following the link leads back to it)",
                           "replace the link with the data file itself, or point it at a regular file")
        return Problem(file, 0, f"cannot be read ({e.strerror})", "check the file's and its folders' permissions")
    if stat.S_ISDIR(st.st_mode):
        return Problem(file, 0, "a folder, not a file", "name a .json or .jsonl file inside it")
    if not stat.S_ISREG(st.st_mode):
        kind = next((name for test, name in _KINDS if test(st.st_mode)), "not a regular file")
        return Problem(file, 0, f"{kind}, not a regular file: it was not opened (reading one can wait forever)",
                       _NOT_REGULAR_FIX)
    if st.st_size > MAX_FILE_BYTES:
        return _too_big(file, st.st_size)
    return None


def _too_big(file: str, size: int | None) -> Problem:
    got = f"{size / 2**20:.1f} MiB" if size is not None else "more than that (it grew while being read)"
    return Problem(file, 0, f"{got}, over the {MAX_FILE_BYTES // 2**20} MiB limit for a data file; it was not read",
                   _TOO_BIG_FIX)


def read_bytes(path: Path, problems: list[Problem]) -> bytes | None:
    """The bytes of a regular file, or None with the problem recorded. The file is checked before it is opened, and
    opened non-blocking and checked again, so a FIFO swapped in between cannot hang the read either."""
    bad = _not_regular(path)
    if bad is None:
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        except OSError as e:
            bad = Problem(str(path), 0, f"cannot be read ({e.strerror})", "check the file's permissions")
        else:
            with os.fdopen(fd, "rb") as fh:
                if stat.S_ISREG(os.fstat(fd).st_mode):
                    raw = fh.read(MAX_FILE_BYTES + 1)  # a file that grew since its stat() is cut off here
                    if len(raw) <= MAX_FILE_BYTES:
                        return raw
                    bad = _too_big(str(path), None)
                else:
                    bad = Problem(str(path), 0, "changed into something other than a regular file while being "
                                  "opened", _NOT_REGULAR_FIX)
    problems.append(bad)
    return None


def _read_text(path: Path, problems: list[Problem]) -> str | None:
    raw = read_bytes(path, problems)
    if raw is None:
        return None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        problems.append(Problem(str(path), line, f"not UTF-8 (byte 0x{raw[e.start]:02x})",
                                "save the file as UTF-8"))
        return None


class _Lines:
    """Line and column of positions in `text`, asked in increasing order: each character is looked at once."""

    def __init__(self, text: str, line: int = 1):
        self.text, self.pos, self.line, self.start = text, 0, line, 0

    def at(self, pos: int) -> tuple[int, int]:
        if pos > self.pos:
            n = self.text.count("\n", self.pos, pos)
            if n:
                self.line += n
                self.start = self.text.rfind("\n", self.pos, pos) + 1
            self.pos = pos
        return self.line, pos - self.start + 1


class _Duplicates:
    """object_pairs_hook that notes objects with a key twice (plain json keeps the last value without a word)."""

    def __init__(self):
        self.seen = False

    def __call__(self, pairs: list) -> dict:
        obj = dict(pairs)
        if len(obj) != len(pairs):
            self.seen = True
        return obj


_TOKEN = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[{}\[\]]', re.S)  # a string (keys are strings then ':') or a bracket
_COLON = re.compile(r"\s*:")


def _duplicate_keys(text: str, start: int, end: int) -> list[tuple[int, str]]:
    """(position, key) of each key repeated in its own object, in text[start:end] (one decoded JSON value)."""
    stack: list[set | None] = []  # the keys of each open object; None for an array
    found = []
    for m in _TOKEN.finditer(text, start, end):
        tok = m.group()
        if tok == "{":
            stack.append(set())
        elif tok == "[":
            stack.append(None)
        elif tok in ("}", "]"):
            if stack:
                stack.pop()
        elif stack and stack[-1] is not None and _COLON.match(text, m.end()):
            key = json.loads(tok)
            if key in stack[-1]:
                found.append((m.start(), key))
            stack[-1].add(key)
    return found


SKIP = object()  # a value that was read but is not used (its problems are recorded)
TOO_DEEP_FIX = "a record is one object of strings (and lists of messages or [question, answer] pairs); remove the " \
               "extra brackets"


def _decode(dec: json.JSONDecoder, dups: _Duplicates, text: str, i: int, where: tuple[str, _Lines],
            problems: list[Problem], fix: str) -> tuple[object, int] | None:
    """One JSON value at text[i:] and where it ends; SKIP for the value when it has duplicate keys (located in
    `problems`); None when it is nested too deeply (located; where it ends is unknown). Raises json.JSONDecodeError
    for invalid JSON (the caller knows what to say)."""
    file, lines = where
    line = lines.at(i)[0]
    dups.seen = False
    try:
        obj, end = dec.raw_decode(text, i)
    except RecursionError:
        problems.append(Problem(file, line, f"JSON nested too deeply (more than about {sys.getrecursionlimit()} "
                                            "levels of [ and {)", fix))
        return None
    if dups.seen:
        for pos, key in _duplicate_keys(text, i, end):
            where_line, where_col = lines.at(pos)
            problems.append(Problem(file, where_line, f"duplicate key {key!r} at column {where_col}: JSON would keep "
                                                      "only the last value", f"keep one {key!r} per object"))
        return SKIP, end
    return obj, end


def _json_array_items(path: Path, text: str, problems: list[Problem]) -> list[tuple[int, object]]:
    """Each element of a top-level JSON array with the line it starts on."""
    dups = _Duplicates()
    dec = json.JSONDecoder(object_pairs_hook=dups)
    lines = _Lines(text)
    items: list[tuple[int, object]] = []
    i = len(text) - len(text.lstrip())
    if not text.startswith("[", i):
        problems.append(Problem(str(path), lines.at(i)[0], "a .json dataset must be a JSON array of records",
                                "wrap the records in [ ... ], or save one record per line as .jsonl"))
        return items
    i += 1
    ws = re.compile(r"\s*")
    while True:
        i = ws.match(text, i).end()
        if text.startswith("]", i):
            return items
        try:
            got = _decode(dec, dups, text, i, (str(path), lines), problems, TOO_DEEP_FIX)
        except json.JSONDecodeError as e:
            problems.append(Problem(str(path), e.lineno, f"invalid JSON at column {e.colno}: {e.msg}",
                                    "fix the JSON syntax (a missing comma, quote or bracket is typical)"))
            return items
        if got is None:  # too deep: where it ends is unknown
            return items
        obj, end = got
        if obj is not SKIP:
            items.append((lines.at(i)[0], obj))
        i = ws.match(text, end).end()
        if text.startswith(",", i):
            i = ws.match(text, i + 1).end()
            if text.startswith("]", i):
                problems.append(Problem(str(path), lines.at(i)[0], "invalid JSON: trailing comma before ']'",
                                        "remove the comma after the last record"))
                return items
        elif not text.startswith("]", i):
            line, col = lines.at(i)
            problems.append(Problem(str(path), line, f"invalid JSON at column {col}: expected ',' or ']'",
                                    "separate records with commas and close the array with ]"))
            return items


# Not str.splitlines: it also splits at U+2028 and U+0085, which are valid inside JSON strings.
_LINE_BREAK = re.compile(r"\r\n?|\n")


def read_jsonl(path: Path, problems: list[Problem], fix: str = "each line of a .jsonl file must be one complete "
               "JSON object", too_deep_fix: str = TOO_DEEP_FIX) -> list[tuple[int, object]]:
    """(line, value) of each non-blank line of a JSON Lines file; unreadable files and lines are recorded problems."""
    text = _read_text(path, problems)
    return [] if text is None else _jsonl_items(path, text, problems, fix, too_deep_fix)


def _jsonl_items(path: Path, text: str, problems: list[Problem],
                 fix: str = "each line of a .jsonl file must be one complete JSON object",
                 too_deep_fix: str = TOO_DEEP_FIX) -> list[tuple[int, object]]:
    dups = _Duplicates()
    dec = json.JSONDecoder(object_pairs_hook=dups)
    ws = re.compile(r"[ \t\n\r]*")  # JSON's whitespace, as json.loads allows around a value
    items = []
    for n, line in enumerate(_LINE_BREAK.split(text), 1):
        if not line.strip():
            continue
        try:
            got = _decode(dec, dups, line, ws.match(line).end(), (str(path), _Lines(line, n)), problems, too_deep_fix)
            if got is not None and got[0] is not SKIP:
                obj, end = got
                if ws.match(line, end).end() != len(line):
                    raise json.JSONDecodeError("Extra data", line, ws.match(line, end).end())
                items.append((n, obj))
        except json.JSONDecodeError as e:
            problems.append(Problem(str(path), n, f"invalid JSON at column {e.colno}: {e.msg}", fix))
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
    # Upper bounds of ratio() first, the same answer sooner: a character of `a` that `b` lacks matches nothing.
    if 2.0 * (len(a) - len(a.translate(_deleting(b)))) / (len(a) + len(b)) < 0.9:
        return False
    m = difflib.SequenceMatcher(None, a, b)
    return m.quick_ratio() >= 0.9 and m.ratio() >= 0.9


@functools.lru_cache(maxsize=4096)
def _deleting(text: str) -> dict:
    """str.translate table removing the characters of `text`."""
    return dict.fromkeys(map(ord, text))


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

    # Probes by the length of their key: _similar needs lengths within 2, so each question is compared with the few
    # probes of about its length (in the probes' order, as before), not all of them (300k rows x 200 probes: 3 min).
    by_length: dict[int, list[tuple[int, str, str]]] = {}
    for k, q in enumerate(eval_questions):
        key = normalize_question(q)
        by_length.setdefault(len(key), []).append((k, key, q))
    for s in unique:  # every user turn, the history's too: a probe in a history is seen in training as well
        for asked in [m["content"] for m in s.messages if m["role"] == "user"]:
            mine = normalize_question(asked)
            near = sorted(c for n in range(len(mine) - 2, len(mine) + 3) for c in by_length.get(n, ()))
            hit = next((q for _, key, q in near if _similar(mine, key)), None)
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
