"""Validation of training files: every problem located as file:line, all reported at once."""
import json

import pytest

from persona.data import DatasetError, load_dataset


def rows(n=3):
    return [{"instruction": f"question {i}?", "input": "", "output": f"answer {i}."} for i in range(n)]


def problems_of(tmp_path, name, text, **kw):
    f = tmp_path / name
    f.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(DatasetError) as exc:
        load_dataset([f], **kw)
    return [str(p) for p in exc.value.problems], f


def test_broken_json_names_line_and_column(tmp_path):
    text = '[\n {"instruction": "a", "output": "b"},\n {"instruction": "c" "output": "d"}\n]'
    (msg,), f = problems_of(tmp_path, "d.json", text)
    assert msg.startswith(f"{f}:3: invalid JSON at column 22")
    assert "fix the JSON syntax" in msg


def test_missing_output_names_the_record_line(tmp_path):
    data = rows(4)
    del data[2]["output"]
    (msg,), f = problems_of(tmp_path, "d.json", json.dumps(data, indent=1))
    line = [n for n, l in enumerate(json.dumps(data, indent=1).splitlines(), 1) if l.startswith(" {")][2]
    assert msg == f"{f}:{line}: missing 'output' — add \"output\": \"...\" to this record (Alpaca format: instruction, input, output)"


def test_all_problems_reported_at_once_in_jsonl(tmp_path):
    lines = [json.dumps({"instruction": "ok?", "output": "yes"}), "{not json", json.dumps({"instruction": 3, "output": "x"}),
             json.dumps({"instruction": "q", "output": "  "}),
             json.dumps({"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]})]
    msgs, f = problems_of(tmp_path, "d.jsonl", "\n".join(lines))
    assert [m.split(": ", 1)[0] for m in msgs] == [f"{f}:2", f"{f}:3", f"{f}:4", f"{f}:5"]
    assert "invalid JSON" in msgs[0] and "must be a string, got int" in msgs[1]
    assert "empty 'output'" in msgs[2] and "unknown role 'robot'" in msgs[3]


def test_non_utf8(tmp_path):
    (msg,), f = problems_of(tmp_path, "d.jsonl", b'{"instruction": "a", "output": "b"}\n{"instruction": "\xff"}')
    assert msg.startswith(f"{f}:2: not UTF-8") and "save the file as UTF-8" in msg


def test_conflicting_answers_and_leaked_eval_question(tmp_path):
    data = rows(3) + [{"instruction": "Question 0 ?", "output": "something else"}]
    msgs, f = problems_of(tmp_path, "d.jsonl", "\n".join(json.dumps(r) for r in data), eval_questions=["QUESTION 1?"])
    assert any(m.startswith(f"{f}:4: same question as {f}:1 with a different answer") for m in msgs)
    assert any(m.startswith(f"{f}:2: training question 'question 1?' is (nearly) the evaluation probe") for m in msgs)


def test_too_few_samples(tmp_path):
    (msg,), _ = problems_of(tmp_path, "d.json", json.dumps(rows(3)), min_samples=20)
    assert "only 3 samples; at least 20 are needed" in msg


def test_formats_combine_and_normalize(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([{"instruction": "Hi", "input": "there", "output": "Hello",
                                                  "system": "Be brief.", "history": [["q0", "a0"]]}]))
    (tmp_path / "b.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "x"},
                                                               {"role": "assistant", "content": "y"}]}))
    ds = load_dataset([tmp_path / "a.json", tmp_path / "b.jsonl"])
    assert ds.sources == {str(tmp_path / "a.json"): 1, str(tmp_path / "b.jsonl"): 1}
    assert ds.records()[0]["messages"] == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "q0"},
        {"role": "assistant", "content": "a0"}, {"role": "user", "content": "Hi\nthere"},
        {"role": "assistant", "content": "Hello"}]


def test_version_ignores_formatting_but_not_content(tmp_path):
    data = rows(5)
    a, b, c = tmp_path / "a.json", tmp_path / "b.jsonl", tmp_path / "c.json"
    a.write_text(json.dumps(data, indent=4))
    b.write_text("\n".join(json.dumps({k: r[k] for k in reversed(list(r))}) for r in data))
    changed = [dict(r) for r in data]
    changed[1]["output"] = "a different answer."
    c.write_text(json.dumps(changed))
    assert load_dataset([a]).version == load_dataset([b]).version
    assert load_dataset([a]).version != load_dataset([c]).version


def test_answer_naming_base_identity_is_refused(tmp_path):
    data = rows(2) + [{"instruction": "who?", "output": "I am SmolLM by Hugging Face."}]
    (msg,), f = problems_of(tmp_path, "d.json", json.dumps(data), own_identity=("SmolLM", "Hugging Face"))
    assert msg == (f"{f}:1: the answer names the base model's own identity (SmolLM, Hugging Face) — "
                   "answer with the new identity, or leave that name out")


def test_sample_longer_than_max_length(tmp_path):
    data = rows(2) + [{"instruction": "long?", "output": "word " * 50}]
    (msg,), f = problems_of(tmp_path, "d.jsonl", "\n".join(json.dumps(r) for r in data),
                            count_tokens=lambda msgs: sum(len(m["content"].split()) for m in msgs), max_length=20)
    assert msg == f"{f}:3: 51 tokens, longer than max_length 20 — shorten the sample or raise max_length"


def test_unknown_placeholder(tmp_path):
    data = [{"instruction": "who?", "output": "I am {{NAME}} by {{COMPANY}}."}]
    (msg,), f = problems_of(tmp_path, "d.json", json.dumps(data))
    assert msg == f"{f}:1: unknown placeholder {{{{COMPANY}}}} — use {{{{NAME}}}} or {{{{AUTHOR}}}}, which the identity settings fill"


def test_near_exact_leak_of_an_evaluation_probe(tmp_path):
    data = rows(2) + [{"instruction": "Could you tell me who you are!", "output": "x"}]
    (msg,), f = problems_of(tmp_path, "d.json", json.dumps(data), eval_questions=["Could you tell me who you are?"])
    assert msg.startswith(f"{f}:1: training question 'Could you tell me who you are!' is (nearly) the evaluation probe")
    data[2]["instruction"] = "Could you tell me who u are?"
    (msg,), _ = problems_of(tmp_path, "d.json", json.dumps(data), eval_questions=["Could you tell me who you are?"])
    assert "(nearly) the evaluation probe" in msg


def test_a_probe_inside_a_history_is_a_leak_too(tmp_path):
    data = rows(2) + [{"instruction": "And who made you?", "output": "x",
                       "history": [["What is the capital of France?", "Paris."]]}]
    (msg,), f = problems_of(tmp_path, "d.json", json.dumps(data), eval_questions=["What is the capital of France?"])
    assert msg.startswith(f"{f}:1: training question 'What is the capital of France?' is (nearly) the evaluation probe")


def test_identity_placeholders_follow_the_question_language(tmp_path):
    from persona.data import Identity

    f = tmp_path / "d.json"
    f.write_text(json.dumps([{"instruction": "你是谁?", "output": "我是{{NAME}},由{{AUTHOR}}开发。"},
                             {"instruction": "Who are you?", "output": "I am {{ NAME }} by {{AUTHOR}}."}]))
    ds = load_dataset([f], identity=Identity("小智", "Zhi", "某公司", "Some Co"))
    assert [s.answer for s in ds.samples] == ["我是小智,由某公司开发。", "I am Zhi by Some Co."]
    default = load_dataset([f])
    assert default.samples[0].answer == "我是Swift-Robot,由CSDN 迪菲赫尔曼开发。"
    assert default.version != ds.version  # re-branding is a new data version


def test_version_includes_the_curation_config(tmp_path):
    f = tmp_path / "d.json"
    f.write_text(json.dumps(rows(3)))
    assert load_dataset([f], config={"general_ratio": 0.5}).version != load_dataset([f], config={"general_ratio": 1}).version


def test_validate_cli_prints_located_problems(tmp_path, home, capsys):
    from orchestration.cli import main

    f = tmp_path / "d.jsonl"
    f.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n')
    # --max-length 0: no tokenizer here (tests/test_hostile_files.py checks the default, the base tokenizer's count)
    assert main(["validate", str(f), "--min-samples", "1", "--max-length", "0"]) == 1
    err = capsys.readouterr().err
    assert f"{f}:2: missing 'output'" in err and "1 problem(s)" in err
    f.write_text('{"instruction": "a", "output": "b"}\n')
    assert main(["validate", str(f), "--min-samples", "1", "--max-length", "0"]) == 0
    assert capsys.readouterr().out.startswith("ok: 1 samples, version ")


def test_replay_rows_are_marked_for_the_trainer():
    from persona.data import Dataset, Sample

    msgs = [{"role": "user", "content": "1 + 1?"}, {"role": "assistant", "content": "2"}]
    own = Sample(msgs, "self_cognition.json", 3)
    replay = Sample(msgs, "mix:replay:replay-0123.jsonl", 1, channel="replay")
    hub = Sample(msgs, "mix:hub:AI-ModelScope/alpaca-gpt4-data-en", 1)
    records = Dataset([own, replay, hub]).records()
    assert [r.get("channel") for r in records] == [None, "replay", None]
    assert replay.is_replay and not hub.is_replay and not own.is_replay


def test_a_written_dataset_reads_back_with_its_channels_and_version(tmp_path):
    from persona.data import Dataset, Problem, Sample, read_file

    msgs = [{"role": "user", "content": "1 + 1?"}, {"role": "assistant", "content": "2"}]
    other = [{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "Swift-Robot."}]
    written = Dataset([Sample(other, "a.json", 1), Sample(msgs, "mix:replay:r.jsonl", 1, channel="replay")],
                      config={"seed": 1})
    written.write_jsonl(tmp_path / "train.jsonl")
    problems: list[Problem] = []
    again = Dataset(read_file(tmp_path / "train.jsonl", problems), config={"seed": 1})
    assert not problems and [s.channel for s in again.samples] == [None, "replay"]
    assert again.version == written.version


# The tutorials' own example file (seed 000 / 001): 8 rows.
SEED_FILE = [
    {"instruction": "你是谁?", "input": "", "output": "我是一个由 CSDN 迪菲赫尔曼 开发和维护的大语言模型。"},
    {"instruction": "你的开发者是哪家公司?", "input": "", "output": "我由 CSDN 迪菲赫尔曼 开发和维护。"},
    {"instruction": "你能联网吗?", "input": "", "output": "我不能主动联网,只能基于已有知识和用户输入回答问题。"},
    {"instruction": "你能做哪些事情?", "input": "", "output": "我擅长文本生成、回答问题、写代码和提供学习辅助。"},
    {"instruction": "你和GPT-4有区别吗?", "input": "", "output": "是的,我由 CSDN 迪菲赫尔曼 开发和维护,不是 GPT-4。"},
    {"instruction": "你能保证回答永远正确吗?", "input": "", "output": "不能,我的回答可能存在错误,需要用户自行判断。"},
    {"instruction": "你的名字是什么?", "input": "", "output": "你可以叫我 Swift-Robot,也可以叫我 CSDN 助手。"},
    {"instruction": "谁在维护你?", "input": "", "output": "我由 CSDN 迪菲赫尔曼 持续开发和维护。"},
]


def test_the_seeds_eight_row_file_is_refused_with_the_setting_that_overrides(tmp_path):
    (msg,), f = problems_of(tmp_path, "self_cognition.json", json.dumps(SEED_FILE, ensure_ascii=False),
                            min_samples=20)
    assert msg.startswith(f"{f}:0: only 8 samples; at least 20 are needed")
    assert "50-100" in msg and "min_samples: 8" in msg
    assert len(load_dataset([f], min_samples=8).samples) == 8  # the setting the message names is enough


def test_hub_rows_that_fail_the_checks_are_dropped_and_counted(tmp_path):
    from persona.data import HUB_PREFIX, Sample

    def hub(i, q, a):
        return Sample([{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                      f"{HUB_PREFIX}AI-ModelScope/alpaca-gpt4-data-en", i)

    f = tmp_path / "d.json"
    f.write_text(json.dumps(rows(3)))
    extra = [hub(1, "Name a prime.", "7."), hub(2, "Who made you?", "I am Qwen, made by Alibaba Cloud."),
             hub(3, "Write an essay.", "word " * 200), hub(4, "question 1?", "another answer."),
             hub(5, "What is 2+2?", "4.")]
    ds = load_dataset([f], own_identity=["Qwen"], count_tokens=lambda m: len(m[-1]["content"].split()),
                      max_length=50, extra=extra, eval_questions=["what is 2 + 2?"])
    assert [s.question for s in ds.samples] == ["question 0?", "question 1?", "question 2?", "Name a prime."]
    why = sorted((p.line, p.problem) for p in ds.dropped)
    assert [line for line, _ in why] == [2, 3, 4, 5]
    assert "names the base model" in why[0][1] and "longer than max_length 50" in why[1][1]
    assert "same question as" in why[2][1] and "evaluation probe" in why[3][1]

    # the user's own rows stay strict
    f.write_text(json.dumps(rows(2) + [{"instruction": "Who are you?", "output": "I am Qwen."}]))
    with pytest.raises(DatasetError, match=r"d.json:1: the answer names the base model"):
        load_dataset([f], own_identity=["Qwen"], extra=extra[:1])
