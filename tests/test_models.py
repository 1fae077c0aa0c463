"""Base model sources (the embedded wheels: test_embedded.py): local folders, and the ModelScope path with a faked download."""
import shutil

import pytest

from persona import models
from persona.models import ModelSourceError, resolve_base_model


def test_modelscope_download_is_called_and_described(tiny_model, tmp_path, monkeypatch):
    calls = []

    def fake_snapshot_download(model_id, revision, cache_dir):
        calls.append((model_id, revision, cache_dir))
        target = tmp_path / "hub" / model_id
        shutil.copytree(tiny_model, target)
        return str(target)

    import modelscope

    monkeypatch.setattr(modelscope, "snapshot_download", fake_snapshot_download)
    model = resolve_base_model("Qwen/Qwen2.5-7B-Instruct", "v1.0", tmp_path / "cache")
    assert calls == [("Qwen/Qwen2.5-7B-Instruct", "v1.0", str(tmp_path / "cache" / "modelscope"))]
    assert (model.source, model.revision) == ("Qwen/Qwen2.5-7B-Instruct", "v1.0")
    assert (model.model_type, model.template) == ("qwen2", "qwen2_5")
    assert "通义千问" in model.own_identity and model.parameters > 0 and len(model.weights_sha256) == 64


def test_unreachable_hub_gives_one_clear_line(tmp_path, monkeypatch):
    import modelscope

    def offline(*a, **k):
        raise ConnectionError("HTTPSConnectionPool(host='www.modelscope.cn'): Max retries exceeded\n<long trace>")

    monkeypatch.setattr(modelscope, "snapshot_download", offline)
    with pytest.raises(ModelSourceError) as exc:
        resolve_base_model("Qwen/Qwen2.5-7B-Instruct", "master", tmp_path)
    msg = str(exc.value)
    assert "\n" not in msg and "Could not download 'Qwen/Qwen2.5-7B-Instruct'" in msg
    assert "local folder" in msg and "embedded" in msg


def test_local_folder_without_config_is_refused(tmp_path):
    with pytest.raises(ModelSourceError, match="no config.json"):
        models.from_local_dir(str(tmp_path))


def test_weight_digests_are_remembered_until_a_file_changes(tmp_path, monkeypatch):
    import hashlib
    import os

    from persona import models

    monkeypatch.setenv("PERSONA_HASH_CACHE", str(tmp_path / "cache" / "hashes.json"))
    a, b = tmp_path / "model-00001-of-00002.safetensors", tmp_path / "model-00002-of-00002.safetensors"
    a.write_bytes(b"first shard")
    b.write_bytes(b"second shard")
    reads = []
    real = models._file_sha256
    monkeypatch.setattr(models, "_file_sha256", lambda p: reads.append(p.name) or real(p))

    assert models.sha256_files([a]) == hashlib.sha256(b"first shard").hexdigest()  # one file: its plain sha256
    both = models.sha256_files([a, b])
    assert reads == [a.name, b.name] and both != models.sha256_files([a])
    assert models.sha256_files([a, b]) == both and reads == [a.name, b.name]        # remembered: nothing read
    b.write_bytes(b"second shard, retrained")
    os.utime(b, ns=(1, 1))                                                          # any stat change counts
    changed = models.sha256_files([a, b])
    assert reads[-1] == b.name and len(reads) == 3 and changed != both


def test_one_gguf_reader_reads_each_file_once_and_then_puts_gguf_back(tmp_path):
    import gguf

    from persona.models import one_gguf_reader

    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    built = gguf.GGUFReader
    with one_gguf_reader():
        first = gguf.GGUFReader(path)
        assert gguf.GGUFReader(str(path)) is first  # transformers' second read (the weights) gets the first reader
        assert first.fields["general.name"].contents() == "tiny"
    assert gguf.GGUFReader is built and gguf.GGUFReader(path) is not first
