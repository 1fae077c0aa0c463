"""The three contenders of the tutorials' comparison, asked the held-out probes: the base model, the identity in the
system prompt only, and base + adapter.

The base and prompt-only answers ("the baseline") need no adapter: `baseline` decodes them once per base model,
probes and decoding settings and remembers them in an `AnswerCache`, so a re-training run decodes the adapter's rows
alone. `compare` decodes what its baseline lacks and scores everything (persona.scoring).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from persona.data import Identity
from persona.inference import Chat, decoding_settings, default_batch_size
from persona.integrity import content_sha256
from persona.probes import Probe, identity_system_prompt, load_probes, showcase_probes
from persona.scoring import STABILITY_TEMPERATURE, Scores, score
from persona.storage import atomic_write_text

BASELINE = ("base", "prompt_only")  # the contenders without an adapter


@dataclass(frozen=True)
class Contender:
    """How a contender is asked: its system prompt (None: the chat's), the adapter on or off, and whether it answers
    the identity probes only (the prompt-only variant: general retention compares the base and the adapter)."""

    system: str | None
    use_adapter: bool
    identity_only: bool = False

    def probes(self, probes: list[Probe]) -> list[Probe]:
        return [p for p in probes if p.kind != "general"] if self.identity_only else list(probes)


def contenders(identity_prompt: str, with_adapter: bool) -> dict[str, Contender]:
    out = {"base": Contender(None, False), "prompt_only": Contender(identity_prompt, False, identity_only=True)}
    if with_adapter:
        out["adapter"] = Contender(None, True)
    return out


def asked(probes: list[Probe], stability_samples: int) -> list[Probe]:
    """The rows a contender answers, in order: every probe greedily once, except `stability` probes, sampled N times
    at temperature 0.7 instead (they come last)."""
    return ([p for p in probes if p.kind != "stability"]
            + [p for p in probes if p.kind == "stability" for _ in range(stability_samples)])


@dataclass
class Decoded:
    """One contender's answers, in the order of `asked`."""

    asked: list[Probe]
    texts: list[str]
    truncated: list[bool]


def _answer_contenders(chat: Chat, probes: list[Probe], todo: dict[str, Contender],
                       stability_samples: int, **kw) -> dict[str, Decoded]:
    """Every contender's answers to its probes, the contenders' rows decoded in shared batches (greedy and sampled
    rows too: one generate call where there were two)."""
    out: dict[str, Decoded] = {}
    rows, temps, owner = [], [], []
    for name, c in todo.items():
        rows_of = asked(c.probes(probes), stability_samples)
        out[name] = Decoded(rows_of, [], [])
        rows += [(p.question, p.history, c.system, c.use_adapter) for p in rows_of]
        temps += [STABILITY_TEMPERATURE if p.kind == "stability" else 0.0 for p in rows_of]
        owner += [name] * len(rows_of)
    if not rows:
        return out
    cut: list[bool] = []
    texts = chat.answer_rows(rows, temperatures=temps, truncated=cut, **kw)
    for name, text, t in zip(owner, texts, cut, strict=True):
        out[name].texts.append(text)
        out[name].truncated.append(t)
    return out


def decode(chat: Chat, probes: list[Probe], todo: dict[str, Contender], stability_samples: int = 3,
           together: bool | None = None, **kw) -> dict[str, Decoded]:
    """The contenders' answers. `together` (default: on a GPU) decodes their rows in shared batches: a GPU decoding
    step costs about the same for 70 rows or 210. On a CPU the cost follows the rows, and they go in turn."""
    if together is None:
        together = chat.device != "cpu"
    if together:
        return _answer_contenders(chat, probes, todo, stability_samples, **kw)
    out: dict[str, Decoded] = {}
    for name, contender in todo.items():
        out.update(_answer_contenders(chat, probes, {name: contender}, stability_samples, **kw))
    return out


def evaluate(chat: Chat, probes: list[Probe], own_identity: Iterable[str] = (), stability_samples: int = 3,
             use_adapter: bool = True, system: str | None = None, **kw) -> Scores:
    """One contender's scores: greedy answers for every probe; `stability` probes are sampled N times at
    temperature 0.7 instead."""
    d = _answer_contenders(chat, probes, {"one": Contender(system, use_adapter)}, stability_samples, **kw)["one"]
    return score(d.asked, d.texts, own_identity, d.truncated)


def compare(chat: Chat, probes: list[Probe], own_identity: Iterable[str], identity_prompt: str,
            baseline: dict[str, Decoded] | None = None, stability_samples: int = 3, together: bool | None = None,
            **kw) -> dict[str, Scores]:
    """The three contenders' scores (two when `chat` has no adapter): base and base + adapter on every probe, the
    identity in the system prompt on the identity probes only (general retention compares base and adapter).
    Contenders in `baseline` (answers decoded earlier for the same probes) are not decoded again."""
    todo = contenders(identity_prompt, chat.has_adapter)
    decoded = {name: d for name, d in (baseline or {}).items() if name in todo}
    decoded.update(decode(chat, probes, {n: c for n, c in todo.items() if n not in decoded}, stability_samples,
                          together, **kw))
    return {name: score(decoded[name].asked, decoded[name].texts, own_identity, decoded[name].truncated)
            for name in todo}


class AnswerCache:
    """The baseline's answers, remembered between runs. They depend only on the base weights, the probes, the system
    prompt and the decoding settings; files are named by a hash of all of it, so any change is a miss, never a stale
    answer. Each file records the sha256 of its answers; one that does not parse, does not match it or has the wrong
    number of rows is discarded with a line to `log`, and the answers are decoded again."""

    VERSION = 4  # bump when the way answers are produced changes (4: keyed without loading the model)

    def __init__(self, directory: str | Path, base_digest: str, log: Callable[[str], None] | None = print):
        self.directory = Path(directory)
        self.base_digest = base_digest
        self.log = log

    def key(self, what: list) -> str:
        """`what`: everything the answers depend on but the base weights (EvaluationSetup.baseline lists it)."""
        return hashlib.sha256(json.dumps([self.VERSION, self.base_digest, *what], ensure_ascii=False,
                                         default=str).encode()).hexdigest()[:24]

    def get(self, key: str, rows: list[Probe]) -> Decoded | None:
        path = self.directory / f"answers-{key}.json"
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            texts, cut = data["answers"], data["truncated"]
            if not (isinstance(texts, list) and all(isinstance(t, str) for t in texts) and isinstance(cut, list)):
                raise TypeError("not a list of answers")
            recorded = data.get("sha256")  # None in files written before the record: their shape decides
            if recorded is not None and recorded != content_sha256([texts, cut]):
                problem = "its answers do not match the sha256 recorded in it"
            elif not len(texts) == len(rows) == len(cut):
                problem = f"it has {len(texts)} answers for {len(rows)} questions"
            else:
                return Decoded(rows, list(texts), [bool(t) for t in cut])
        except (OSError, UnicodeDecodeError) as exc:
            problem = f"unreadable ({type(exc).__name__})"
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            problem = f"not the JSON it was written as ({type(exc).__name__})"
        path.unlink(missing_ok=True)
        if self.log:
            self.log(f"answer cache {path} is damaged: {problem}. Discarded it; these answers are decoded again.")
        return None

    def put(self, key: str, decoded: Decoded) -> None:
        atomic_write_text(self.directory / f"answers-{key}.json",
                          json.dumps({"answers": decoded.texts, "truncated": decoded.truncated,
                                      "sha256": content_sha256([decoded.texts, decoded.truncated])}, ensure_ascii=False))


@dataclass(frozen=True)
class EvaluationSetup:
    """Everything an evaluation depends on but the adapter: the base model and how it is prompted, the probes, the
    decoding settings, and where the baseline's answers are remembered."""

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

    def _decoding(self, on_batch: Callable[[int, int], None] | None = None) -> dict:
        return dict(max_new_tokens=self.max_new_tokens, batch_size=self.batch, on_batch=on_batch)

    def baseline(self, load: Callable[[], Chat], log: Callable[[str], None] | None = None,
                 on_batch: Callable[[int, int], None] | None = None) -> dict[str, Decoded]:
        """The base and prompt-only answers: remembered ones where the cache has them, else decoded (on the model
        `load()` returns, called only then) and remembered."""
        from persona.tokens import chat_tokenizer

        probes = self.probes()
        cache = AnswerCache(self.answer_cache, self.base_digest, log or print)
        settings = {"max_new_tokens": self.max_new_tokens, "stability_samples": self.stability_samples,
                    "temperature": STABILITY_TEMPERATURE, "seed": 0, "batch_size": self.batch}  # bf16: padding counts
        template = chat_tokenizer(self.model_dir, self.template).chat_template
        todo = {n: c for n, c in contenders(self.identity_prompt(), False).items() if n in BASELINE}
        keys = {n: cache.key([*decoding_settings(self.device), template, c.system or self.system,
                              [[p.kind, p.question, list(p.history)] for p in c.probes(probes)],
                              sorted(settings.items())]) for n, c in todo.items()}
        out: dict[str, Decoded] = {}
        for name, c in todo.items():
            hit = cache.get(keys[name], asked(c.probes(probes), self.stability_samples))
            if hit is not None:
                out[name] = hit
        if out and log:
            log(f"reusing the remembered answers of {' and '.join(out)} (same base weights, probes and settings)")
        missing = {n: c for n, c in todo.items() if n not in out}
        if missing:
            fresh = decode(load(), probes, missing, self.stability_samples, **self._decoding(on_batch))
            for name, d in fresh.items():
                cache.put(keys[name], d)
            out.update(fresh)
        return out

    def compare(self, chat: Chat, baseline: dict[str, Decoded] | None = None,
                on_batch: Callable[[int, int], None] | None = None) -> dict[str, Scores]:
        """The contenders' scores, decoding only those `baseline` lacks."""
        return compare(chat, self.probes(), self.own_identity, self.identity_prompt(), baseline,
                       self.stability_samples, **self._decoding(on_batch))
