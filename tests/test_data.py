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
    assert any(m.startswith(f"{f}:2: evaluation question") for m in msgs)


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
