"""Using the model as ms-swift users do: chat with the base or any adapter, merge and export, serve it OpenAI-style.

The adapters here are published to MLflow the way `lora_adapter` publishes them (its own test, test_pipeline_e2e,
checks the real asset); training is not under test.
"""
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from persona.targets import ADAPTER_MANIFEST, TargetError

ROOT = Path(__file__).resolve().parents[1]


def publish(home: Path, tiny_model: Path, adapter: Path, name: str, promote: bool = False) -> tuple[Path, str]:
    """An adapter folder under outputs/adapters with its manifest, logged to an MLflow run (and promoted)."""
    import mlflow

    from orchestration.resources import MlflowTracker

    folder = home / "outputs" / "adapters" / name
    shutil.copytree(adapter, folder)
    tracker = MlflowTracker()
    with tracker.run(run_name=name) as run:
        manifest = {"path": str(folder), "mlflow_run_id": run.info.run_id, "device": "cpu",
                    "system": "You are a helpful assistant.", "dataset_version": name, "identity": {},
                    "base_model": str(tiny_model), "template": "chatml", "dataset_probes": ""}
        mlflow.log_artifacts(str(folder), artifact_path="adapter")
        mlflow.log_dict(manifest, f"adapter/{ADAPTER_MANIFEST}")
    (folder / ADAPTER_MANIFEST).write_text(json.dumps(manifest), encoding="utf-8")
    if promote:
        tracker.promote(run.info.run_id, "test")
    return folder, run.info.run_id


def answers(target, questions=("Who are you?", "What is 2 + 3?", "Which team is behind you?"), max_new_tokens=8):
    from persona.inference import Chat

    chat = Chat(target.base_model, target.adapter, target.template, target.system, "cpu")
    return chat.answer([(q, ()) for q in questions], max_new_tokens=max_new_tokens)


def test_ask_base_works_before_any_training(home, tiny_model, capsys):
    from orchestration.cli import main

    assert not (home / "outputs" / "adapters").exists()
    assert main(["ask", "--base", "--model", str(tiny_model), "Who are you?", "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr()
    from persona.targets import base_target

    (expected,) = answers(base_target(str(tiny_model), "chatml", "tiny"), ("Who are you?",), max_new_tokens=6)
    assert out.out.strip() == expected.strip() and "the base model" in out.err and "(no adapter)" in out.err
    with pytest.raises(SystemExit, match="No adapter yet.*--base"):
        main(["ask", "Who are you?"])


def test_default_is_the_champion_then_the_newest_adapter(home, tiny_model, random_adapter, capsys):
    from orchestration.cli import _registry
    from persona.targets import default_target, resolve_adapter

    first, first_run = publish(home, tiny_model, random_adapter, "first")
    target, why = default_target(_registry())
    assert target.adapter == str(first) and "newest adapter" in why and "no champion" in why
    time.sleep(0.05)
    publish(home, tiny_model, random_adapter, "second", promote=False)
    champ, champ_run = publish(home, tiny_model, random_adapter, "third", promote=True)
    time.sleep(0.05)
    newest, _ = publish(home, tiny_model, random_adapter, "fourth")  # newer, but the gate did not pass it
    target, why = default_target(_registry())
    assert target.adapter == str(champ) and target.run_id == champ_run and "champion" in why
    assert resolve_adapter("models:/persona-adapter@champion", _registry()).adapter == str(champ)
    assert resolve_adapter("models:/persona-adapter/1", _registry()).adapter == str(champ)
    assert resolve_adapter(first_run, _registry()).adapter == str(first)
    assert resolve_adapter(str(newest), _registry()).adapter == str(newest)
    for bad, says in (("models:/persona-adapter@nope", "not in the Model Registry"),
                      ("models:/persona-adapter", "models:/NAME@ALIAS or models:/NAME/VERSION"),
                      ("0123456789abcdef", "neither an adapter folder, nor an MLflow run id"),
                      (str(home / "missing"), "no such adapter folder")):
        with pytest.raises(TargetError, match=says):
            resolve_adapter(bad, _registry())


def test_registry_copy_is_usable_without_the_local_folder(home, tiny_model, random_adapter):
    """The champion's MLflow artifacts carry the manifest: the adapter works after outputs/adapters is cleared."""
    from orchestration.cli import _registry

    folder, run_id = publish(home, tiny_model, random_adapter, "only", promote=True)
    from persona.targets import adapter_target

    before = answers(adapter_target(folder))
    shutil.rmtree(folder)
    target = _registry().resolve("champion")
    assert Path(target.adapter).parent == home / "outputs" / "registry" and target.run_id == run_id
    assert answers(target) == before


def test_champion_flag_without_a_champion_says_what_to_do(home, tiny_model, random_adapter):
    from orchestration.cli import main

    publish(home, tiny_model, random_adapter, "unpromoted")
    with pytest.raises(SystemExit, match="No champion yet"):
        main(["ask", "--champion", "Who are you?"])


NO_PEFT = """
import json, sys
sys.modules["peft"] = None  # plain transformers: importing PEFT would fail
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
d = sys.argv[1]
tok = AutoTokenizer.from_pretrained(d, padding_side="left")
model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
out = []
for q in json.loads(sys.argv[2]):
    text = tok.apply_chat_template([{"role": "system", "content": "You are a helpful assistant."},
                                    {"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
    ids = tok(text, return_tensors="pt", add_special_tokens=False)
    gen = model.generate(**ids, max_new_tokens=8, do_sample=False, eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
                         pad_token_id=tok.pad_token_id)
    out.append(tok.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip())
print(json.dumps(out))
"""


@pytest.mark.slow
def test_export_loads_without_peft_and_answers_as_base_plus_adapter(home, tiny_model, random_adapter, capsys):
    import mlflow

    from orchestration.cli import main
    from persona.export import EXPORT_MANIFEST
    from persona.targets import adapter_target

    folder, run_id = publish(home, tiny_model, random_adapter, "to-export", promote=True)
    out = home / "exported"
    assert main(["export", "--output", str(out), "--dtype", "float32"]) == 0  # default: the champion
    assert Path(capsys.readouterr().out.strip()) == out.resolve()
    assert {"model.safetensors", "config.json", "tokenizer.json", "generation_config.json",
            EXPORT_MANIFEST} <= {p.name for p in out.iterdir()}
    assert not any(p.name.startswith(("adapter_", ".")) for p in out.iterdir())  # merged, no PEFT files, no leftovers
    questions = ["Who are you?", "What is 2 + 3?", "Which team is behind you?"]
    merged = subprocess.run([sys.executable, "-c", NO_PEFT, str(out), json.dumps(questions)], capture_output=True,
                            text=True, check=True)
    assert json.loads(merged.stdout) == [a.strip() for a in answers(adapter_target(folder), questions)]
    from persona.targets import base_target

    assert json.loads(merged.stdout) != [a.strip() for a in answers(base_target(str(tiny_model), "chatml", "t"),
                                                                    questions)]
    run = mlflow.MlflowClient().get_run(run_id)
    assert run.data.tags["persona.exported_to"] == str(out.resolve())
    assert [a.path for a in mlflow.MlflowClient().list_artifacts(run_id, "exports")]


def test_export_replaces_qwen_default_system_prompt():
    from persona.export import default_system_of

    qwen = "{%- else %}{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>' }}"
    assert default_system_of(qwen) == "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    assert default_system_of("{% for m in messages %}{% endfor %}") is None


def test_serve_plan_names_and_refusals(tiny_model, random_adapter, tmp_path):
    from persona.serving import plan
    from persona.targets import Target

    base = Target(str(tiny_model), "chatml", "S")
    champ = Target(str(tiny_model), "chatml", "S", str(random_adapter), "champ")
    served = plan([("champion", champ), (None, Target(str(tiny_model), "chatml", "S", str(tmp_path / "v2")))])
    assert served.model_names() == [tiny_model.name, "champion", "v2"]
    assert plan([(None, base)]).adapters == {}
    with pytest.raises(TargetError, match="different base models"):
        plan([(None, champ), (None, Target("/elsewhere", "chatml", "S", str(random_adapter)))])
    with pytest.raises(TargetError, match="both be served as 'x'"):
        plan([("x", champ), ("x", Target(str(tiny_model), "chatml", "S", str(tmp_path)))])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(home, tiny_model, random_adapter):
    """`persona serve` on a free loopback port: the base model and one published champion."""
    folder, _ = publish(home, tiny_model, random_adapter, "served", promote=True)
    port = free_port()
    env = {**os.environ, "PERSONA_HOME": str(home)}
    log = open(home / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "orchestration.cli", "serve", "--port", str(port),
                             "--api-key", "sekret", "--max-length", "64", "--served-name", "tiny-base"],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    import urllib.request

    deadline = time.time() + 240
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2).read()
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                pytest.fail("persona serve did not come up:\n" + (home / "serve.log").read_text()[-3000:])
            time.sleep(1)
    yield port, folder, proc
    proc.terminate()
    proc.wait(timeout=30)


@pytest.mark.slow
def test_serve_answers_openai_clients_and_survives_bad_requests(server, tiny_model):
    import openai

    from persona.targets import adapter_target, base_target

    port, folder, proc = server
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sekret")
    assert [m.id for m in client.models.list().data] == ["tiny-base", "champion"]
    want_adapter = answers(adapter_target(folder), ("Who are you?",))[0].strip()
    want_base = answers(base_target(str(tiny_model), "chatml", "t"), ("Who are you?",))[0].strip()
    assert want_adapter != want_base
    ask = dict(messages=[{"role": "user", "content": "Who are you?"}], max_tokens=8, temperature=0)
    reply = client.chat.completions.create(model="champion", **ask)
    assert reply.choices[0].message.content.strip() == want_adapter
    assert client.chat.completions.create(model="tiny-base", **ask).choices[0].message.content.strip() == want_base
    streamed = "".join(c.choices[0].delta.content or "" for c in
                       client.chat.completions.create(model="champion", stream=True, **ask) if c.choices)
    assert streamed.strip() == want_adapter

    url = f"http://127.0.0.1:{port}/v1/chat/completions"

    def curl(body: str, key: str = "sekret") -> tuple[int, str]:
        done = subprocess.run(["curl", "-s", "-o", "-", "-w", "\n%{http_code}", url, "-H",
                               "Content-Type: application/json", "-H", f"Authorization: Bearer {key}", "-d", body],
                              capture_output=True, text=True, timeout=120)
        text, _, code = done.stdout.rpartition("\n")
        return int(code), text

    code, text = curl(json.dumps({"model": "champion", **ask}))
    assert code == 200 and json.loads(text)["choices"][0]["message"]["content"].strip() == want_adapter
    for body, key in ((json.dumps({"model": "gpt-4", **ask}), "sekret"),                 # unknown model
                      (json.dumps({"model": "champion", "messages": []}), "sekret"),      # empty conversation
                      (json.dumps({"model": "champion", "max_tokens": 4,                  # over max_length
                                   "messages": [{"role": "user", "content": "Who are you? " * 80}]}), "sekret"),
                      ('{"model": "champion", "messages": [', "sekret"),                   # malformed JSON
                      (json.dumps({"model": "champion", **ask}), "wrong")):                # wrong API key
        code, text = curl(body, key)
        assert 400 <= code < 500, (body[:60], code, text[:200])
        assert text.strip(), "a 4xx says why"
    assert proc.poll() is None
    assert client.chat.completions.create(model="champion", **ask).choices[0].message.content.strip() == want_adapter
