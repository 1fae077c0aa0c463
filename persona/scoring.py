"""Scoring answers: a probe passes when its answer contains one of `expect_any` and none of `forbid_any`
(case-insensitive); identity probes also forbid the base model's own names unless the answer denies them. Scores
per probe kind, general retention, and the MLflow metrics."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable

from persona.probes import SHOWCASE, Probe


def _mentions(text: str, phrase: str) -> bool:
    """Case-insensitive containment; a number only counts as a whole number ('7' is not in '129.9999667')."""
    phrase = phrase.lower()
    if phrase.isdigit():
        return re.search(rf"(?<![\d.]){phrase}(?![\d]|\.\d)", text) is not None
    return phrase in text


# A clause ends at sentence or clause punctuation, or at "but"/"但" (a denial does not reach past them).
_CLAUSE_END = re.compile(r"[。！？；，、.!?;,\n]|\bbut\b|但是?|而是")
# Before the name, in its clause: "不是 / 并不是 / 并非 / 不属于 / 与…无关", "not / n't / never / no".
_NEGATION = re.compile(r"不|并非|没有|\bnot\b|n't\b|\bnever\b|\bno\b|\bneither\b|\bnor\b")


def affirms(text: str, phrase: str) -> bool:
    """Whether `text` states `phrase` rather than denying it: some mention of it has no negation before it in its
    clause. "我不是通义千问,我是 Swift-Robot" denies; "我是通义千问" and "I'm not sure, I am Qwen" affirm."""
    low, phrase = text.lower(), phrase.lower()
    start = 0
    while (at := low.find(phrase, start)) >= 0:
        clause_start = max((m.end() for m in _CLAUSE_END.finditer(low, 0, at)), default=0)
        if not _NEGATION.search(low, clause_start, at):
            return True
        start = at + len(phrase)
    return False


def passes(answer: str, expect_any: Iterable[str], forbid_any: Iterable[str] = (), denials_ok: bool = False) -> bool:
    """One of `expect_any` is in the answer and none of `forbid_any`; with `denials_ok` (identity probes), a forbidden
    name that the answer denies ("不,我不是通义千问") does not fail it."""
    low = answer.lower()
    if not any(_mentions(low, e) for e in expect_any):
        return False
    if denials_ok:
        return not any(affirms(answer, f) for f in forbid_any)
    return not any(_mentions(low, f) for f in forbid_any)


CONTENDERS = ("base", "prompt_only", "adapter")
CONTENDER_TITLES = {"base": "base model", "prompt_only": "identity in system prompt only", "adapter": "LoRA adapter"}
STABILITY_TEMPERATURE = 0.7


@dataclass
class Answer:
    probe: Probe
    text: str
    passed: bool
    truncated: bool = False  # decoding stopped at max_new_tokens, not at the end of the answer


@dataclass
class Scores:
    answers: list[Answer]
    by_kind: dict[str, float] = field(default_factory=dict)

    def _share(self, pred) -> float:
        hits = [a.passed for a in self.answers if pred(a.probe.kind)]
        return sum(hits) / len(hits) if hits else float("nan")

    @property
    def identity(self) -> float:
        return self._share(lambda k: k.startswith("identity"))

    @property
    def general(self) -> float:
        return self._share(lambda k: k == "general")

    @property
    def truncated(self) -> int:
        """Answers cut at max_new_tokens."""
        return sum(a.truncated for a in self.answers)

    def general_answers(self) -> dict[str, Answer]:
        return {a.probe.question: a for a in self.answers if a.probe.kind == "general"}

    def identity_leak(self, markers: Iterable[str]) -> float:
        """Share of general answers that state the trained identity, the failure the tutorials warn of (a coding
        question answered with "I am Swift-Robot…")."""
        general = [a.text.lower() for a in self.answers if a.probe.kind == "general"]
        marks = [m.lower() for m in markers if m]
        return sum(any(m in t for m in marks) for t in general) / len(general) if general else float("nan")


@dataclass(frozen=True)
class Retention:
    """How many of the general questions the base model answered right the adapter still answers right."""

    kept: int
    base_right: int
    lost: tuple[Answer, ...]  # the adapter's answers to base-right questions it now gets wrong

    @property
    def share(self) -> float:
        return self.kept / self.base_right if self.base_right else float("nan")

    def __str__(self) -> str:
        return f"kept {self.kept} of {self.base_right} base-right general answers ({self.share:.1%})"


def retention(base: Scores, adapter: Scores) -> Retention:
    before, after = base.general_answers(), adapter.general_answers()
    right = [q for q, a in before.items() if a.passed and q in after]
    lost = tuple(after[q] for q in right if not after[q].passed)
    return Retention(len(right) - len(lost), len(right), lost)


def score(probes: list[Probe], answers: list[str], own_identity: Iterable[str] = (),
          truncated: list[bool] | None = None) -> Scores:
    own = tuple(own_identity)
    cut = truncated if truncated is not None else [False] * len(answers)
    out = []
    for p, text, t in zip(probes, answers, cut, strict=True):
        forbid = p.forbid_any + (own if p.is_identity or p.kind == SHOWCASE else ())
        out.append(Answer(p, text, passes(text, p.expect_any, forbid, denials_ok=p.is_identity or p.kind == SHOWCASE),
                          bool(t)))
    kinds: dict[str, list[bool]] = {}
    for a in out:
        if a.probe.kind != SHOWCASE:
            kinds.setdefault(a.probe.kind, []).append(a.passed)
    return Scores(out, {k: sum(v) / len(v) for k, v in kinds.items()})


def metrics(results: dict[str, Scores], markers: Iterable[str] = ()) -> dict[str, float]:
    """MLflow metrics: eval/<kind>_<contender>, and the before/after contract (before = base, after = adapter):
    identity and general scores, general retention (kept / base-right), answers cut at max_new_tokens. With the
    identity's `markers`, also the share of general answers that state the identity."""
    markers = tuple(markers)
    out = {f"eval/{kind}_{name}": v for name, s in results.items() for kind, v in s.by_kind.items()}
    out.update({f"eval/truncated_{name}": float(s.truncated) for name, s in results.items()})
    if markers:
        out.update({f"eval/general_identity_leak_{name}": s.identity_leak(markers) for name, s in results.items()
                    if "general" in s.by_kind})
    for when, name in (("before", "base"), ("after", "adapter")):
        if name in results:
            out[f"eval/identity_score_{when}"] = results[name].identity
            out[f"eval/general_score_{when}"] = results[name].general
            if markers:
                out[f"eval/general_identity_leak_{when}"] = results[name].identity_leak(markers)
    if "base" in results and "adapter" in results:
        kept = retention(results["base"], results["adapter"])
        out.update({"eval/general_retention": kept.share, "eval/general_kept": float(kept.kept),
                    "eval/general_base_right": float(kept.base_right)})
    return {k: v for k, v in out.items() if v == v}  # drop NaN (a kind with no probes)


def as_json(results: dict[str, Scores]) -> dict[str, dict[str, float]]:
    return {name: dict(sorted(s.by_kind.items())) for name, s in results.items()}
