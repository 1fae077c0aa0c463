"""The shipped probe set (data/probes.jsonl): enough checkable general probes, in both languages, that share no
question with the replay prompts or the training data and never touch the identity. No model; milliseconds."""
import json
from pathlib import Path

import pytest

from persona.data import _similar, language, normalize_question
from persona.probes import load_probes

DATA = Path(__file__).resolve().parent.parent / "data"

# Words of an identity question: a general probe asks none of them, or it would measure identity, not retention.
IDENTITY_WORDS = (
    "你是谁", "你叫什么", "你的名字", "你自己", "介绍一下你", "开发了你", "训练了你",
    "who are you", "your name", "yourself", "who made you", "who created you", "who built you",
    "qwen", "通义", "千问", "阿里", "alibaba", "openai", "chatgpt", "gpt-", "smollm", "hugging face", "huggingface",
    "swift-robot", "swift robot", "csdn", "迪菲赫尔曼", "diffie", "hellman", "{{",
)


@pytest.fixture(scope="module")
def general() -> list:
    return [p for p in load_probes(DATA / "probes.jsonl") if p.kind == "general"]


def _near_duplicate(a: str, b: str) -> bool:
    """Same question after normalize_question (lowercase, NFKC, no spaces or punctuation, Chinese included), one
    contained in the other, or nearly equal characters (the rule load_dataset applies between training and probes)."""
    x, y = normalize_question(a), normalize_question(b)
    return bool(x and y) and (x in y or y in x or _similar(x, y))


def test_normalization_catches_punctuation_and_containment():
    assert normalize_question("  What is 2 + 3? ") == normalize_question("what is 2+3")
    assert normalize_question("中国的首都是哪里?") == normalize_question("中国的首都是哪里?")
    assert _near_duplicate("美国的首都是哪里?", "请问,美国的首都是哪里")
    assert _near_duplicate("Write a Python function that reverses a string.",
                           "Write a Python function which reverses a string!")
    assert not _near_duplicate("What is the capital of Italy?", "What is the capital of Spain?")


def test_enough_general_probes(general):
    assert len(general) >= 120


def test_languages_are_balanced(general):
    zh = sum(language(p.question) == "zh" for p in general)
    assert 0.4 <= zh / len(general) <= 0.6, f"{zh} of {len(general)} general probes are Chinese"


def test_every_probe_is_checkable(general):
    for p in general:
        assert p.expect_any and all(isinstance(e, str) and e.strip() for e in p.expect_any), p.question


def test_no_duplicate_questions(general):
    questions = [p.question for p in general]
    assert len(set(questions)) == len(questions)
    clashes = [(a, b) for i, a in enumerate(questions) for b in questions[i + 1:] if _near_duplicate(a, b)]
    assert not clashes


def test_disjoint_from_replay_and_training(general):
    replay = [json.loads(line)["prompt"] for line in (DATA / "general_prompts.jsonl").read_text("utf-8").splitlines()
              if line.strip()]
    training = [row["instruction"] for row in json.loads((DATA / "self_cognition.json").read_text("utf-8"))]
    assert replay and training
    leaks = [(p.question, other) for p in general for other in replay + training
             if _near_duplicate(p.question, other)]
    assert not leaks


def test_no_identity_words(general):
    hits = [(p.question, w) for p in general for w in IDENTITY_WORDS if w in p.question.lower()]
    assert not hits
