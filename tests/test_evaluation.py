"""Scoring and prompts of the evaluation stage."""
import json

from persona.evaluation import (CHATML, Chat, Probe, as_json, comparison_table, evaluate, load_probes, metrics, passes,
                                score, scores_table)


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


def test_tables_one_row_per_probe_and_per_kind():
    probes = [Probe("general", "1+1?", ("2",)), Probe("stability", "Who?", ("X",)), Probe("stability", "Who?", ("X",))]
    results = {"base": score(probes, ["a | b", "no", "no"]), "prompt_only": score(probes, ["2", "X", "no"]),
               "adapter": score(probes, ["2", "X", "X"])}
    table = comparison_table(results).splitlines()
    assert table[0] == "| kind | question | base model | identity in system prompt only | LoRA adapter |"
    assert table[2] == "| general | 1+1? | ❌ a \\| b | ✅ 2 | ✅ 2 |"
    assert len(table) == 4  # the stability probe's repeated samples show once
    kinds = scores_table(results).splitlines()
    assert kinds[2:] == ["| general | 0.00 | 1.00 | 1.00 |", "| stability | 0.00 | 0.50 | 1.00 |"]
    m = metrics(results)
    assert m["eval/stability_prompt_only"] == 0.5 and m["eval/general_score_before"] == 0.0
    assert m["eval/general_score_after"] == 1.0 and "eval/identity_score_after" not in m  # no identity probes: no NaN
    assert as_json(results)["adapter"] == {"general": 1.0, "stability": 1.0}


def test_probes_fill_identity_placeholders_in_both_languages():
    from persona.data import Identity

    p = Probe("identity_zh", "{{NAME}} 是谁做的?", ("{{AUTHOR}}", "literal")).filled(Identity("小智", "Zhi", "某公司", "Some Co"))
    assert p.question == "小智 是谁做的?" and p.expect_any == ("某公司", "Some Co", "literal")


def test_stability_probes_are_sampled_and_scored_as_consistency():
    class FakeChat:
        has_adapter = False

        def __init__(self):
            self.calls = []

        def answer(self, questions, temperature=0.0, **kw):
            self.calls.append((len(questions), temperature))
            return ["made by X" if i % 2 == 0 else "no idea" for i in range(len(questions))]

    chat = FakeChat()
    probes = [Probe("general", "2+2?", ("made",)), Probe("stability", "Who?", ("X",))]
    s = evaluate(chat, probes, stability_samples=4)
    assert chat.calls == [(1, 0.0), (4, 0.7)]
    assert s.by_kind == {"general": 1.0, "stability": 0.5}


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


def test_a_number_counts_only_as_a_whole_number():
    assert passes("A week has 7 days.", ["7", "seven"]) and passes("一年有12个月", ["12"])
    assert not passes("The Earth is approximately 129.9999999667 trillion kilometers", ["7"])
    assert not passes("That is 150.", ["5"]) and not passes("about 3.5", ["5"])
    assert passes("2 + 3 = 5.", ["5"]) and passes("It has SEVEN", ["seven"])
