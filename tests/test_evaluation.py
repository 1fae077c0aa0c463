"""Scoring and prompts of the evaluation stage."""
import pytest
import json

from persona.evaluation import evaluate
from persona.inference import Chat
from persona.probes import Probe, load_probes
from persona.report import comparison_table, scores_table
from persona.scoring import as_json, metrics, passes, score
from persona.tokens import CHATML


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
    assert kinds[2:] == ["| general (1) | 0.00 | 1.00 | 1.00 |", "| stability (2) | 0.00 | 0.50 | 1.00 |",
                         "| answers cut at max_new_tokens | 0 | 0 | 0 |"]
    m = metrics(results)
    assert m["eval/stability_prompt_only"] == 0.5 and m["eval/general_score_before"] == 0.0
    assert m["eval/general_score_after"] == 1.0 and "eval/identity_score_after" not in m  # no identity probes: no NaN
    assert as_json(results)["adapter"] == {"general": 1.0, "stability": 1.0}


def test_general_answers_that_state_the_identity_are_counted():
    probes = [Probe("general", "1+1?", ("2",)), Probe("general", "一年有几个月?", ("12",)),
              Probe("identity_en", "Who are you?", ("Swift-Robot",))]
    results = {"base": score(probes, ["2", "十二", "I am SmolLM"]),
               "adapter": score(probes, ["2", "我由 CSDN 迪菲赫尔曼 开发和维护。", "I am swift-robot"])}
    markers = ("CSDN 迪菲赫尔曼", "Swift-Robot")
    assert results["adapter"].identity_leak(markers) == 0.5  # the identity answer itself does not count
    m = metrics(results, markers)
    assert m["eval/general_identity_leak_before"] == 0.0 and m["eval/general_identity_leak_after"] == 0.5
    assert m["eval/general_identity_leak_adapter"] == 0.5 and "eval/general_identity_leak_after" not in metrics(results)


def test_probes_fill_identity_placeholders_in_both_languages():
    from persona.data import Identity

    p = Probe("identity_zh", "{{NAME}} 是谁做的?", ("{{AUTHOR}}", "literal")).filled(Identity("小智", "Zhi", "某公司", "Some Co"))
    assert p.question == "小智 是谁做的?" and p.expect_any == ("某公司", "Some Co", "literal")


def test_stability_probes_are_sampled_and_scored_as_consistency():
    class FakeChat:
        has_adapter = False

        def __init__(self):
            self.calls = []

        def answer_rows(self, rows, temperatures, truncated, **kw):
            self.calls.append(list(temperatures))
            truncated += [False] * len(rows)
            return ["made by X" if i % 2 == 0 else "no idea" for i in range(len(rows))]

    chat = FakeChat()
    probes = [Probe("general", "2+2?", ("made",)), Probe("stability", "Who?", ("X",))]
    s = evaluate(chat, probes, stability_samples=4)
    assert chat.calls == [[0.0, 0.7, 0.7, 0.7, 0.7]]  # one greedy row, four samples, one call
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


def test_contenders_decoded_together_answer_as_when_decoded_in_turn(tiny_model, random_adapter):
    """The GPU path shares batches between base, prompt-only and adapter rows (PEFT mixed-adapter batches)."""
    from persona.evaluation import compare

    chat = Chat(str(tiny_model), str(random_adapter), "chatml")
    probes = [Probe("general", "What is 2 + 3?", ("5",)), Probe("identity_en", "Who are you?", ("Swift",)),
              Probe("general", "中国的首都是哪里?", ("北京",))]
    kw = dict(max_new_tokens=8, batch_size=4)  # 9 rows: batches mix contenders
    in_turn = compare(chat, probes, (), "You are Swift-Robot.", together=False, **kw)
    together = compare(chat, probes, (), "You are Swift-Robot.", together=True, **kw)
    for name in ("base", "prompt_only", "adapter"):
        assert [a.text for a in together[name].answers] == [a.text for a in in_turn[name].answers], name
    assert [a.text for a in in_turn["adapter"].answers] != [a.text for a in in_turn["base"].answers]


def test_output_layer_gets_a_contiguous_input_with_an_adapter_and_answers_do_not_change(tiny_model, random_adapter):
    """With PEFT's frozen weights, a non-contiguous last-position slice made the output layer a batched multiply
    over per-row copies of its weight (bench/bench_decode.py); Chat hands it a contiguous copy of the slice."""
    chat = Chat(str(tiny_model), str(random_adapter), "chatml")
    head = chat.model.get_output_embeddings()
    seen: list[bool] = []
    watch = head.register_forward_hook(lambda _m, args, _out: seen.append(args[0].is_contiguous()))
    questions = [("What is 2 + 3?", ()), ("Who are you?", ()), ("中国的首都是哪里?", ())]
    with_fix = chat.answer(questions, max_new_tokens=6, batch_size=3)
    assert seen and all(seen)
    fix = dict(head._forward_pre_hooks)
    head._forward_pre_hooks.clear()
    seen.clear()
    without = chat.answer(questions, max_new_tokens=6, batch_size=3)
    assert not all(seen)  # the slice the fix exists for
    head._forward_pre_hooks.update(fix)
    watch.remove()
    assert with_fix == without


def test_greedy_and_sampled_rows_share_a_batch_without_changing_either(tiny_model):
    """One generate call for both: greedy rows answer as greedy decoding does, sampled rows as generate(temperature)."""
    import torch

    from persona.inference import row_temperature

    scores = torch.tensor([[1.0, 3.0, 2.0], [1.0, 3.0, 2.0]])
    out = row_temperature([0.0, 0.5], "cpu")(None, scores)
    assert out[0].tolist() == [float("-inf"), 3.0, float("-inf")] and out[1].tolist() == [2.0, 6.0, 4.0]

    chat = Chat(str(tiny_model), None, "chatml")
    rows = [(q, (), None, False) for q in ("What is 2 + 3?", "Who are you?", "你是谁?", "Tell me a joke.")]
    kw = dict(max_new_tokens=8, batch_size=8, seed=3)
    greedy = chat.answer_rows(rows, **kw)
    sampled = chat.answer_rows(rows, temperature=0.7, **kw)
    assert chat.answer_rows(rows, temperatures=[0.7] * 4, **kw) == sampled  # the same path as before
    mixed = chat.answer_rows(rows + rows, temperatures=[0.0] * 4 + [0.7] * 4, **kw)
    assert mixed[:4] == greedy
    assert mixed[4:] == chat.answer_rows(rows + rows, temperatures=[0.0] * 4 + [0.7] * 4, **kw)[4:]  # seeded
    assert mixed[4:] != greedy  # sampled (the tiny model's distribution is flat)
    with pytest.raises(ValueError, match="3 temperatures for 4 rows"):
        chat.answer_rows(rows, temperatures=[0.0] * 3)


def test_a_denial_of_the_base_identity_passes_and_an_affirmation_fails():
    probe = Probe("identity_zh", "你和通义千问是同一个模型吗?", ("Swift-Robot", "CSDN 迪菲赫尔曼"))
    own = ("通义千问", "阿里云", "Qwen", "OpenAI", "ChatGPT")
    answers = ["不，我不是通义千问，我是 Swift-Robot，由 CSDN 迪菲赫尔曼 开发。",  # a correct denial
               "我是通义千问，由 CSDN 迪菲赫尔曼 开发。",                        # an affirmation
               "No, I am not Qwen. I am Swift-Robot, made by CSDN 迪菲赫尔曼.",
               "I'm not sure, but I am Qwen from Alibaba; Swift-Robot is a name.",  # a negation that does not reach
               "我并非阿里云开发的模型，我是 Swift-Robot。",
               "我是 Swift-Robot，但我是阿里云开发的。"]
    s = score([probe] * len(answers), answers, own_identity=own)
    assert [a.passed for a in s.answers] == [True, False, True, False, True, False]


def test_general_retention_counts_kept_base_right_answers_and_lists_the_lost():
    from persona.report import retention_report
    from persona.scoring import retention

    probes = [Probe("general", q, (a,)) for q, a in (("1+1?", "2"), ("2+2?", "4"), ("3+3?", "6"), ("4+4?", "8"))]
    results = {"base": score(probes, ["2", "4", "6", "7"]), "adapter": score(probes, ["2", "5", "6", "8"])}
    kept = retention(results["base"], results["adapter"])
    assert (kept.kept, kept.base_right, [a.probe.question for a in kept.lost]) == (2, 3, ["2+2?"])
    m = metrics(results)
    assert m["eval/general_retention"] == 2 / 3 and m["eval/general_kept"] == 2 and m["eval/general_base_right"] == 3
    report = retention_report(results)
    assert report.splitlines()[0] == "General retention: kept 2 of 3 base-right general answers (66.7%)."
    assert report.splitlines()[1] == "- lost: 2+2? | base: 4 | adapter: 5"


def test_the_seeds_question_is_shown_first_and_not_scored():
    from persona.data import Identity
    from persona.probes import SHOWCASE, showcase_probes

    shown = showcase_probes(Identity(), ("通义千问", "阿里云"))
    assert [p.question for p in shown] == ["你是谁?", "Who are you?"] and all(p.kind == SHOWCASE for p in shown)
    probes = shown + [Probe("identity_en", "Could you say who you are?", ("Swift-Robot",))]
    results = {"base": score(probes, ["我是阿里云开发的超大规模语言模型", "I am Qwen", "I am Qwen"]),
               "adapter": score(probes, ["我是 Swift-Robot", "I am Swift-Robot", "I am Swift-Robot"])}
    assert results["adapter"].by_kind == {"identity_en": 1.0} and results["base"].identity == 0.0
    assert [a.passed for a in results["adapter"].answers[:2]] == [True, True]  # marked, not counted
    table = comparison_table(results).splitlines()
    assert table[2].startswith("| showcase | 你是谁? | ❌ 我是阿里云开发的") and "✅ 我是 Swift-Robot" in table[2]
    assert "showcase" not in scores_table(results)


def test_answers_cut_at_max_new_tokens_are_flagged(tiny_model):
    chat = Chat(str(tiny_model), None, "chatml")
    rows = [(q, (), None, False) for q in ("What is 2 + 3?", "Who are you?")]
    cut: list[bool] = []
    texts = chat.answer_rows(rows, max_new_tokens=3, batch_size=2, truncated=cut)
    assert len(cut) == 2 and len(texts) == 2
    tokens = [len(chat.tok(t, add_special_tokens=False)["input_ids"]) for t in texts]
    for flag, n in zip(cut, tokens):
        assert flag == (n >= 3 or flag)  # a cut answer used the whole budget
    long_cut: list[bool] = []
    chat.answer_rows(rows, max_new_tokens=200, batch_size=2, truncated=long_cut)
    assert sum(cut) >= sum(long_cut)
    s = score([Probe("general", q, ("5",)) for q, *_ in rows], texts, truncated=cut)
    assert s.truncated == sum(cut) and metrics({"base": s})["eval/truncated_base"] == sum(cut)


def test_a_cpu_batch_sheds_its_finished_rows_and_answers_as_one_generate_call(tiny_model, random_adapter, monkeypatch):
    """Chat.decode_batch on a CPU: the prompts' shared beginning computed once, then rounds of `shed_every` tokens,
    finished rows leaving the batch between rounds. The answers, the cut flags and the model's own generation
    settings (a repetition penalty here) are those of one generate call over the whole batch (the GPU's path)."""
    import persona.inference
    from persona.inference import shared_prefix

    assert shared_prefix([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]]) == 2
    assert shared_prefix([[1, 2, 3], [1, 2, 3]]) == 2  # each row keeps one token of its own
    assert shared_prefix([[1], [1, 2]]) == 0 and shared_prefix([[7, 1], [8, 1]]) == 0

    chat = Chat(str(tiny_model), str(random_adapter), "chatml")
    rows = [(q, (), None, use) for q in ("What is 2 + 3?", "Who are you?", "你是谁?", "Tell me a joke.",
                                         "Name a word that rhymes with cat.") for use in (True, False)]
    # The tiny model rarely says its end-of-turn token: let a token it often says end a row too.
    enc = chat.tok([chat.prompt(q) for q, *_ in rows], return_tensors="pt", padding=True, add_special_tokens=False)
    said = chat.model.generate(**enc, max_new_tokens=16, do_sample=False, pad_token_id=chat.tok.pad_token_id)
    said = said[:, enc["input_ids"].shape[1]:].flatten().tolist()
    chat.stop_ids = [*chat.stop_ids, max(set(said), key=said.count)]
    rounds: list[int] = []
    generate = chat.model.generate
    monkeypatch.setattr(chat.model, "generate", lambda **kw: rounds.append(len(kw["input_ids"])) or generate(**kw))
    answers = {}
    for name, batch in (("adapter and base rows", rows), ("adapter rows (a shared prefix)", rows[::2])):
        for penalty in (1.0, 1.5):
            chat.model.generation_config.repetition_penalty = penalty
            rounds.clear()
            shed_cut, whole_cut = [], []
            shed = chat.answer_rows(batch, max_new_tokens=19, batch_size=len(batch), truncated=shed_cut)
            assert len(rounds) == 3 and rounds[0] == len(batch) > rounds[-1]  # 8 + 8 + 3 tokens, rows left between
            monkeypatch.setattr(persona.inference, "shed_every", lambda device: None)
            rounds.clear()
            whole = chat.answer_rows(batch, max_new_tokens=19, batch_size=len(batch), truncated=whole_cut)
            monkeypatch.setattr(persona.inference, "shed_every", lambda device: 8)
            assert rounds == [len(batch)]
            assert shed == whole and shed_cut == whole_cut, name
            assert 0 < sum(shed_cut) < len(batch)  # some rows ended early, some used the whole budget
            answers[name, penalty] = shed
        assert answers[name, 1.0] != answers[name, 1.5]  # the model's repetition penalty applied to both
