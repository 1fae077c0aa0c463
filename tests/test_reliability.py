"""Reliability and security: malformed data, crashes, kills and full disks lose nothing; no remote code; safe paths.

One good run on the tiny model sets up a dataset, an adapter, MLflow history and a champion. Then every
malformed input and every injected fault must fail clearly while all of that stays exactly as it was.
"""
import errno
import json
import os
import signal
import threading
import time
from pathlib import Path

import mlflow
import psutil
import pytest
from dagster import materialize

from assets.lora_adapter import TRAINER_RETRIES
from pipeline import ASSETS, run_config, snapshot

COUNTS = {"inputs tried": 0, "inputs rejected": 0, "faults injected": 0, "faults survived with nothing lost": 0}


@pytest.fixture(scope="module", autouse=True)
def report_counts(request):
    """After this module's tests, whichever ran: the counts the issue asks for."""
    yield
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print("\nreliability: " + ", ".join(f"{k}: {v}" for k, v in COUNTS.items()))
    assert COUNTS["inputs rejected"] == COUNTS["inputs tried"]
    assert COUNTS["faults survived with nothing lost"] == COUNTS["faults injected"]
GOOD = [{"instruction": q, "input": "", "output": "I am Tiny-Robot, made by the Test Lab."}
        for q in ["Who are you?", "What is your name?", "Who made you?", "Who built you?", "Introduce yourself.",
                  "Who is your author?", "Who created you?", "Who trained you?", "What are you?", "Who maintains you?",
                  "Which lab made you?", "Are you ChatGPT?", "What should I call you?", "Who developed you?",
                  "Who designed you?", "Where do you come from?", "Tell me your name.", "Who owns you?",
                  "Who programmed you?", "你是谁?", "你叫什么名字?", "Are you SmolLM?"]]


def good_json(**change) -> list[dict]:
    rows = [dict(r) for r in GOOD]
    for i, fields in change.items():
        rows[int(i[1:])].update(fields)
    return rows


def dump(rows) -> str:
    return json.dumps(rows, ensure_ascii=False, indent=1)


def jsonl(rows) -> str:
    return "\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n"


# name -> (file name, content, text the error must contain)
MALFORMED = {
    "truncated array": ("self_cognition.json", dump(GOOD)[:-40], "invalid JSON"),
    "missing comma": ("self_cognition.json", dump(GOOD).replace('},\n {', '}\n {', 1), "invalid JSON"),
    "trailing comma": ("self_cognition.json", dump(GOOD)[:-1] + ",]", "trailing comma"),
    "garbage after a record": ("self_cognition.json", dump(GOOD)[:-1] + " x]", "expected ',' or ']'"),
    "object, not array": ("self_cognition.json", json.dumps(GOOD[0]), "must be a JSON array"),
    "row without output": ("self_cognition.json", dump([r if i != 3 else {"instruction": "x?"} for i, r in enumerate(GOOD)]),
                           "missing 'output'"),
    "row without instruction": ("self_cognition.json", dump([r if i != 5 else {"output": "y"} for i, r in enumerate(GOOD)]),
                                "missing 'instruction'"),
    "output is a number": ("self_cognition.json", dump(good_json(r2={"output": 42})), "'output' must be a string, got int"),
    "instruction is a list": ("self_cognition.json", dump(good_json(r4={"instruction": ["a"]})),
                              "'instruction' must be a string, got list"),
    "blank output": ("self_cognition.json", dump(good_json(r6={"output": "   "})), "empty 'output'"),
    "bad history": ("self_cognition.json", dump(good_json(r1={"history": "q then a"})), "'history' must be a list"),
    "record is a string": ("self_cognition.json", dump(GOOD[:21] + ["Who are you?"]), "must be a JSON object, got str"),
    "unknown role": ("self_cognition.jsonl", jsonl(GOOD[:20] + [{"messages": [{"role": "bot", "content": "hi"},
                                                                             {"role": "assistant", "content": "x"}]}]),
                     "unknown role 'bot'"),
    "ends on the user": ("self_cognition.jsonl", jsonl(GOOD[:20] + [{"messages": [{"role": "user", "content": "hi"}]}]),
                         "the last message must be the assistant's answer"),
    "empty messages": ("self_cognition.jsonl", jsonl(GOOD[:20] + [{"messages": []}]), "'messages' must be a non-empty list"),
    "content not a string": ("self_cognition.jsonl", jsonl(GOOD[:20] + [{"messages": [
        {"role": "user", "content": 1}, {"role": "assistant", "content": "x"}]}]), "needs a string 'content'"),
    "broken jsonl line": ("self_cognition.jsonl", jsonl(GOOD)[:-3] + "\n{oops\n", "invalid JSON"),
    "jsonl line is an array": ("self_cognition.jsonl", jsonl(GOOD) + "[1, 2]\n", "must be a JSON object, got list"),
    "latin-1 bytes": ("self_cognition.json", dump(GOOD[:19]).replace("Who are you?", "Qui êtes-vous ?").encode("latin-1"),
                      "not UTF-8"),
    "UTF-16 file": ("self_cognition.json", dump(GOOD).encode("utf-16"), "not UTF-8"),
    "conflicting answers": ("self_cognition.json", dump(GOOD + [{"instruction": "who are you", "output": "Nobody."}]),
                            "with a different answer"),
    "names the base model": ("self_cognition.json", dump(good_json(r0={"output": "I am SmolLM by Hugging Face."})),
                             "names the base model's own identity"),
    "evaluation probe leaked": ("self_cognition.json", dump(GOOD + [{"instruction": "Could you say who you are?",
                                                                    "output": "I am Tiny-Robot."}]),
                                "(nearly) the evaluation probe"),
    "unknown placeholder": ("self_cognition.json", dump(good_json(r7={"output": "I am {{NAME}} of {{COMPANY}}."})),
                            "unknown placeholder {{COMPANY}}"),
    "too few samples": ("self_cognition.json", dump(GOOD[:5]), "only 5 samples; at least 20 are needed"),
    "sample too long": ("self_cognition.json", dump(good_json(r8={"output": "Tiny-Robot " * 700})),
                        "longer than max_length 512"),
    "empty file": ("self_cognition.json", "", "must be a JSON array"),
    "duplicate key": ("self_cognition.json", dump(GOOD)[:-3] + ', "output": "Nobody."}\n]', "duplicate key 'output'"),
    "100k-deep nesting": ("self_cognition.jsonl", jsonl(GOOD) + "[" * 100_000 + "]" * 100_000 + "\n",
                          "JSON nested too deeply"),
}


_GUARDS: list[threading.Timer] = []


def _fifo(path: Path) -> None:
    os.mkfifo(path)

    def release():  # should a regression open it: a writer that comes and goes ends the read (EOF), not the suite
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:  # no reader: nothing hangs
            pass
    guard = threading.Timer(60, release)
    guard.daemon = True
    guard.start()
    _GUARDS.append(guard)


# name -> (file, make it, text the error must contain): files that are not what they seem (issue #21, point 5)
HOSTILE = {
    "a FIFO named like the dataset": ("self_cognition.json", _fifo, "a named pipe (FIFO), not a regular file"),
    "a symlink loop": ("self_cognition.json", lambda p: p.symlink_to(p.name), "a symbolic link loop"),
    "a 17 MiB file": ("self_cognition.json", lambda p: p.write_text(" " * (17 * 2**20) + dump(GOOD)),
                      "over the 16 MiB limit for a data file"),
    "expect_any a string": ("probes.jsonl", lambda p: p.write_text(json.dumps(
        {"kind": "identity_en", "question": "Who are you?", "expect_any": "I am a banana"}) + "\n"),
        "'expect_any' must be a list of strings, got the string 'I am a banana'"),
}


@pytest.fixture
def trained(tiny_model, home, resources):
    """A home with one good run: curated data, an adapter (untrained: the fake trainer's), MLflow history and a
    champion."""
    result = materialize(ASSETS, resources=resources, run_config=lenient(run_config(tiny_model)))
    assert result.success and result.output_for_node("champion").promoted
    return snapshot(home, resources["mlflow_tracker"])


def lenient(config: dict) -> dict:
    """The tiny model cannot pass a real gate; open it so the first run crowns a champion to protect."""
    config["resources"] = {"promotion_gate": {"config": {"min_identity": 0, "min_adversarial": 0,
                                                         "min_general_retention": 0}}}
    return config


def failed_step(result) -> tuple[str, str]:
    event = next(e for e in result.all_events if e.is_step_failure)
    user = event.step_failure_data.user_failure_data
    return event.step_key, (user.description if user and user.description else event.step_failure_data.error.message)


def test_malformed_datasets_are_rejected_and_lose_nothing(trained, tiny_model, home, resources):
    data = home / "data"
    (data / "self_cognition.json").rename(data / "good.json.bak")
    for name, (file, content, expected) in MALFORMED.items():
        COUNTS["inputs tried"] += 1
        for f in ("self_cognition.json", "self_cognition.jsonl"):
            (data / f).unlink(missing_ok=True)
        path = data / file
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        config = run_config(tiny_model)
        config["ops"]["curated_dataset"] = {"config": {"sources": [file]}}
        result = materialize(ASSETS, resources=resources, run_config=config, raise_on_error=False)
        assert not result.success, name
        step, message = failed_step(result)
        assert step == "curated_dataset", (name, step, message)
        assert expected in message and f"{path}:" in message, (name, message)
        assert snapshot(home, resources["mlflow_tracker"]) == trained, name
        COUNTS["inputs rejected"] += 1


def test_hostile_files_stop_the_run_located_and_lose_nothing(trained, tiny_model, home, resources):
    data = home / "data"
    for name, (file, make, expected) in HOSTILE.items():
        COUNTS["inputs tried"] += 1
        path = data / file
        kept = path.with_name(path.name + ".bak")
        path.rename(kept)
        make(path)
        try:
            result = materialize(ASSETS, resources=resources, run_config=run_config(tiny_model), raise_on_error=False)
        finally:
            while _GUARDS:
                _GUARDS.pop().cancel()
            path.unlink()
            kept.rename(path)
        assert not result.success, name
        step, message = failed_step(result)
        assert step == "curated_dataset", (name, step, message)
        assert f"{path}:" in message and expected in message, (name, message)
        assert snapshot(home, resources["mlflow_tracker"]) == trained, name
        COUNTS["inputs rejected"] += 1


@pytest.mark.parametrize("source", ["../outside.json", "link.json"])
def test_data_paths_stay_inside_the_data_folder(trained, tiny_model, home, resources, source):
    COUNTS["inputs tried"] += 1
    outside = home / "outside.json"
    outside.write_text(dump(GOOD))
    (home / "data" / "link.json").symlink_to(outside)
    config = run_config(tiny_model)
    config["ops"]["curated_dataset"] = {"config": {"sources": [source]}}
    result = materialize(ASSETS, resources=resources, run_config=config, raise_on_error=False)
    step, message = failed_step(result)
    assert step == "curated_dataset" and "outside the data folder" in message
    assert snapshot(home, resources["mlflow_tracker"]) == trained
    COUNTS["inputs rejected"] += 1


def kill_worker_when_training(signals: list[int], stop: threading.Event) -> None:
    """Wait for each ms-swift child process (the first attempt's and the retries'), let it start training, then
    send it the next of `signals` (SIGKILL is what the OOM killer sends, SIGSEGV a native crash)."""
    signalled: list[int] = []
    while not stop.is_set() and len(signalled) < len(signals):
        for child in psutil.Process().children(recursive=True):
            try:
                if child.pid not in signalled and "persona.train_worker" in " ".join(child.cmdline()):
                    time.sleep(4)
                    child.send_signal(signals[len(signalled)])
                    signalled.append(child.pid)
            except psutil.NoSuchProcess:
                pass
        time.sleep(0.2)


def attempt_failures(result) -> list[str]:
    """The failure message of each attempt of the run's failed step, in order (the retried ones included)."""
    out = []
    for e in result.all_events:
        if e.event_type_value in ("STEP_UP_FOR_RETRY", "STEP_FAILURE"):
            data = e.event_specific_data
            user = getattr(data, "user_failure_data", None)
            texts, error = [user.description if user and user.description else ""], getattr(data, "error", None)
            while error is not None:  # a retry's error is the policy's; the Failure it retries is its cause
                texts.append(error.message)
                error = error.cause or error.context
            out.append("\n".join(texts))
    return out


@pytest.mark.slow
def test_training_killed_mid_run_loses_nothing_and_the_next_run_starts_clean(trained, tiny_model, home, resources,
                                                                           real_trainer, retries_without_delay):
    """Each attempt's training child is killed mid-run: SIGKILL (the OOM killer), then SIGSEGV (a native crash) on
    the first retry, then SIGKILL again on the last (the shipped retries, without their delays)."""
    fake = resources
    resources = {**resources, "trainer": real_trainer}  # the fault is in the training child
    retries = TRAINER_RETRIES.max_retries  # a killed trainer is retried (tests/test_resume.py: the retry resumes)
    signals = [signal.SIGKILL, signal.SIGSEGV, signal.SIGKILL][:1 + retries]
    COUNTS["faults injected"] += len(signals)
    (home / "data" / "self_cognition.json").write_text(dump(GOOD + [{"instruction": "New?", "output": "Yes."}]))
    config = run_config(tiny_model)
    config["ops"]["lora_adapter"]["config"]["num_train_epochs"] = 50  # long enough to be killed mid-run
    stop = threading.Event()
    killer = threading.Thread(target=kill_worker_when_training, args=(signals, stop), daemon=True)
    killer.start()
    try:
        result = materialize(ASSETS, resources=resources, run_config=config, raise_on_error=False)
    finally:
        stop.set()
    step, message = failed_step(result)
    assert step == "lora_adapter" and f"killed by signal {int(signals[-1])}" in message
    assert [e.step_key for e in result.all_events if e.event_type_value == "STEP_RESTARTED"] == ["lora_adapter"] * retries
    messages = attempt_failures(result)
    assert len(messages) == len(signals)
    for sig, text in zip(signals, messages):
        assert f"killed by signal {int(sig)}" in text, (sig, text)
    after = snapshot(home, resources["mlflow_tracker"])
    new_runs = {k: v for k, v in after["runs"].items() if k not in trained["runs"]}
    assert list(new_runs.values()) == ["FAILED"] * (1 + retries)
    assert {k: v for k, v in after["files"].items() if "adapters" in k} == \
        {k: v for k, v in trained["files"].items() if "adapters" in k}  # no half-written adapter
    assert after["champion"] == trained["champion"] and after["partials"] == []
    again = materialize(ASSETS, resources=fake, run_config=run_config(tiny_model))
    assert again.success  # the next run starts clean (what it trains with does not matter here)
    COUNTS["faults survived with nothing lost"] += len(signals)


@pytest.mark.slow
def test_child_crash_before_training_is_reported_with_its_output(trained, tiny_model, home, resources, real_trainer):
    resources = {**resources, "trainer": real_trainer}  # the fault is in the training child
    COUNTS["faults injected"] += 1
    (home / "data" / "self_cognition.json").write_text(dump(GOOD + [{"instruction": "New?", "output": "Yes."}]))
    config = run_config(tiny_model)
    config["ops"]["lora_adapter"]["config"]["target_modules"] = ["no_such_module"]
    result = materialize(ASSETS, resources=resources, run_config=config, raise_on_error=False)
    step, message = failed_step(result)
    assert step == "lora_adapter" and "ms-swift training failed (exit code" in message and "Last output" in message
    after = snapshot(home, resources["mlflow_tracker"])
    assert [v for k, v in after["runs"].items() if k not in trained["runs"]] == ["FAILED"]
    assert after["champion"] == trained["champion"] and after["partials"] == []
    COUNTS["faults survived with nothing lost"] += 1


@pytest.mark.slow
def test_full_disk_while_saving_the_adapter_is_a_clear_error(trained, tiny_model, home, resources, real_trainer, monkeypatch):
    resources = {**resources, "trainer": real_trainer}  # the fault is in the training child
    COUNTS["faults injected"] += 1
    (home / "data" / "self_cognition.json").write_text(dump(GOOD + [{"instruction": "New?", "output": "Yes."}]))
    import persona.training

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(persona.training.shutil, "copy2", full)
    result = materialize(ASSETS, resources=resources, run_config=run_config(tiny_model), raise_on_error=False)
    step, message = failed_step(result)
    assert step == "lora_adapter" and message.startswith("Cannot write ") and "No space left on device" in message
    after = snapshot(home, resources["mlflow_tracker"])
    assert {k: v for k, v in after["files"].items() if "adapters" in k} == \
        {k: v for k, v in trained["files"].items() if "adapters" in k}
    assert [v for k, v in after["runs"].items() if k not in trained["runs"]] == ["FAILED"]
    assert after["champion"] == trained["champion"] and after["partials"] == []
    COUNTS["faults survived with nothing lost"] += 1


def test_unwritable_output_folder_is_a_clear_error(trained, tiny_model, home, resources):
    from orchestration.resources import Workspace

    COUNTS["faults injected"] += 1
    (home / "blocker").write_text("a file where a folder should be")
    blocked = {**resources, "workspace": Workspace(data_dir=str(home / "data"),
                                                   outputs_dir=str(home / "blocker" / "outputs"))}
    (home / "data" / "self_cognition.json").write_text(dump(GOOD + [{"instruction": "New?", "output": "Yes."}]))
    result = materialize(ASSETS, resources=blocked, run_config=run_config(tiny_model), raise_on_error=False)
    step, message = failed_step(result)
    assert step == "curated_dataset" and message.startswith("Cannot write ") and "untouched" in message
    assert snapshot(home, resources["mlflow_tracker"]) == trained
    COUNTS["faults survived with nothing lost"] += 1


def test_remote_code_is_refused(tmp_path, tiny_model):
    import shutil

    from persona.models import ModelSourceError, from_local_dir

    COUNTS["inputs tried"] += 1
    model = tmp_path / "custom"
    shutil.copytree(tiny_model, model)
    cfg = json.loads((model / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (model / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelSourceError, match="custom code"):
        from_local_dir(str(model))
    COUNTS["inputs rejected"] += 1


def test_modelscope_token_never_reaches_mlflow_or_logs(tiny_model, home, resources, monkeypatch):
    secret = "ms-token-5f0e1d2c3b4a"
    monkeypatch.setenv("MODELSCOPE_API_TOKEN", secret)
    result = materialize(ASSETS, resources=resources, run_config=run_config(tiny_model))
    assert result.success
    logs = "\n".join(str(e.message) + json.dumps(str(e.event_specific_data)) for e in result.all_events)
    assert secret not in logs
    tracker = resources["mlflow_tracker"]
    tracker.client()
    (run,) = mlflow.search_runs(experiment_names=["persona"], output_format="list")
    assert secret not in json.dumps([run.data.params, run.data.tags])
    artifacts = Path(run.info.artifact_uri.removeprefix("file://"))
    for f in artifacts.rglob("*"):
        if f.is_file() and f.suffix in (".json", ".md", ".txt", ".jsonl", ""):
            assert secret.encode() not in f.read_bytes(), f
