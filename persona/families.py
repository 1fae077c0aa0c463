"""Which ms-swift `model_type` and chat template a base model folder trains with.

ms-swift 4.6 infers both for the models it registers (swift/model/model_meta.py, get_model_info_meta): by the
folder's name, compared with the last part of the hub ids it lists ('Meta-Llama-3-8B-Instruct', a ModelScope
snapshot's 'Qwen2___5-7B-Instruct'), which also gives the template of that id's group; else by config.json's
`architectures`, when exactly one model type has the architecture; the template then only where that model type has
one. A converted or renamed folder is often neither: four model types share LlamaForCausalLM, and the `llama` type
alone covers sixteen templates (Llama-2's, Llama-3's, Llama-3.1's, DeepSeek's...), so ms-swift stops and asks.

Where ms-swift can tell, persona takes its answer. Where it cannot, persona takes what the folder shows: among the
model types of the architecture, the one config.json's `model_type` names; the template the tokenizer's chat template
is written in (Llama-3's headers, ChatML's <|im_start|>). Otherwise it stops and names the setting to pass. The values
are passed to ms-swift explicitly (persona.training.swift_arguments), and the same name selects the evaluation's chat
template (persona.tokens), so training, evaluation and the adapter manifest use one template.

Importing ms-swift's registry takes seconds, so an answer is remembered by the folder's configuration files, in the
file persona.models passes: next to the weight digests (persona.models.HASH_CACHE_ENV).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from persona.storage import atomic_write_text

SWIFT_ARGS_ENV = "PERSONA_SWIFT_ARGS"  # persona.training.EXTRA_ARGS_ENV: its model_type / template are honoured here

# The files whose content decides the answer (args.json: ms-swift reads model_type and template from it first).
_DECIDING_FILES = ("config.json", "tokenizer_config.json", "chat_template.jinja", "chat_template.json",
                   "tokenizer.json", "args.json")


class SwiftSettingsError(ValueError):
    """Neither ms-swift nor the folder tells; the message names the setting (persona.models: ModelSourceError)."""


@dataclass(frozen=True)
class SwiftSettings:
    """ms-swift's `model_type` and `template` for a folder (None: ms-swift decides), and who decided them."""

    model_type: str | None
    template: str | None
    decided_by: str


def forced_settings() -> dict:
    """model_type / template set in $PERSONA_SWIFT_ARGS, which swift_arguments applies last."""
    raw = os.environ.get(SWIFT_ARGS_ENV, "").strip()
    try:
        parsed = json.loads(raw) if raw else {}
    except json.JSONDecodeError:
        return {}  # swift_arguments reports the bad JSON
    if not isinstance(parsed, dict):
        return {}
    return {k: parsed[k] for k in ("model_type", "template") if parsed.get(k)}


def swift_settings(model_dir: str | os.PathLike, source: str = "", preset: SwiftSettings | None = None,
                   cache_file: Path | None = None) -> SwiftSettings:
    """The model_type and template to train `model_dir` with: $PERSONA_SWIFT_ARGS's, else `preset` (the embedded
    models), else ms-swift's inference and what the folder shows, remembered in `cache_file` (None: not remembered).
    Raises SwiftSettingsError naming the setting to pass."""
    forced = forced_settings()
    if "model_type" in forced and "template" in forced:
        return SwiftSettings(forced["model_type"], forced["template"], f"${SWIFT_ARGS_ENV}")
    if preset is None:
        return _remembered(Path(model_dir), source, forced, cache_file)
    if forced:
        return SwiftSettings(forced.get("model_type", preset.model_type), forced.get("template", preset.template),
                             f"${SWIFT_ARGS_ENV} ({', '.join(forced)}), else {preset.decided_by}")
    return preset


def _remembered(model_dir: Path, source: str, forced: dict, cache_file: Path | None) -> SwiftSettings:
    from importlib.metadata import PackageNotFoundError, version

    if cache_file is None:
        return infer(model_dir, source, **forced)
    try:
        swift_version = version("ms-swift")
    except PackageNotFoundError:
        swift_version = ""
    digest = hashlib.sha256()
    for name in _DECIDING_FILES:
        f = model_dir / name
        if not f.is_file():
            digest.update(b"-")
        elif name == "tokenizer.json":  # megabytes of vocabulary (its special tokens count): the stat check
            st = f.stat()
            digest.update(f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}".encode())
        else:
            digest.update(f.read_bytes())
        digest.update(b"\0")
    key = json.dumps([swift_version, str(model_dir.resolve()), source, forced, digest.hexdigest()])
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    if key in cache:
        return SwiftSettings(**cache[key])
    found = infer(model_dir, source, **forced)
    cache[key] = asdict(found)
    try:
        atomic_write_text(cache_file, json.dumps(cache))
    except OSError:
        pass  # a read-only home only costs the import next time
    return found


def infer(model_dir: Path, source: str = "", model_type: str | None = None,
          template: str | None = None) -> SwiftSettings:
    """ms-swift's own inference for `model_dir` (in its order), completed by what the folder shows; `model_type` and
    `template`, if given, are $PERSONA_SWIFT_ARGS's."""
    from swift.model import MODEL_MAPPING
    from swift.model.model_meta import get_matched_model_meta, get_matched_model_types

    cfg = json.loads((model_dir / "config.json").read_text())
    trained = _swift_args(model_dir)  # a folder ms-swift wrote (a merged adapter): it reads its args.json first
    how = [f"model_type: ${SWIFT_ARGS_ENV}"] if model_type else []
    name = model_dir.name
    meta = get_matched_model_meta(str(model_dir))
    if meta is None and source and not os.path.isdir(os.path.expanduser(source)):
        name, meta = source, get_matched_model_meta(source)  # the hub id it was downloaded as
    by_name = meta is not None
    if model_type is None and meta is not None:
        model_type = meta.model_type
        how.append(f"model_type: ms-swift, by the name {name}")
    if model_type is None and trained.get("model_type"):
        model_type = trained["model_type"]
        how.append("model_type: ms-swift, from the folder's args.json")
    arch = (cfg.get("architectures") or [None])[0]
    if model_type is None:
        candidates = get_matched_model_types(cfg.get("architectures"))
        if len(candidates) == 1:
            model_type = candidates[0]
            how.append(f"model_type: ms-swift, by the architecture {arch}")
        elif cfg.get("model_type") in candidates:
            model_type = cfg["model_type"]
            how.append(f"model_type: config.json's model_type, among ms-swift's {candidates} for {arch}")
        elif candidates:
            raise SwiftSettingsError(
                f"{model_dir}: ms-swift cannot tell which model type this is: {len(candidates)} of its model types "
                f"train the architecture {arch} ({', '.join(candidates)}), and config.json's model_type "
                f"'{cfg.get('model_type')}' is none of them. Set it, e.g. "
                f"{SWIFT_ARGS_ENV}='{{\"model_type\": \"{candidates[0]}\"}}', or name the folder after the model's "
                "hub id (the last part, as ms-swift lists it), which ms-swift recognizes.")
        else:
            how.append(f"model_type: none (ms-swift registers no model type for {arch}: it loads it as transformers "
                       "does)")
    if model_type is not None and (meta is None or meta.model_type != model_type):
        meta, by_name = MODEL_MAPPING.get(model_type), False  # as get_model_info_meta does: the type's own entry
    if template:
        how.append(f"template: ${SWIFT_ARGS_ENV}")
    elif trained.get("template"):
        template = trained["template"]
        how.append("template: ms-swift, from the folder's args.json")
    elif meta is not None and meta.template:
        template = meta.template
        how.append(f"template: ms-swift, by the name {name}" if by_name else f"template: ms-swift, of {model_type}")
    elif meta is not None and len(meta.candidate_templates) == 1:
        template = meta.candidate_templates[0]
        how.append(f"template: ms-swift, the one template of model type {model_type}")
    else:
        template, shown = template_from_tokenizer(model_dir)
        if template is None:
            options = meta.candidate_templates if meta is not None else []
            raise SwiftSettingsError(
                f"{model_dir}: ms-swift cannot tell which chat template to train it with"
                + (f" (model type {model_type} has {len(options)}: {', '.join(options)})" if options else "")
                + ", and its tokenizer's chat template is none persona recognizes (Llama-3's <|start_header_id|>, "
                f"ChatML's <|im_start|>). Set it to one of ms-swift's templates, e.g. "
                f"{SWIFT_ARGS_ENV}='{{\"template\": \"{options[0] if options else 'chatml'}\"}}', or name the "
                "folder after the model's hub id, which ms-swift recognizes.")
        how.append(f"template: persona, from {shown} (ms-swift cannot choose"
                   + (f" among {len(meta.candidate_templates)} for model type {model_type})" if meta else ")"))
    return SwiftSettings(model_type, template, "; ".join(how))


def _swift_args(model_dir: Path) -> dict:
    try:
        args = json.loads((model_dir / "args.json").read_text())
    except (OSError, ValueError):
        return {}
    return args if isinstance(args, dict) else {}


def chat_template_text(model_dir: str | os.PathLike) -> str:
    """The folder's own chat template (the default one of several), read without loading the tokenizer."""
    model_dir = Path(model_dir)
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    for name in ("chat_template.json", "tokenizer_config.json"):
        try:
            value = json.loads((model_dir / name).read_text(encoding="utf-8")).get("chat_template")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(value, list):  # named templates: [{"name": "default", "template": ...}, ...]
            value = next((t.get("template") for t in value if t.get("name") == "default"), None)
        if isinstance(value, str) and value:
            return value
    return ""


def _added_tokens(model_dir: Path) -> list[str]:
    try:
        data = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    return sorted(t.get("content", "") for t in data.get("added_tokens") or [])


def template_from_tokenizer(model_dir: str | os.PathLike) -> tuple[str | None, str]:
    """The ms-swift template a tokenizer's chat template is written in, and what showed it; None: not recognized.

    A tokenizer without a chat template gets Llama-3's where it has Llama-3's header tokens, else `chatml`,
    which persona has always trained such folders with (and the evaluation formats them with)."""
    text = chat_template_text(model_dir)
    if text:
        if "<|start_header_id|>" in text:
            # Llama-3.1 and later put 'Cutting Knowledge Date' / 'Today Date' in the system turn: ms-swift's llama3_2.
            name = "llama3_2" if "Cutting Knowledge Date" in text else "llama3"
            return name, "the tokenizer's Llama-3 chat template"
        if "<|im_start|>" in text:
            if "You are Qwen, created by Alibaba Cloud" in text:
                return "qwen2_5", "the tokenizer's Qwen2.5 chat template"
            return "chatml", "the tokenizer's ChatML chat template"
        return None, "the tokenizer's chat template"
    if "<|start_header_id|>" in _added_tokens(Path(model_dir)):
        return "llama3", "the tokenizer's Llama-3 header tokens (it has no chat template)"
    return "chatml", "persona's default for a tokenizer without a chat template"


def trained_settings(adapter_dir: str | os.PathLike) -> dict:
    """The model_type and template ms-swift recorded in an adapter's args.json (what it trained with)."""
    args = _swift_args(Path(adapter_dir))
    return {k: args.get(k) for k in ("model_type", "template")}
