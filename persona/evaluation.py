"""Put probe questions to a model (with or without an adapter) and score the answers.

Greedy, batched, left-padded generation with transformers; prompts use the same chat template the
adapter was trained with. A probe passes when its answer contains one of `expect_any` and none of
`forbid_any` (case-insensitive); identity probes also forbid the base model's own names.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable

from persona.data import PLACEHOLDER, DatasetError, Identity, Problem, language

# ms-swift's 'chatml' template (swift/template/templates/utils.py), as a transformers chat template.
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


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


def chat_tokenizer(model_dir: str, template: str | None, **kw):
    """The base tokenizer with the chat template ms-swift trains with."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir, **kw)
    if template == "chatml" or not tok.chat_template:
        tok.chat_template = CHATML
    return tok


def token_counter(model_dir: str, template: str | None, system: str = "You are a helpful assistant."):
    """Tokens of one conversation as trained: system prompt, turns and template tokens."""
    tok = chat_tokenizer(model_dir, template)

    def count(messages: list[dict]) -> int:
        msgs = messages if messages[0]["role"] == "system" else [{"role": "system", "content": system}, *messages]
        return len(tok(tok.apply_chat_template(msgs, tokenize=False), add_special_tokens=False)["input_ids"])

    return count


def passes(answer: str, expect_any: Iterable[str], forbid_any: Iterable[str] = ()) -> bool:
    low = answer.lower()
    return any(e.lower() in low for e in expect_any) and not any(f.lower() in low for f in forbid_any)


@dataclass
class Answer:
    probe: Probe
    text: str
    passed: bool


@dataclass
class Scores:
    answers: list[Answer]
    by_kind: dict[str, float] = field(default_factory=dict)

    @property
    def identity(self) -> float:
        hits = [a.passed for a in self.answers if a.probe.kind.startswith("identity")]
        return sum(hits) / len(hits) if hits else float("nan")

    @property
    def general(self) -> float:
        hits = [a.passed for a in self.answers if a.probe.kind == "general"]
        return sum(hits) / len(hits) if hits else float("nan")


def score(probes: list[Probe], answers: list[str], own_identity: Iterable[str] = ()) -> Scores:
    own = tuple(own_identity)
    out = []
    for p, text in zip(probes, answers, strict=True):
        forbid = p.forbid_any + (own if p.is_identity else ())
        out.append(Answer(p, text, passes(text, p.expect_any, forbid)))
    kinds: dict[str, list[bool]] = {}
    for a in out:
        kinds.setdefault(a.probe.kind, []).append(a.passed)
    return Scores(out, {k: sum(v) / len(v) for k, v in kinds.items()})


class Chat:
    """A base model, optionally with a LoRA adapter, that answers batches of questions greedily."""

    def __init__(self, model_dir: str, adapter_dir: str | None = None, template: str | None = "chatml",
                 system: str = "You are a helpful assistant.", device: str = "cpu"):
        import torch
        from transformers import AutoModelForCausalLM

        self.device = device
        self.system = system
        self.tok = chat_tokenizer(model_dir, template, padding_side="left")
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
        dtype = torch.float32 if device == "cpu" else torch.bfloat16
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, trust_remote_code=False)
        if adapter_dir:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, adapter_dir)
        self.has_adapter = bool(adapter_dir)
        self.model = model.to(device).eval()
        end = self.tok.convert_tokens_to_ids("<|im_end|>")
        self.stop_ids = [i for i in {self.tok.eos_token_id, end} if isinstance(i, int) and i >= 0]

    def prompt(self, question: str, history: Iterable[dict] = ()) -> str:
        msgs = [{"role": "system", "content": self.system}, *history, {"role": "user", "content": question}]
        return self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)

    def answer(self, questions: list[tuple[str, tuple]], max_new_tokens: int = 64, batch_size: int = 16,
               use_adapter: bool = True, on_batch: Callable[[int, int], None] | None = None) -> list[str]:
        """Greedy answers; with `use_adapter=False` a loaded adapter is bypassed (the base model answers)."""
        import contextlib

        bypass = self.model.disable_adapter() if self.has_adapter and not use_adapter else contextlib.nullcontext()
        with bypass:
            return self._answer(questions, max_new_tokens, batch_size, on_batch)

    def _answer(self, questions, max_new_tokens, batch_size, on_batch) -> list[str]:
        import torch

        out: list[str] = []
        for start in range(0, len(questions), batch_size):
            chunk = questions[start:start + batch_size]
            texts = [self.prompt(q, h) for q, h in chunk]
            enc = self.tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
            with torch.inference_mode():
                gen = self.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                          eos_token_id=self.stop_ids, pad_token_id=self.tok.pad_token_id)
            new = gen[:, enc["input_ids"].shape[1]:]
            out += [t.strip() for t in self.tok.batch_decode(new, skip_special_tokens=True)]
            if on_batch:
                on_batch(min(start + batch_size, len(questions)), len(questions))
        return out


def evaluate(chat: Chat, probes: list[Probe], own_identity: Iterable[str] = (), **kw) -> Scores:
    answers = chat.answer([(p.question, p.history) for p in probes], **kw)
    return score(probes, answers, own_identity)


def comparison_table(before: Scores, after: Scores, limit: int = 200) -> str:
    """The tutorials' side-by-side table: question | before | after, one row per probe."""

    def cell(a: Answer) -> str:
        text = " ".join(a.text.split()).replace("|", "\\|")
        text = text if len(text) <= limit else text[: limit - 1] + "…"
        return f"{'✅' if a.passed else '❌'} {text}"

    rows = ["| kind | question | before | after |", "|---|---|---|---|"]
    for b, a in zip(before.answers, after.answers, strict=True):
        rows.append(f"| {b.probe.kind} | {b.probe.question} | {cell(b)} | {cell(a)} |")
    return "\n".join(rows)
