"""Test objects that more than one test module builds: an evaluation setup over the tiny model with three probes,
and a fake set of embedded-model part packages (no 0.5 GB wheels)."""
import hashlib
import json
from pathlib import Path

from persona.data import Identity
from persona.evaluation import EvaluationSetup
from persona.models import EmbeddedModel, PartFile, QWEN2

PROBES = [{"kind": "general", "question": "What is 2 + 3?", "expect_any": ["5"]},
          {"kind": "identity_en", "question": "Who are you?", "expect_any": ["Swift"]},
          {"kind": "stability", "question": "你是谁?", "expect_any": ["Swift"]}]


def make_setup(model_dir: Path, tmp_path: Path, system: str = "You are a helpful assistant.") -> EvaluationSetup:
    probes = tmp_path / "probes.jsonl"
    probes.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in PROBES), encoding="utf-8")
    return EvaluationSetup(str(model_dir), "chatml", system, "cpu", str(probes), Identity(), ("SmolLM",),
                           str(tmp_path / "answers"), "digest-of-the-base", max_new_tokens=6, batch_size=4,
                           stability_samples=2)


def fake_parts(root: Path, chunks: list[bytes], name: str = "fakeparts") -> EmbeddedModel:
    """Packages <name>_partN with data/partN.bin on sys.path, and the EmbeddedModel that names them."""
    parts = []
    for i, chunk in enumerate(chunks, 1):
        pkg = root / f"{name}_part{i}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("raise ImportError('a data wheel must not be imported')\n")
        (pkg / "data" / f"part{i}.bin").write_bytes(chunk)
        parts.append(PartFile(f"{name}-part{i}", "1.0", f"{name}_part{i}", f"data/part{i}.bin",
                              hashlib.sha256(chunk).hexdigest(), len(chunk)))
    return EmbeddedModel("fake", "Org/Fake-Model", QWEN2, tuple(parts),
                         hashlib.sha256(b"".join(chunks)).hexdigest(), "Apache-2.0")
