"""Put probe questions to a model (with or without an adapter) and score the answers.

Greedy, batched, left-padded generation with transformers; prompts use the same chat template the
adapter was trained with. A probe passes when its answer contains one of `expect_any` and none of
`forbid_any` (case-insensitive); identity probes also forbid the base model's own names.
"""
from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable, Iterator

from persona.data import PLACEHOLDER, DatasetError, Identity, Problem, language
from persona.progress import progress
from persona.storage import atomic_write_text

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


def counting_tokenizer(model_dir: str, template: str | None):
    """`chat_tokenizer` for counting tokens, without importing torch where it can (AutoTokenizer imports it: 5 s on
    a GPU machine, before the training could start). A folder with a tokenizer.json is read by
    PreTrainedTokenizerFast, which tokenizes with that file as AutoTokenizer's class for the model does; the class
    adds decoding defaults, which counting does not use."""
    if not Path(model_dir, "tokenizer.json").is_file():
        return chat_tokenizer(model_dir, template)
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(model_dir)
    if template == "chatml" or not tok.chat_template:
        tok.chat_template = CHATML
    return tok


def token_counter(model_dir: str, template: str | None, system: str = "You are a helpful assistant."):
    """Tokens of one conversation as trained: system prompt, turns and template tokens."""
    tok = counting_tokenizer(model_dir, template)

    def count(messages: list[dict]) -> int:
        msgs = messages if messages[0]["role"] == "system" else [{"role": "system", "content": system}, *messages]
        return len(tok(tok.apply_chat_template(msgs, tokenize=False), add_special_tokens=False)["input_ids"])

    return count


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


SHOWCASE = "showcase"  # shown first in the tables, never scored: the seeds' own questions, which the training data has


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
        return f"kept {self.kept} of {self.base_right} base-right general answers ({self.share:.0%})"


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


class Chat:
    """A base model, optionally with a LoRA adapter, that answers batches of questions."""

    def __init__(self, model_dir: str, adapter_dir: str | None = None, template: str | None = "chatml",
                 system: str = "You are a helpful assistant.", device: str = "cpu"):
        import torch
        from transformers import AutoModelForCausalLM

        self.device = device
        self.system = system
        self.tok = chat_tokenizer(model_dir, template, padding_side="left")
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
        if device == "cpu":
            from persona.recipe import cpu_dtype

            dtype = getattr(torch, cpu_dtype()[0])  # bf16 where the CPU has bf16 matrix instructions
        else:
            dtype = torch.bfloat16
        if device != "cpu":
            # Decoding issues a few kernels per layer per token: PyTorch's cuDNN attention backend spends ~1 ms of
            # CPU per call, the flash / memory-efficient ones a few microseconds (same maths).
            torch.backends.cuda.enable_cudnn_sdp(False)
        # On a GPU the weights go straight to it instead of through host memory.
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, trust_remote_code=False,
                                                     device_map=None if device == "cpu" else device)
        # The output layer gets the last position's hidden states, a non-contiguous slice of the batch. PyTorch's
        # matmul folds such a 3-D input into one matrix multiply only when a gradient is wanted; PEFT freezes the
        # weights, so with an adapter loaded (used or bypassed) the (batch x hidden) @ (hidden x 152k vocabulary)
        # product became a batched multiply over a per-row copy of the output matrix: 22 of 25 s for a batch of 32
        # on a CPU, and a 9 GB copy. A contiguous input takes the plain path (BENCHMARKS.md, "Decoding with an adapter").
        head = model.get_output_embeddings()
        if head is not None:
            head.register_forward_pre_hook(lambda _module, args: (args[0].contiguous(), *args[1:]))
        if adapter_dir:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, adapter_dir)
        self.has_adapter = bool(adapter_dir)
        self.model = model.to(device).eval()
        self.model_dir = model_dir
        end = self.tok.convert_tokens_to_ids("<|im_end|>")
        self.stop_ids = [i for i in {self.tok.eos_token_id, end} if isinstance(i, int) and i >= 0]

    def attach_adapter(self, adapter_dir: str) -> None:
        """Put a LoRA adapter on the loaded base model: the same model as `Chat(model_dir, adapter_dir, ...)`, without
        loading the base weights again."""
        from peft import PeftModel

        if self.has_adapter:
            raise ValueError(f"this model already has an adapter; load {self.model_dir} again for {adapter_dir}")
        self.model = PeftModel.from_pretrained(self.model, adapter_dir).to(self.device).eval()
        self.has_adapter = True

    def prompt(self, question: str, history: Iterable[dict] = (), system: str | None = None) -> str:
        msgs = [{"role": "system", "content": system or self.system}, *history, {"role": "user", "content": question}]
        return self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)

    def _bypass(self, use_adapter: bool):
        import contextlib

        return self.model.disable_adapter() if self.has_adapter and not use_adapter else contextlib.nullcontext()

    def answer(self, questions: list[tuple[str, tuple]], max_new_tokens: int = 64, batch_size: int = 16,
               use_adapter: bool = True, system: str | None = None, temperature: float = 0.0, seed: int = 0,
               on_batch: Callable[[int, int], None] | None = None) -> list[str]:
        """Answers, greedy unless `temperature` > 0; `use_adapter=False` bypasses a loaded adapter."""
        return self.answer_rows([(q, h, system, use_adapter) for q, h in questions], max_new_tokens, batch_size,
                                temperature, seed, on_batch)

    def answer_rows(self, rows: list[tuple[str, tuple, str | None, bool]], max_new_tokens: int = 64,
                    batch_size: int = 16, temperature: float = 0.0, seed: int = 0,
                    on_batch: Callable[[int, int], None] | None = None,
                    temperatures: list[float] | None = None, truncated: list[bool] | None = None) -> list[str]:
        """Answers to (question, history, system, use_adapter) rows. Rows with and without the adapter may share a
        batch: PEFT's mixed-adapter batches route each row through its own adapter ('__base__': none).

        `temperatures`, one per row, replaces `temperature`: greedy rows (0) and sampled rows may then share a batch,
        as one `generate` call instead of two (see row_temperature). `truncated`, if given, receives one flag per row:
        decoding stopped at max_new_tokens rather than at the end of the answer."""
        import torch

        temps = list(temperatures) if temperatures is not None else [temperature] * len(rows)
        if len(temps) != len(rows):
            raise ValueError(f"{len(temps)} temperatures for {len(rows)} rows")
        if any(t > 0 for t in temps):
            torch.manual_seed(seed)
        out: list[str] = []
        for start in progress(range(0, len(rows), batch_size), desc="answering", unit="batch", leave=False):
            chunk = rows[start:start + batch_size]
            sampling = _sampling(temps[start:start + batch_size], self.device)
            texts = [self.prompt(q, h, system) for q, h, system, _ in chunk]
            enc = self.tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
            flags = {use for *_, use in chunk}
            extra = {}
            if self.has_adapter and len(flags) > 1:
                name = self.model.active_adapter
                extra["adapter_names"] = [name if use else "__base__" for *_, use in chunk]
            with self._bypass(use_adapter=flags != {False}), torch.inference_mode():
                gen = self.model.generate(**enc, max_new_tokens=max_new_tokens, eos_token_id=self.stop_ids,
                                          pad_token_id=self.tok.pad_token_id, **sampling, **extra)
            new = gen[:, enc["input_ids"].shape[1]:]
            out += [t.strip() for t in self.tok.batch_decode(new, skip_special_tokens=True)]
            if truncated is not None:
                ended = torch.isin(new, torch.tensor(self.stop_ids, device=new.device)).any(dim=1)
                truncated += [bool(new.shape[1] >= max_new_tokens and not e) for e in ended.tolist()]
            if on_batch:
                on_batch(min(start + batch_size, len(rows)), len(rows))
        return out

    def stream(self, messages: list[dict], max_new_tokens: int = 512) -> Iterator[str]:
        """Yield the answer to a conversation piece by piece, as `swift infer --stream true` does."""
        import threading

        from transformers import TextIteratorStreamer

        text = self.tok.apply_chat_template([{"role": "system", "content": self.system}, *messages], tokenize=False,
                                            add_generation_prompt=True)
        enc = self.tok([text], return_tensors="pt", add_special_tokens=False).to(self.device)
        streamer = TextIteratorStreamer(self.tok, skip_prompt=True, skip_special_tokens=True)
        kwargs = dict(**enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=self.stop_ids,
                      pad_token_id=self.tok.pad_token_id, streamer=streamer)
        worker = threading.Thread(target=self.model.generate, kwargs=kwargs, daemon=True)
        worker.start()
        yield from streamer
        worker.join()


def _sampling(temps: list[float], device: str) -> dict:
    """generate()'s arguments for a batch whose rows decode at these temperatures (0: greedy)."""
    if not any(t > 0 for t in temps):
        return dict(do_sample=False)
    if len(set(temps)) == 1:
        return dict(do_sample=True, temperature=temps[0], top_p=1.0)
    from transformers import LogitsProcessorList

    return dict(do_sample=True, temperature=1.0, top_p=1.0,
                logits_processor=LogitsProcessorList([row_temperature(temps, device)]))


def row_temperature(temps: list[float], device: str):
    """A logits processor with a temperature per row: a row at 0 keeps only its most likely token, so sampling
    picks what greedy decoding would; the others are divided by their temperature. Top-k, which generate() also
    applies, selects by rank, which dividing does not change: a sampled row draws from the same distribution as
    with generate(temperature=t)."""
    import torch
    from transformers import LogitsProcessor

    t = torch.tensor(temps, dtype=torch.float32, device=device)
    greedy = t == 0

    class _RowTemperature(LogitsProcessor):
        def __call__(self, input_ids, scores):
            out = scores / torch.where(greedy, torch.ones_like(t), t).to(scores.dtype)[:, None]
            best = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, scores.argmax(-1, keepdim=True), True)
            return out.masked_fill(greedy[:, None] & ~best, float("-inf"))

    return _RowTemperature()


@dataclass(frozen=True)
class Contender:
    """How a contender is asked: its system prompt (None: the chat's), the adapter on or off, and whether it answers
    the identity probes only (the prompt-only variant: general retention compares the base and the adapter)."""

    system: str | None
    use_adapter: bool
    identity_only: bool = False

    def probes(self, probes: list[Probe]) -> list[Probe]:
        return [p for p in probes if p.kind != "general"] if self.identity_only else list(probes)


def _asked(probes: list[Probe], stability_samples: int) -> tuple[list[Probe], list[Probe]]:
    """(greedy probes, sampled probes): every probe once, but `stability` probes sampled N times instead."""
    return ([p for p in probes if p.kind != "stability"],
            [p for p in probes if p.kind == "stability" for _ in range(stability_samples)])


@dataclass
class Decoded:
    """One contender's answers, in the order of `asked`."""

    asked: list[Probe]
    texts: list[str]
    truncated: list[bool]


def _answer_contenders(chat: Chat, probes: list[Probe], contenders: dict[str, Contender],
                       stability_samples: int, **kw) -> dict[str, Decoded]:
    """Every contender's answers to its probes, the contenders' rows decoded in shared batches: greedy for every
    probe, `stability` probes sampled N times at temperature 0.7 instead. Greedy and sampled rows share batches too
    (one generate call where there were two)."""
    out: dict[str, Decoded] = {}
    rows, temps, owner = [], [], []
    for name, c in contenders.items():
        fixed, sampled = _asked(c.probes(probes), stability_samples)
        out[name] = Decoded(fixed + sampled, [], [])
        for group, t in ((fixed, 0.0), (sampled, STABILITY_TEMPERATURE)):
            rows += [(p.question, p.history, c.system, c.use_adapter) for p in group]
            temps += [t] * len(group)
            owner += [name] * len(group)
    if not rows:
        return out
    cut: list[bool] = []
    texts = chat.answer_rows(rows, temperatures=temps, truncated=cut, **kw)
    for name, text, t in zip(owner, texts, cut, strict=True):
        out[name].texts.append(text)
        out[name].truncated.append(t)
    return out


def evaluate(chat: Chat, probes: list[Probe], own_identity: Iterable[str] = (), stability_samples: int = 3,
             use_adapter: bool = True, system: str | None = None, **kw) -> Scores:
    """One contender's scores: greedy answers for every probe; `stability` probes are sampled N times at
    temperature 0.7 instead."""
    d = _answer_contenders(chat, probes, {"one": Contender(system, use_adapter)}, stability_samples, **kw)["one"]
    return score(d.asked, d.texts, own_identity, d.truncated)


def default_batch_size(device: str) -> int:
    """Probes generated together: 32 on a CPU; 128 on a GPU, where a decoding step costs about the same for 1 or 128."""
    return 32 if device == "cpu" else 128


class BaselineAnswers:
    """The answers of the contenders without the adapter (base, prompt-only), remembered between runs.

    They depend only on the base weights, the probes, the system prompt and the decoding settings, so a re-training
    run (new data, same base and probes) decodes only the adapter's rows. Files are named by a hash of all of it, so
    any change is a miss, never a stale answer.
    """

    VERSION = 3  # bump when the way answers are produced changes (3: bf16 on CPUs that have it; truncation flags)

    def __init__(self, directory: str | Path, base_digest: str):
        self.directory = Path(directory)
        self.base_digest = base_digest

    def key(self, chat: Chat, probes: list[Probe], system: str | None, settings: dict) -> str:
        what = [self.VERSION, self.base_digest, chat.device, str(chat.model.dtype), chat.tok.chat_template,
                system or chat.system, [[p.kind, p.question, list(p.history)] for p in probes],
                sorted(settings.items())]
        return hashlib.sha256(json.dumps(what, ensure_ascii=False, default=str).encode()).hexdigest()[:24]

    def get(self, key: str) -> tuple[list[str], list[bool]] | None:
        try:
            data = json.loads((self.directory / f"answers-{key}.json").read_text(encoding="utf-8"))
            return list(data["answers"]), [bool(t) for t in data["truncated"]]
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def put(self, key: str, answers: list[str], truncated: list[bool]) -> None:
        atomic_write_text(self.directory / f"answers-{key}.json",
                          json.dumps({"answers": answers, "truncated": truncated}, ensure_ascii=False))


def compare(chat: Chat, probes: list[Probe], own_identity: Iterable[str], identity_prompt: str,
            together: bool | None = None, stability_samples: int = 3, remembered: BaselineAnswers | None = None,
            log: Callable[[str], None] | None = None, **kw) -> dict[str, Scores]:
    """The three contenders: base and base + adapter on every probe, the identity in the system prompt on the
    identity probes only (general retention compares base and adapter).

    `together` (default: on a GPU) decodes the contenders' rows in shared batches instead of one contender after
    the other: a GPU decoding step costs about the same for 70 rows or 210, so this is ~3x fewer steps. On a CPU
    the cost follows the rows, and contenders are run in turn. With `remembered`, the base and prompt-only answers
    of an earlier run with the same base, probes and settings are reused instead of decoded again.
    """
    contenders = {"base": Contender(None, False), "prompt_only": Contender(identity_prompt, False, identity_only=True)}
    if chat.has_adapter:
        contenders["adapter"] = Contender(None, True)
    if together is None:
        together = chat.device != "cpu"
    settings = {"max_new_tokens": kw.get("max_new_tokens", 64), "stability_samples": stability_samples,
                "temperature": STABILITY_TEMPERATURE, "seed": kw.get("seed", 0)}
    keys = {name: remembered.key(chat, c.probes(probes), c.system, settings)
            for name, c in contenders.items() if remembered and not c.use_adapter}
    decoded: dict[str, Decoded] = {}
    for name, key in keys.items():
        hit = remembered.get(key)
        if hit is not None:
            fixed, sampled = _asked(contenders[name].probes(probes), stability_samples)
            if len(hit[0]) == len(fixed) + len(sampled):
                decoded[name] = Decoded(fixed + sampled, *hit)
    if decoded and log:
        log(f"reusing the remembered answers of {' and '.join(decoded)} (same base weights, probes and settings)")
    todo = {name: c for name, c in contenders.items() if name not in decoded}
    if together:
        decoded.update(_answer_contenders(chat, probes, todo, stability_samples, **kw))
    else:
        for name, contender in todo.items():
            decoded.update(_answer_contenders(chat, probes, {name: contender}, stability_samples, **kw))
    for name, key in keys.items():
        if name in todo:
            remembered.put(key, decoded[name].texts, decoded[name].truncated)
    return {name: score(decoded[name].asked, decoded[name].texts, own_identity, decoded[name].truncated)
            for name in contenders}


@dataclass(frozen=True)
class EvaluationSetup:
    """Everything an evaluation depends on but the adapter: the base model and how it is prompted, the probes, the
    decoding settings, and where the base and prompt-only answers are remembered."""

    model_dir: str
    template: str | None
    system: str
    device: str
    probes_path: str
    identity: Identity
    own_identity: tuple[str, ...]
    answer_cache: str
    base_digest: str
    max_new_tokens: int = 40
    batch_size: int | None = None
    stability_samples: int = 3

    @property
    def batch(self) -> int:
        return self.batch_size or default_batch_size(self.device)

    def probes(self) -> list[Probe]:
        """The seeds' own question first (shown, not scored), then the held-out probes."""
        return showcase_probes(self.identity, self.own_identity) + load_probes(self.probes_path)

    def identity_prompt(self) -> str:
        return identity_system_prompt(self.identity, self.system)

    def load(self, adapter_dir: str | None = None) -> Chat:
        return Chat(self.model_dir, adapter_dir, self.template, self.system, self.device)

    def compare(self, chat: Chat, log: Callable[[str], None] | None = None,
                on_batch: Callable[[int, int], None] | None = None) -> dict[str, Scores]:
        """The three contenders' scores (two without an adapter on `chat`), reusing remembered baseline answers."""
        return compare(chat, self.probes(), self.own_identity, self.identity_prompt(),
                       max_new_tokens=self.max_new_tokens, batch_size=self.batch,
                       stability_samples=self.stability_samples,
                       remembered=BaselineAnswers(self.answer_cache, self.base_digest), log=log, on_batch=on_batch)

    def decoding_bytes(self) -> int | None:
        """GPU memory that decoding one batch of probes needs (persona.preflight.estimate_decoding); None for a
        model whose shape is unknown."""
        from persona import preflight

        try:
            shape = preflight.ModelShape.from_dir(self.model_dir)
        except (OSError, KeyError, ValueError):
            return None
        tok = counting_tokenizer(self.model_dir, self.template)
        longest = 0
        for p in self.probes():
            for system in (self.system, self.identity_prompt()):
                msgs = [{"role": "system", "content": system}, *p.history, {"role": "user", "content": p.question}]
                text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
                longest = max(longest, len(tok(text, add_special_tokens=False)["input_ids"]))
        return preflight.estimate_decoding(shape, rows=self.batch, prompt_tokens=longest,
                                           new_tokens=self.max_new_tokens)


class EarlyEvaluation:
    """The half of the evaluation that needs no adapter, done in a thread of this process while the adapter trains
    in another: load the base model, and decode and remember the base and prompt-only answers. The evaluation then
    puts the adapter on the loaded model (`take(setup).chat()`) and decodes the adapter's rows only.

    On a GPU it loads nothing unless the training's estimate and the decoding's both fit in the free memory, with
    the pre-flight's margin; measured before loading, so the training's own pre-flight still passes whichever
    starts first. It never fails anything: what goes wrong is said in `outcome`, and the evaluation loads the model
    itself as before. Measured on an H100 with a 7B model: BENCHMARKS.md, section 4.
    """

    _waiting: dict[EvaluationSetup, "EarlyEvaluation"] = {}  # for the evaluation step of this process's run
    _lock = threading.Lock()
    # One at a time: transformers' from_pretrained is not safe in two threads at once (its meta-device context is
    # process-wide), e.g. when a second start replaces one that is still loading.
    _loading = threading.Lock()

    def __init__(self, setup: EvaluationSetup, training_bytes: int | None):
        self.setup = setup
        self.training_bytes = training_bytes
        self.outcome = "running"
        self.seconds = 0.0
        self.peak_gib = float("nan")
        self._chat: Chat | None = None
        self._discarded = False
        self._handover = threading.Lock()
        # A daemon: a run that is stopped does not wait for it. Callers wait() for it before their step ends.
        self._thread = threading.Thread(target=self._run, name="persona-early-evaluation", daemon=True)

    @classmethod
    def start(cls, setup: EvaluationSetup, training_bytes: int | None = None) -> "EarlyEvaluation":
        """Start it for `setup`, next to a training whose pre-flight estimate is `training_bytes`."""
        early = cls(setup, training_bytes)
        with cls._lock:
            old = cls._waiting.pop(setup, None)
            cls._waiting[setup] = early
        if old is not None:
            old.discard()
        early._thread.start()
        return early

    @classmethod
    def take(cls, setup: EvaluationSetup) -> "EarlyEvaluation | None":
        """The early evaluation started in this process for the same setup, if any; it is yours from now on."""
        with cls._lock:
            return cls._waiting.pop(setup, None)

    def _fits(self) -> str | None:
        """Why it must not load now, or None when training and decoding fit together."""
        from persona import preflight

        if self.setup.device == "cpu":
            return None
        decoding = self.setup.decoding_bytes()
        if decoding is None or self.training_bytes is None:
            return "no memory estimate for this model"
        free, total, name = preflight.free_cuda_memory(0)
        need = (self.training_bytes + decoding) * preflight.SAFETY_MARGIN
        if need > free:
            return (f"training and decoding together need ~{need / preflight.GIB:.1f} GiB, {name} has "
                    f"{free / preflight.GIB:.1f} GiB free")
        return None

    def _run(self) -> None:
        import time

        started = time.time()
        try:
            reason = self._fits()
            if reason:
                self.outcome = f"not started: {reason}"
                return
            with EarlyEvaluation._loading:
                chat = self.setup.load()
                results = self.setup.compare(chat)
            self.outcome = (f"loaded the base model and decoded the base and prompt-only answers "
                            f"(base {len(results['base'].answers)}, prompt-only "
                            f"{len(results['prompt_only'].answers)})")
            with self._handover:
                if not self._discarded:
                    self._chat = chat
            del chat
            if self._chat is None:
                _release_gpu_memory(self.setup.device)
        except Exception as exc:  # e.g. out of memory: the evaluation loads the model itself
            self.outcome = f"failed ({type(exc).__name__}: {str(exc)[:300]})"
            _release_gpu_memory(self.setup.device)
        finally:
            self.seconds = time.time() - started
            if self.setup.device != "cpu":
                import torch

                if torch.cuda.is_initialized():
                    self.peak_gib = torch.cuda.max_memory_reserved() / 2**30

    def wait(self) -> str:
        """Wait until it is done (its answers are then remembered); what happened."""
        self._thread.join()
        return self.outcome

    def chat(self) -> Chat | None:
        """Wait for it; the loaded base model (its baseline answers remembered), or None (see `outcome`)."""
        self.wait()
        with self._handover:
            chat, self._chat = self._chat, None
        return chat

    def discard(self) -> None:
        """Free what it loaded, now or as soon as it is done (e.g. when the training failed); never waits."""
        with self._handover:
            self._discarded = True
            chat, self._chat = self._chat, None
        if chat is not None:
            del chat
            _release_gpu_memory(self.setup.device)


def _release_gpu_memory(device: str) -> None:
    import gc

    gc.collect()
    if device != "cpu":
        import torch

        torch.cuda.empty_cache()


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


def _cell(v: float | None) -> str:
    return "—" if v is None or v != v else f"{v:.2f}"


def scores_table(results: dict[str, Scores]) -> str:
    """The tutorials' comparison: one row per probe kind, one column per contender ('—': not asked)."""
    names = list(results)
    kinds = sorted({k for s in results.values() for k in s.by_kind})
    rows = ["| kind | " + " | ".join(CONTENDER_TITLES[n] for n in names) + " |", "|---" * (len(names) + 1) + "|"]
    for k in kinds:
        counts = {n: sum(1 for a in results[n].answers if a.probe.kind == k) for n in names}
        rows.append(f"| {k} ({max(counts.values())}) | "
                    + " | ".join(_cell(results[n].by_kind.get(k)) for n in names) + " |")
    rows.append("| answers cut at max_new_tokens | " + " | ".join(str(results[n].truncated) for n in names) + " |")
    return "\n".join(rows)


def retention_report(results: dict[str, Scores], limit: int = 160) -> str:
    """'kept k of n base-right general answers', then the lost ones: question, base answer, adapter answer."""
    if "base" not in results or "adapter" not in results:
        return ""
    kept = retention(results["base"], results["adapter"])
    base = results["base"].general_answers()
    lines = [f"General retention: {kept}."]
    for a in kept.lost:
        lines.append(f"- lost: {a.probe.question} | base: {_short(base[a.probe.question].text, limit)} | adapter: "
                     f"{_short(a.text, limit)}")
    return "\n".join(lines)


def _short(text: str, limit: int) -> str:
    text = " ".join(text.split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def comparison_table(results: dict[str, Scores], limit: int = 160) -> str:
    """The tutorials' side-by-side answers: question | base | prompt-only | adapter, one row per probe ('—': that
    contender was not asked). The seeds' own question comes first."""

    def cell(a: Answer | None) -> str:
        if a is None:
            return "—"
        return f"{'✅' if a.passed else '❌'} {_short(a.text, limit)}{' ✂' if a.truncated else ''}"

    names = list(results)
    by_key = {n: {} for n in names}
    for n in names:
        for a in results[n].answers:
            by_key[n].setdefault((a.probe.kind, a.probe.question), a)  # a stability probe: its first sample
    order = list(dict.fromkeys(k for n in names for k in by_key[n]))
    rows = ["| kind | question | " + " | ".join(CONTENDER_TITLES[n] for n in names) + " |",
            "|---|---" + "|---" * len(names) + "|"]
    for kind, question in order:
        rows.append(f"| {kind} | {question} | "
                    + " | ".join(cell(by_key[n].get((kind, question))) for n in names) + " |")
    return "\n".join(rows)
