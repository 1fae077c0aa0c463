"""`curated_dataset`: the identity Q&A the model learns (the tutorials' self_cognition.json), validated, mixed with
general data against forgetting, and versioned by content.

Problems stop the run here, all listed as `file:line: problem — fix`, before anything is written: the
previous curated dataset and everything trained from it stay as they were.

A dataset folder of this version written by an earlier run is reused when it still matches the sha256 recorded
with it (persona.integrity.RECORD); a damaged one (a truncated train.jsonl) is moved aside, written again from this
run's curation, and one warning says so.
"""
import json
import statistics
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from dagster import AssetExecutionContext, Failure, MetadataValue, Output, asset

from orchestration.config import CurationConfig
from orchestration.resources import DataPathError, Workspace, unwritable_is_failure
from persona.data import DatasetError, Dataset, Problem, language, load_dataset, read_file
from persona.integrity import has_record, move_aside, record_files, recorded_damage
from persona.probes import load_probes
from persona.tokens import token_counter
from persona.mixing import MixingError, hub_samples, pick_by_language, read_prompts, replay_samples
from persona.recipe import default_general_ratio, detect_device_early
from persona.models import BaseModel
from persona.storage import staged_dir


@dataclass(frozen=True)
class CuratedDataset:
    path: str          # train.jsonl in ms-swift's messages format
    probes_path: str   # held-out evaluation probes, identity placeholders filled
    version: str       # content hash of the normalized records and the curation config
    samples: int

    def identity(self) -> dict:
        """The Identity fields the dataset was curated for (its curation.json)."""
        curation = json.loads(Path(self.path).with_name("curation.json").read_text(encoding="utf-8"))
        return {k: curation[k] for k in ("name_zh", "name_en", "author_zh", "author_en") if k in curation}


def data_file(workspace: Workspace, name: str) -> Path:
    """workspace.data_file, except that a symlink loop (Path.resolve raises RuntimeError) is left to the reader, which
    reports it as a located problem (persona.data.read_bytes) instead of a traceback."""
    try:
        return workspace.data_file(name)
    except RuntimeError:
        return Path(workspace.data_dir, name)


def curate(config: CurationConfig, workspace: Workspace, base: BaseModel, log=print) -> tuple[Dataset, list[dict]]:
    """Everything but the writing: read, fill, mix, validate. Raises DatasetError or MixingError."""
    identity = config.identity()
    probes_file = data_file(workspace, config.probes)
    probes = [p.filled(identity) for p in load_probes(probes_file)]
    sources = [data_file(workspace, s) for s in config.sources]

    extra = []
    if config.general_mix not in ("replay", "hub", "none"):
        raise DatasetError([Problem("curation config", 0, f"unknown general_mix {config.general_mix!r}",
                                    "use replay, hub or none")])
    ratio = config.general_ratio if config.general_ratio is not None else \
        default_general_ratio(detect_device_early(), base.parameters)
    if config.general_mix != "none" and ratio > 0:
        # Count identity rows first, so the general share follows the user's data.
        identity_rows = load_dataset(sources, identity=identity).samples
        n = round(len(identity_rows) * ratio)
        if config.general_mix == "replay":
            per_language = Counter(language(s.question) for s in identity_rows)
            wanted = {lang: round(count * ratio) for lang, count in per_language.items()}
            prompts = pick_by_language(read_prompts(data_file(workspace, config.replay_prompts)), wanted, config.seed)
            extra = replay_samples(base, prompts, workspace.output("replay_cache"), "You are a helpful assistant.",
                                   None, config.replay_max_new_tokens, log=log)
        else:
            extra = hub_samples(config.hub_datasets, n, config.seed)

    dataset = load_dataset(
        sources,
        eval_questions=[p.question for p in probes],
        min_samples=config.min_samples,
        identity=identity,
        own_identity=base.own_identity,
        count_tokens=token_counter(base.path, base.template),
        max_length=config.max_length,
        extra=extra,
        config={**{k: v for k, v in config.model_dump().items() if k not in ("probes",)}, "general_ratio": ratio},
    )
    if dataset.dropped:
        log(f"hub: {len(dataset.dropped)} rows failed the checks and were left out, e.g. {dataset.dropped[0]}")
    return dataset, [p.as_row() for p in probes]


@asset(group_name="persona", code_version="2", description=__doc__)
def curated_dataset(
    context: AssetExecutionContext, config: CurationConfig, workspace: Workspace, base_model: BaseModel
) -> Output[CuratedDataset]:
    try:
        with unwritable_is_failure(workspace.output("replay_cache")):
            dataset, probes = curate(config, workspace, base_model, log=context.log.info)
    except DatasetError as exc:
        context.log.error(str(exc))
        raise Failure(description=str(exc), metadata={"problems": len(exc.problems)}) from None
    except (MixingError, DataPathError) as exc:
        raise Failure(description=str(exc)) from None

    target = workspace.output("datasets", dataset.version[:16])
    with unwritable_is_failure(target):
        write_dataset(target, dataset, probes, log=context.log.warning)
    curated = CuratedDataset(str(target / "train.jsonl"), str(target / "probes.jsonl"), dataset.version,
                             len(dataset.samples))
    return Output(curated, metadata=describe(dataset, curated, len(probes)))


FILES = ("train.jsonl", "probes.jsonl", "curation.json")


def write_dataset(target: Path, dataset: Dataset, probes: list[dict], log=print) -> None:
    """The dataset's folder: written once per version (staged, its sha256 record last), then reused while it
    matches the record. A damaged one is moved aside to '<version>.corrupt-<timestamp>' (kilobytes: kept to look at)
    and written again, with one line to `log`."""
    if (target / "train.jsonl").exists():
        problem = dataset_damage(target, dataset.version)
        if problem is None:
            return
        aside = move_aside(target)
        log(f"curated dataset {target} is damaged: {problem}. Moved it aside to {aside.name}; writing it again from "
            "this run's curation.")
    with staged_dir(target) as tmp:
        dataset.write_jsonl(tmp / "train.jsonl")
        (tmp / "probes.jsonl").write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in probes),
                                          encoding="utf-8")
        (tmp / "curation.json").write_text(json.dumps(dataset.config, indent=2, ensure_ascii=False), encoding="utf-8")
        record_files(tmp, list(FILES))


def dataset_damage(target: Path, version: str) -> str | None:
    """What is wrong with a written dataset folder, or None. Checked against its sha256 record (every file hashed:
    kilobytes to a few megabytes, milliseconds); a folder written before records existed is checked as
    curated_dataset_is_intact checks it (it parses, and its content hash is `version`), then gets its record."""
    if has_record(target):
        return recorded_damage(target)
    missing = [name for name in FILES if not (target / name).is_file()]
    if missing:
        return f"{', '.join(missing)} missing"
    problems: list[Problem] = []
    samples = read_file(target / "train.jsonl", problems)
    if problems:
        return f"train.jsonl does not parse ({problems[0]})"
    try:
        config = json.loads((target / "curation.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return f"curation.json is unreadable ({type(exc).__name__})"
    if Dataset(samples, config=config).version != version:
        return "its content hash is not the version it is named by"
    record_files(target, list(FILES))
    return None


def describe(dataset: Dataset, curated: CuratedDataset, n_probes: int) -> dict:
    by_source = Counter((s.file.split(":")[1] if s.file.startswith("mix:") else Path(s.file).name, language(s.question))
                        for s in dataset.samples)
    rows = "\n".join(f"| {src} | {lang} | {n} |" for (src, lang), n in sorted(by_source.items()))
    tokens = sorted(s.tokens for s in dataset.samples if s.tokens is not None)
    preview = "\n".join(f"| {s.question[:80]} | {s.answer[:120]} |" for s in dataset.samples[:5])
    return {
        "version": dataset.version,
        "samples": len(dataset.samples),
        "rows_by_source": MetadataValue.md("| source | language | rows |\n|---|---|---|\n" + rows),
        "sources": MetadataValue.json(dataset.sources),
        "tokens": MetadataValue.json({"min": tokens[0], "mean": round(statistics.mean(tokens), 1),
                                      "p95": tokens[int(0.95 * (len(tokens) - 1))], "max": tokens[-1]} if tokens else {}),
        "preview": MetadataValue.md("| question | answer |\n|---|---|\n" + preview),
        "validation": "passed: JSON, types, fields, roles, UTF-8, conflicts, placeholders, own identity, leaks, length, count",
        "dataset_path": MetadataValue.path(curated.path),
        "eval_probes": n_probes,
        "hub_rows_dropped": len(dataset.dropped),
        **({"hub_rows_dropped_examples": MetadataValue.md("\n".join(f"- {p}" for p in dataset.dropped[:5]))}
           if dataset.dropped else {}),
    }
