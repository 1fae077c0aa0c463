"""Evaluation probes: held-out questions with what a right answer contains (data/probes.jsonl), and the seeds' own
question shown first."""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable

from persona.data import PLACEHOLDER, DatasetError, Identity, Problem, language, read_jsonl

SHOWCASE = "showcase"  # shown first in the tables, never scored: the seeds' own questions, which the training data has


@dataclass(frozen=True)
class Probe:
    kind: str
    question: str
    expect_any: tuple[str, ...]
    forbid_any: tuple[str, ...] = ()
    history: tuple[dict, ...] = ()

    @property
    def is_identity(self) -> bool:
        return self.kind.startswith("identity") or self.kind in ("adversarial", "multi_turn")

    def filled(self, identity: Identity) -> "Probe":
        """{{NAME}}/{{AUTHOR}} in expectations match the identity in either language; the question in its own."""
        expect: list[str] = []
        for e in self.expect_any:
            expect += [identity.fill(e, "zh"), identity.fill(e, "en")] if PLACEHOLDER.search(e) else [e]
        return replace(self, question=identity.fill(self.question, language(self.question)),
                       expect_any=tuple(dict.fromkeys(expect)))

    def as_row(self) -> dict:
        row = {"kind": self.kind, "question": self.question, "expect_any": list(self.expect_any)}
        if self.forbid_any:
            row["forbid_any"] = list(self.forbid_any)
        if self.history:
            row["history"] = list(self.history)
        return row


PROBE_FORMAT = '{"kind": "identity_en", "question": "...", "expect_any": ["...", ...]}'
HISTORY_ROLES = ("user", "assistant")


def _strings(row: dict, key: str, bad) -> tuple[str, ...] | None:
    """row[key] as a tuple of non-blank strings; None, with the problem recorded, if it is anything else. A string
    must not stand for a list: each of its letters would then be an expected (or forbidden) answer."""
    value = row[key]
    if isinstance(value, str):
        bad(f"'{key}' must be a list of strings, got the string {value!r} (each letter would count as an answer)",
            f'write "{key}": {json.dumps([value], ensure_ascii=False)}')
        return None
    if not isinstance(value, list):
        bad(f"'{key}' must be a list of strings, got {type(value).__name__}", f'write "{key}": ["...", ...]')
        return None
    for k, item in enumerate(value):
        if not isinstance(item, str):
            bad(f"{key}[{k}] must be a string, got {type(item).__name__}",
                f"write each entry of '{key}' as a quoted string")
            return None
        if not item.strip():
            bad(f"{key}[{k}] is empty (every answer contains the empty string)",
                "remove it, or write the text to look for")
            return None
    return tuple(value)


def _probe(row: object, where: tuple[str, int], problems: list[Problem]) -> Probe | None:
    file, line = where

    def bad(problem: str, fix: str) -> None:
        problems.append(Problem(file, line, problem, fix))

    if not isinstance(row, dict):
        bad(f"a probe must be a JSON object, got {type(row).__name__}", f"write {PROBE_FORMAT}")
        return None
    missing = [k for k in ("kind", "question", "expect_any") if k not in row or row[k] in ("", [], None)]
    if missing:
        bad(f"missing {', '.join(missing)}", f"write {PROBE_FORMAT}")
        return None
    for key in ("kind", "question"):
        if not isinstance(row[key], str):
            bad(f"'{key}' must be a string, got {type(row[key]).__name__}", f'write "{key}" as a quoted string')
            return None
        if not row[key].strip():
            bad(f"empty '{key}'", f"write the {key}" + (" (identity_en, identity_zh, adversarial, multi_turn, "
                                                         "stability or general)" if key == "kind" else " text"))
            return None
    expect = _strings(row, "expect_any", bad)
    if expect is None:
        return None
    forbid: tuple[str, ...] = ()
    if row.get("forbid_any") is not None:
        forbid = _strings(row, "forbid_any", bad)
        if forbid is None:
            return None
    history = row.get("history") or []
    if not isinstance(history, list):
        bad(f"'history' must be a list of messages, got {type(history).__name__}",
            'write "history": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]')
        return None
    for k, m in enumerate(history):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or not m["content"].strip():
            bad(f"history[{k}] needs a non-empty string 'content'", 'write {"role": "user", "content": "..."}')
            return None
        if m.get("role") not in HISTORY_ROLES:
            bad(f"history[{k}] has role {m.get('role')!r}", f"use {' or '.join(HISTORY_ROLES)}")
            return None
    return Probe(row["kind"], row["question"], expect, forbid, tuple(history))


def load_probes(path: str | Path) -> list[Probe]:
    """The probes of a JSONL file; DatasetError lists every problem (file:line: problem — fix), types included."""
    path = Path(path)
    problems: list[Problem] = []
    probes: list[Probe] = []
    rows = read_jsonl(path, problems, fix="write one JSON object per line",
                      too_deep_fix=f"a probe is one object of strings and lists of strings: write {PROBE_FORMAT}")
    for n, row in rows:
        probe = _probe(row, (str(path), n), problems)
        if probe is not None:
            probes.append(probe)
    if problems:
        raise DatasetError(problems)
    return probes


def showcase_probes(identity: Identity, own_identity: Iterable[str] = ()) -> list[Probe]:
    """The seeds' own first question, in both languages: shown at the top of the before/after table, not scored
    (the training data asks exactly this, so it cannot be a held-out probe)."""
    expect = tuple(identity.markers())
    return [Probe(SHOWCASE, "你是谁?", expect, tuple(own_identity)), Probe(SHOWCASE, "Who are you?", expect,
                                                                       tuple(own_identity))]


def identity_system_prompt(identity: Identity, base_system: str = "You are a helpful assistant.") -> str:
    """The tutorials' 'prompt-only' alternative: the identity stated in the system prompt, no training."""
    return (f"{base_system} You are {identity.name_en}, a large language model developed and maintained by "
            f"{identity.author_en}. 你是 {identity.name_zh},由 {identity.author_zh} 开发和维护的大语言模型。")
