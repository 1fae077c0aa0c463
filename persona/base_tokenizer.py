"""The base model's token counter for `persona validate`: the tokenizer whose counts the run's max_length check uses,
found without converting or downloading a model.

- The embedded default (or embedded:NAME), converted: its folder under outputs/base_models/, resolved as the run
  resolves it (instant once converted).
- The embedded model, not converted yet: the same tokenizer read from its GGUF. The parts are assembled and verified
  into a temporary folder, and only the tokenizer is loaded (`persona validate` then takes 13-16 s on 2 CPU cores
  against 4 s with the converted folder; the conversion, ~40 s, saves exactly this tokenizer: tokenizer.json,
  tokenizer_config.json and chat_template.jinja came out byte for byte the converted folder's, for both models).
- A local model folder: that folder, as the run reads it.
- A ModelScope id: its downloaded copy; before the run has downloaded it, BaseTokenizerError says so and how to get it.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from persona.models import (MANIFEST, BaseModel, EmbeddedModel, ModelSourceError, assemble_gguf, converted_embedded,
                            embedded_model, family_for, resolve_base_model)
from persona.tokens import token_counter


class BaseTokenizerError(ModelSourceError):
    """The base tokenizer is not on this machine yet; the message says how to get it."""


@dataclass(frozen=True)
class BaseTokenizer:
    count: Callable[[list[dict]], int]  # tokens of one conversation as trained (persona.tokens.token_counter)
    own_identity: tuple[str, ...]       # the base model's own names (answers must not state them)
    described: str                      # which tokenizer, for the user


def _converted_embedded(model: EmbeddedModel, cache_root: Path) -> bool:
    # persona.models.materialize_embedded's folder. Were it renamed, validate would read the GGUF's tokenizer: the
    # same counts, only slower.
    return Path(cache_root, f"{model.name}-{model.sha256[:12]}", MANIFEST).is_file()


def _from_gguf(model: EmbeddedModel) -> Callable[[list[dict]], int]:
    from transformers import AutoTokenizer
    from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING_NAMES

    model_type = getattr(model, "model_type", None) or model.family.model_type
    template = getattr(model, "template", None) or model.family.template
    with tempfile.TemporaryDirectory(prefix="persona-tokenizer-") as tmp:
        gguf = Path(tmp, "gguf", f"{model.name}.gguf")
        gguf.parent.mkdir()
        assemble_gguf(model, gguf)  # verifies every part; ModelSourceError names the package to reinstall
        # As persona.models.convert_gguf loads it (llama is not in the mapping: None, as there).
        kind = model_type if model_type in TOKENIZER_MAPPING_NAMES else None
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, tokenizer_type=kind)
        gguf.unlink()
        tok.save_pretrained(Path(tmp, "tokenizer"))
        return token_counter(str(Path(tmp, "tokenizer")), template)  # loaded now: the folder may go


def _downloaded(source: str, revision: str, cache_root: Path) -> BaseModel | None:
    """The ModelScope download of `source` a run made (persona.models.download_from_modelscope's manifest)."""
    folder = Path(cache_root, "modelscope")
    for manifest in sorted(folder.rglob(MANIFEST)) if folder.is_dir() else []:
        try:
            data = json.loads(manifest.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if data.get("source") == source and data.get("revision") == revision:
            return BaseModel.from_dir(manifest.parent)
    return None


def base_tokenizer(source: str, revision: str, cache_root: Path) -> BaseTokenizer:
    """The tokenizer the run's length check would count with for base model `source` (persona.yaml's base_model)."""
    cache_root = Path(cache_root)
    embedded = embedded_model(source)  # ModelSourceError for an unknown embedded:NAME
    if embedded is not None:
        if _converted_embedded(embedded, cache_root):
            base = converted_embedded(embedded, cache_root)  # as the run resolves it, without its rebuild of a damaged one
            return BaseTokenizer(token_counter(base.path, base.template), base.own_identity,
                                 f"the base model's tokenizer ({base.path})")
        return BaseTokenizer(_from_gguf(embedded), embedded.family.own_identity,
                             f"the tokenizer of the embedded {embedded.upstream}, read from its GGUF (the run converts "
                             f"the model once, to {cache_root}, and uses this same tokenizer)")
    if os.path.isdir(os.path.expanduser(source)):
        base = resolve_base_model(source, revision, cache_root)
        return BaseTokenizer(token_counter(base.path, base.template), base.own_identity,
                             f"the base model's tokenizer ({base.path})")
    base = _downloaded(source, revision, cache_root)
    if base is None:
        raise BaseTokenizerError(
            f"the base model {source} (revision {revision}) is not downloaded yet, so its tokenizer cannot count the "
            f"samples' tokens for the max_length check. `persona run` downloads it (to {cache_root / 'modelscope'}); "
            "or pass --tokenizer FOLDER (a folder with its tokenizer), or --max-length 0 to skip the length check")
    return BaseTokenizer(token_counter(base.path, base.template), base.own_identity,
                         f"the base model's tokenizer ({base.path})")


def folder_tokenizer(folder: str, source: str) -> BaseTokenizer:
    """--tokenizer FOLDER: that folder's tokenizer; the own names of `source`'s family."""
    family = family_for(None, source)
    return BaseTokenizer(token_counter(folder, family.template), family.own_identity, f"the tokenizer in {folder}")
