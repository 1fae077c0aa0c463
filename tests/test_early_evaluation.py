"""The evaluation's first half while the adapter trains (persona.evaluation.EarlyEvaluation), on CPU."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from persona.data import Identity
from persona.evaluation import EarlyEvaluation, EvaluationSetup

PROBES = [{"kind": "general", "question": "What is 2 + 3?", "expect_any": ["5"]},
          {"kind": "identity_en", "question": "Who are you?", "expect_any": ["Swift"]},
          {"kind": "stability", "question": "你是谁?", "expect_any": ["Swift"]}]


def make_setup(model_dir: Path, tmp_path: Path, device: str = "cpu", cache: str = "answers") -> EvaluationSetup:
    probes = tmp_path / "probes.jsonl"
    probes.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in PROBES), encoding="utf-8")
    return EvaluationSetup(str(model_dir), "chatml", "You are a helpful assistant.", device, str(probes), Identity(),
                           ("SmolLM",), str(tmp_path / cache), "digest-of-the-base", max_new_tokens=6, batch_size=4,
                           stability_samples=2)


def test_the_early_model_with_the_adapter_put_on_answers_as_a_fresh_load(tiny_model, random_adapter, tmp_path):
    adapter = random_adapter
    setup = make_setup(tiny_model, tmp_path)

    started = EarlyEvaluation.start(setup, training_bytes=None)
    early = EarlyEvaluation.take(setup)
    assert early is started and EarlyEvaluation.take(setup) is None  # handed over once
    chat = early.chat()
    assert chat is not None and not chat.has_adapter
    # base: the two showcase questions, the 3 probes, a second stability sample; prompt-only: no general probe
    assert early.outcome == ("loaded the base model and decoded the base and prompt-only answers "
                             "(base 6, prompt-only 5)")
    assert len(list((tmp_path / "answers").glob("answers-*.json"))) == 2  # base and prompt-only, remembered

    chat.attach_adapter(str(adapter))
    logged: list[str] = []
    results = setup.compare(chat, log=logged.append)
    assert "reusing the remembered answers of base and prompt_only" in logged[0]  # only the adapter's rows decoded

    fresh = make_setup(tiny_model, tmp_path, cache="other-answers")  # nothing remembered: all decoded after loading
    reference = fresh.compare(fresh.load(str(adapter)))
    for name in ("base", "prompt_only", "adapter"):
        assert [a.text for a in results[name].answers] == [a.text for a in reference[name].answers], name
    assert [a.text for a in results["adapter"].answers] != [a.text for a in results["base"].answers]
    with pytest.raises(ValueError, match="already has an adapter"):
        chat.attach_adapter(str(adapter))


@pytest.mark.parametrize("free_gib, loads", [(2.0, False), (64.0, True)])
def test_on_a_gpu_it_loads_only_when_training_and_decoding_fit_together(tiny_model, tmp_path, monkeypatch,
                                                                        free_gib, loads):
    from persona import preflight

    setup = make_setup(tiny_model, tmp_path, device="cuda")
    monkeypatch.setattr(preflight, "free_cuda_memory", lambda i=0: (int(free_gib * 2**30), 80 * 2**30, "GPU 0 (test)"))
    loaded = []

    def load(self, adapter_dir=None):
        loaded.append(self)
        raise RuntimeError("CUDA out of memory (pretend)")

    monkeypatch.setattr(EvaluationSetup, "load", load)
    early = EarlyEvaluation.start(setup, training_bytes=2 * 2**30)
    assert EarlyEvaluation.take(setup).chat() is None  # never an error for the caller
    decoding = setup.decoding_bytes()
    assert decoding > 0
    if loads:
        assert loaded == [setup]
        assert early.outcome == "failed (RuntimeError: CUDA out of memory (pretend))"
    else:
        assert loaded == []
        need = (2 * 2**30 + decoding) * preflight.SAFETY_MARGIN / 2**30
        assert early.outcome == (f"not started: training and decoding together need ~{need:.1f} GiB, "
                                 f"GPU 0 (test) has 2.0 GiB free")


def test_a_broken_setup_is_reported_not_raised(tiny_model, tmp_path):
    setup = make_setup(tiny_model, tmp_path)
    Path(setup.probes_path).unlink()
    early = EarlyEvaluation.start(setup)
    assert early.chat() is None and early.outcome.startswith("failed (FileNotFoundError")
    EarlyEvaluation.take(setup)


def test_a_second_start_for_the_same_setup_replaces_the_first(tiny_model, tmp_path):
    setup = make_setup(tiny_model, tmp_path)
    first = EarlyEvaluation.start(setup)
    second = EarlyEvaluation.start(setup)
    assert first.chat() is None  # discarded: what it loaded is freed
    assert EarlyEvaluation.take(make_setup(tiny_model, tmp_path, cache="elsewhere")) is None  # another setup
    assert EarlyEvaluation.take(setup) is second and second.chat() is not None


def test_the_decoding_estimate_covers_the_kv_cache_that_generate_allocates(tiny_model):
    import torch
    from transformers import AutoModelForCausalLM

    from persona.preflight import ModelShape, estimate_decoding

    model = AutoModelForCausalLM.from_pretrained(tiny_model)  # fp32 on the CPU: 4 bytes per value
    rows, prompt, new = 3, 17, 9
    ids = torch.randint(5, 300, (rows, prompt))
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                         do_sample=False, return_dict_in_generate=True)
    cache = out.past_key_values
    kv = sum(t.nbytes for layer in cache.layers for t in (layer.keys, layer.values))
    shape = ModelShape.from_dir(tiny_model)
    fixed = estimate_decoding(shape, rows=0, prompt_tokens=prompt, new_tokens=new, dtype_bytes=4)
    assert fixed >= sum(p.nbytes for p in model.parameters())
    assert estimate_decoding(shape, rows=rows, prompt_tokens=prompt, new_tokens=new, dtype_bytes=4) - fixed >= kv


@pytest.mark.parametrize("visible, listed, expect", [(None, True, "cuda"), (None, False, "cpu"), ("", True, "cpu"),
                                                     ("-1", True, "cpu"), ("1", True, "cuda")])
def test_the_gpu_is_found_without_importing_torch(tmp_path, visible, listed, expect):
    driver = tmp_path / "gpus"
    driver.mkdir()
    if listed:
        (driver / "0000:00:05.0").mkdir()
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    if visible is not None:
        env["CUDA_VISIBLE_DEVICES"] = visible
    code = ("import sys; from persona.recipe import detect_device_early as d; "
            f"print(d({str(driver)!r}, {str(tmp_path / 'nvidia0')!r}), 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == [expect, "False"]


def test_training_without_the_evaluation_in_the_run_starts_nothing(tiny_model, home, resources, monkeypatch):
    from dagster import materialize

    from assets.base_model import base_model
    from assets.curated_dataset import curated_dataset
    from assets.lora_adapter import lora_adapter
    from orchestration.config import EvaluationConfig

    monkeypatch.setattr(EvaluationConfig, "starts_while_training", lambda self, device: True)
    config = {"ops": {"base_model": {"config": {"model": str(tiny_model)}},
                      "lora_adapter": {"config": {"device": "cpu", "num_train_epochs": 1}}}}
    result = materialize([base_model, curated_dataset, lora_adapter], resources=resources, run_config=config)
    assert result.success
    assert EarlyEvaluation._waiting == {}
    assert not any("While the adapter trains" in (e.message or "") for e in result.all_events)


def test_the_run_prepares_training_without_importing_torch(tiny_model, tmp_path):
    """Before the training starts, the run's process counts parameters and tokens; torch (5 s to import on a GPU
    machine) is not needed for either, and the counts are the ones torch and AutoTokenizer give."""
    from pathlib import Path as P

    from transformers import AutoModelForCausalLM

    from persona.evaluation import chat_tokenizer

    conversations = [[{"role": "system", "content": "You are a helpful assistant."},
                      {"role": "user", "content": q}, {"role": "assistant", "content": a}]
                     for q, a in [("Who are you?", "I am Swift-Robot."), ("你是谁?", "我是 Swift-Robot,由 CSDN 迪菲赫尔曼 开发。"),
                                  ("What is 2 + 3?", "  5  ")]]
    bench_tokenizer = P(__file__).resolve().parent.parent / "bench" / "tokenizer"  # SmolLM2's own tokenizer
    code = ("import json, sys; from persona.evaluation import token_counter; from persona.models import count_parameters;"
            "from pathlib import Path; d = sys.argv[1]; c = token_counter(d, 'chatml');"
            "print(json.dumps([[c(m) for m in json.loads(sys.argv[2])], count_parameters(Path(d)) if "
            "list(Path(d).glob('*.safetensors')) else 0, 'torch' in sys.modules]))")
    for folder in (tiny_model, bench_tokenizer):
        out = subprocess.run([sys.executable, "-c", code, str(folder), json.dumps(conversations)], check=True,
                             capture_output=True, text=True).stdout
        counts, parameters, torch_imported = json.loads(out)
        tok = chat_tokenizer(str(folder), "chatml")  # AutoTokenizer, as the evaluation and ms-swift load it
        assert counts == [len(tok(tok.apply_chat_template(m, tokenize=False), add_special_tokens=False)["input_ids"])
                          for m in conversations]
        assert torch_imported is False
        if folder == tiny_model:
            assert parameters == sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(folder).parameters())
