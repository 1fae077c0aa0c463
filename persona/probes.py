"""Evaluation probes: held-out questions with what a right answer contains (data/probes.jsonl), and the seeds' own
question shown first."""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable

from persona.data import PLACEHOLDER, DatasetError, Identity, Problem, language

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


def load_probes(path: str | Path) -> list[Probe]:
    path = Path(path)
    problems: list[Problem] = []
    probes: list[Probe] = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(Problem(str(path), n, f"invalid JSON at column {e.colno}: {e.msg}",
                                    "write one JSON object per line"))
            continue
        missing = [k for k in ("kind", "question", "expect_any") if not row.get(k)]
        if missing:
            problems.append(Problem(str(path), n, f"missing {', '.join(missing)}",
                                    'write {"kind": ..., "question": ..., "expect_any": [...]}'))
            continue
        probes.append(Probe(row["kind"], row["question"], tuple(row["expect_any"]),
                            tuple(row.get("forbid_any") or ()), tuple(row.get("history") or ())))
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
