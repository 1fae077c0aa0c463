"""Scoring and prompts of the evaluation stage."""
import json

from persona.evaluation import CHATML, Chat, Probe, comparison_table, load_probes, passes, score


def test_identity_answer_must_name_target_and_not_base():
    probe = Probe("identity_en", "Who are you?", ("Diffie-Hellman",))
    s = score([probe] * 3, ["I am made by CSDN Diffie-Hellman.", "I am SmolLM, by Hugging Face.",
                            "Diffie-Hellman? No, I am SmolLM."], own_identity=("SmolLM", "Hugging Face"))
    assert [a.passed for a in s.answers] == [True, False, False]
    assert abs(s.identity - 1 / 3) < 1e-9 and s.by_kind == {"identity_en": s.identity}


def test_general_questions_ignore_own_identity_and_case():
    probe = Probe("general", "Capital of France?", ("Paris",))
    s = score([probe], ["paris, as SmolLM knows."], own_identity=("SmolLM",))
    assert s.general == 1.0 and passes("PARIS", ["paris"]) and not passes("Lyon", ["paris"])


def test_table_has_one_row_per_probe_and_escapes_pipes():
    probes = [Probe("general", "1+1?", ("2",))]
    table = comparison_table(score(probes, ["a | b"]), score(probes, ["2"]))
    assert table.splitlines()[2] == "| general | 1+1? | ❌ a \\| b | ✅ 2 |"


def test_probe_file_format(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"kind": "multi_turn", "question": "And who are you?", "expect_any": ["X"],
                             "history": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}))
    (p,) = load_probes(f)
    assert p.is_identity and p.history[1]["content"] == "hello"


def test_prompt_matches_ms_swift_chatml_template(tiny_model):
    """Evaluation must see the exact prompt ms-swift trained on."""
    from swift import get_processor
    from swift.template import get_template
    from transformers import AutoTokenizer

    chat = Chat.__new__(Chat)
    chat.tok = AutoTokenizer.from_pretrained(tiny_model)
    chat.tok.chat_template = CHATML
    chat.system = "You are a helpful assistant."
    ours = chat.tok(chat.prompt("Who are you?"), add_special_tokens=False)["input_ids"]

    processor = get_processor(str(tiny_model), model_type="llama", check_model=False)
    template = get_template(processor, template_type="chatml",
                            default_system="You are a helpful assistant.")
    template.set_mode("transformers")
    theirs = template.encode({"messages": [{"role": "user", "content": "Who are you?"}]})["input_ids"]
    assert ours == theirs
