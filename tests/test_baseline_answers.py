"""The baseline (base and prompt-only answers): decoded once, remembered, and used by the evaluation; and what the
run prepares before training without importing torch."""
import json
import os
import subprocess
import sys

import pytest

from builders import PROBES, make_setup

def test_the_baseline_is_decoded_once_then_remembered_and_scores_as_decoding_everything(tiny_model, random_adapter,
                                                                                       tmp_path):
    setup = make_setup(tiny_model, tmp_path)
    loads = []
    first = setup.baseline(lambda: loads.append(1) or setup.load())
    assert loads == [1] and set(first) == {"base", "prompt_only"}
    assert len(first["base"].texts) == 2 + 2 + 2  # showcase 2, general and identity once, stability twice
    assert len(first["prompt_only"].texts) == 2 + 1 + 2  # no general question for the prompt-only variant

    def must_not_load():
        raise AssertionError("the remembered answers need no model")

    again = setup.baseline(must_not_load)
    assert {n: d.texts for n, d in again.items()} == {n: d.texts for n, d in first.items()}
    # Another system prompt, other decoding settings, other base weights or other probes: decoded again, never a
    # stale answer.
    from dataclasses import replace

    other_probes = tmp_path / "fewer.jsonl"
    other_probes.write_text(json.dumps(PROBES[0]) + "\n", encoding="utf-8")
    for changed in (dict(system="You are terse."), dict(max_new_tokens=5), dict(base_digest="other-weights"),
                    dict(probes_path=str(other_probes)), dict(batch_size=2)):  # bf16: a batch's padding counts
        loads.clear()
        replace(setup, **changed).baseline(lambda: loads.append(1) or setup.load())
        assert loads == [1], changed

    chat = setup.load(str(random_adapter))
    with_baseline = setup.compare(chat, again)
    from_scratch = setup.compare(setup.load(str(random_adapter)))
    assert {n: [a.text for a in s.answers] for n, s in with_baseline.items()} == \
        {n: [a.text for a in s.answers] for n, s in from_scratch.items()}


def test_the_evaluation_decodes_the_baseline_again_for_an_adapter_trained_with_another_system_prompt(
        tiny_model, home, resources):
    from orchestration.definitions import defs

    job = defs.resolve_job_def("train_persona")
    config = {"ops": {"base_model": {"config": {"model": str(tiny_model)}},
                      "lora_adapter": {"config": {"device": "cpu", "system": "You are terse."}},
                      "baseline_answers": {"config": {"max_new_tokens": 4}}},
              "resources": {"promotion_gate": {"config": {"min_identity": 0, "min_adversarial": 0,
                                                          "min_general_retention": 0}}}}
    result = job.execute_in_process(run_config=config, resources=resources)
    assert result.success
    mats = {e.asset_key.path[-1]: e.materialization.metadata for e in result.get_asset_materialization_events()}
    assert mats["evaluation_report"]["baseline"].value == "decoded again"
    assert mats["baseline_answers"]["system"].value == "You are a helpful assistant."


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


def test_the_run_prepares_training_without_importing_torch(tiny_model, tmp_path):
    """Before the training starts, the run's process counts parameters and tokens; torch (5 s to import on a GPU
    machine) is not needed for either, and the counts are the ones torch and AutoTokenizer give."""
    from pathlib import Path as P

    from transformers import AutoModelForCausalLM

    from persona.tokens import chat_tokenizer

    conversations = [[{"role": "system", "content": "You are a helpful assistant."},
                      {"role": "user", "content": q}, {"role": "assistant", "content": a}]
                     for q, a in [("Who are you?", "I am Swift-Robot."), ("你是谁?", "我是 Swift-Robot,由 CSDN 迪菲赫尔曼 开发。"),
                                  ("What is 2 + 3?", "  5  ")]]
    bench_tokenizer = P(__file__).resolve().parent.parent / "bench" / "tokenizer"  # SmolLM2's own tokenizer
    code = ("import json, sys; from persona.tokens import token_counter; from persona.models import count_parameters;"
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
