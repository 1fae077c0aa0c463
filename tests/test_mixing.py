"""General-data mixing: offline replay (cached) and the ModelScope path with a faked download."""
import json

import pytest

from persona import mixing
from persona.data import EXTRA_PREFIX
from persona.inference import decoding_settings
from persona.models import from_local_dir

CPU = decoding_settings("cpu")


def test_replay_answers_come_from_the_base_model_and_are_cached(tiny_model, tmp_path, monkeypatch):
    base = from_local_dir(str(tiny_model))
    prompts = ["Name a word that rhymes with cat.", "Name a word that rhymes with sun."]
    first = mixing.replay_samples(base, prompts, tmp_path, "You are a helpful assistant.", "cpu", max_new_tokens=6)
    assert [s.question for s in first] == prompts and all(s.file.startswith(EXTRA_PREFIX + "replay:") for s in first)

    import persona.inference

    monkeypatch.setattr(persona.inference, "Chat", lambda *a, **k: pytest.fail("the cache was not used"))
    again = mixing.replay_samples(base, prompts, tmp_path, "You are a helpful assistant.", "cpu", max_new_tokens=6)
    assert [s.messages for s in again] == [s.messages for s in first]


def test_replay_drops_answers_that_name_the_base_model(tmp_path, tiny_model):
    base = from_local_dir(str(tiny_model))
    base = base.__class__(**{**base.__dict__, "own_identity": ("SmolLM",)})
    key_rows = [{"prompt": "hi", "answer": "I am SmolLM."}, {"prompt": "2+2?", "answer": "4"}]
    cache = mixing.replay_cache_file(tmp_path, base, ["hi", "2+2?"], "s", 8, mixing.REPLAY_BATCH_SIZE, CPU)
    cache.write_text("".join(json.dumps(r) + "\n" for r in key_rows))
    samples = mixing.replay_samples(base, ["hi", "2+2?"], tmp_path, "s", "cpu", max_new_tokens=8)
    assert [s.answer for s in samples] == ["4"]


def test_hub_mixing_reads_alpaca_rows_from_modelscope(monkeypatch):
    from modelscope.msdatasets import MsDataset

    loaded = []

    def fake_load(dataset_id, split):
        loaded.append((dataset_id, split))
        return [{"instruction": f"q{i} of {dataset_id}", "input": "", "output": f"a{i}"} for i in range(10)]

    monkeypatch.setattr(MsDataset, "load", staticmethod(fake_load))
    samples = mixing.hub_samples(["AI-ModelScope/alpaca-gpt4-data-zh", "AI-ModelScope/alpaca-gpt4-data-en"], 6, seed=1)
    assert loaded == [("AI-ModelScope/alpaca-gpt4-data-zh", "train"), ("AI-ModelScope/alpaca-gpt4-data-en", "train")]
    assert len(samples) == 6 and samples[0].file == EXTRA_PREFIX + "hub:AI-ModelScope/alpaca-gpt4-data-zh"


def test_hub_unreachable_says_what_to_do(monkeypatch):
    from modelscope.msdatasets import MsDataset

    def offline(*a, **k):
        raise ConnectionError("Max retries exceeded\ntrace")

    monkeypatch.setattr(MsDataset, "load", staticmethod(offline))
    with pytest.raises(mixing.MixingError, match="general_mix: replay"):
        mixing.hub_samples(["AI-ModelScope/alpaca-gpt4-data-zh"], 4, seed=1)


def test_pick_is_deterministic():
    items = list(range(100))
    assert mixing.pick(items, 5, 7) == mixing.pick(items, 5, 7) != mixing.pick(items, 5, 8)
    assert mixing.pick(items, 500, 7) == items
    assert mixing.pick(items, 12, 7)[:5] == mixing.pick(items, 5, 7)  # more rows keep the ones already drawn


def test_replay_prompts_follow_the_identity_data_languages():
    prompts = [f"question {i}?" for i in range(10)] + [f"问题{i}?" for i in range(4)]
    chosen = mixing.pick_by_language(prompts, {"zh": 3, "en": 2}, seed=1)
    assert sum("问题" in p for p in chosen) == 3 and len(chosen) == 5
    assert chosen == mixing.pick_by_language(prompts, {"zh": 3, "en": 2}, seed=1)
    # more Chinese wanted than the prompt set has: all of them, the rest from the other language
    chosen = mixing.pick_by_language(prompts, {"zh": 6, "en": 1}, seed=1)
    assert sum("问题" in p for p in chosen) == 4 and len(chosen) == 7 and len(set(chosen)) == 7


def test_replay_cache_is_keyed_by_what_changes_the_answers(tmp_path, tiny_model):
    base = from_local_dir(str(tiny_model))
    files = {mixing.replay_cache_file(tmp_path, base, ["hi"], "s", 48, bs, CPU) for bs in (16, 128)}
    files |= {mixing.replay_cache_file(tmp_path, base, ["hi"], "s", n, 16, CPU) for n in (48, 96)}
    files |= {mixing.replay_cache_file(tmp_path, base, p, "s", 48, 16, CPU) for p in (["hi"], ["hi", "2+2?"])}
    assert len(files) == 4  # batch size, length limit and prompts each give their own file
    files = {mixing.replay_cache_file(tmp_path, base, ["hi"], "s", 48, 16, d)
             for d in (["cpu", "bfloat16"], ["cpu", "float32"], ["cuda", "bfloat16"])}
    assert len(files) == 3  # so do the device and the dtype (persona.inference.decoding_settings)


def test_hub_counts_are_written_as_ms_swift_writes_them(monkeypatch):
    from modelscope.msdatasets import MsDataset

    monkeypatch.setattr(MsDataset, "load", staticmethod(
        lambda dataset_id, split: [{"instruction": f"q{i} of {dataset_id}", "output": f"a{i}"} for i in range(40)]))
    samples = mixing.hub_samples(["AI-ModelScope/alpaca-gpt4-data-zh#25", "AI-ModelScope/alpaca-gpt4-data-en#5",
                                  "other/set"], 6, seed=1)
    by_file = {f: sum(s.file == f for s in samples) for f in {s.file for s in samples}}
    assert by_file == {EXTRA_PREFIX + "hub:AI-ModelScope/alpaca-gpt4-data-zh": 25,
                       EXTRA_PREFIX + "hub:AI-ModelScope/alpaca-gpt4-data-en": 5,
                       EXTRA_PREFIX + "hub:other/set": 6}  # the uncounted one takes general_ratio's rows
    assert mixing.hub_spec("AI-ModelScope/alpaca-gpt4-data-zh#500") == ("AI-ModelScope/alpaca-gpt4-data-zh", 500)
    assert len(mixing.hub_samples(["small#100"], 0, seed=1)) == 40  # all of a smaller dataset
    for bad in ("x#", "x#ten", "x#0"):
        with pytest.raises(mixing.MixingError, match="number of rows"):
            mixing.hub_spec(bad)
