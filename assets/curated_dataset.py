"""`curated_dataset`: the identity Q&A the model learns (the tutorials' self_cognition.json), validated and versioned.

Problems stop the run here, all listed as `file:line: problem — fix`, before anything is written: the
previous curated dataset and everything trained from it stay as they were.
"""

import shutil
from dataclasses import dataclass

from dagster import AssetExecutionContext, Failure, MetadataValue, Output, asset

from orchestration.config import CurationConfig
from orchestration.resources import Workspace
from persona.data import DatasetError, load_dataset
from persona.evaluation import load_probes
from persona.models import BaseModel
from persona.storage import staged_dir


@dataclass(frozen=True)
class CuratedDataset:
    path: str          # train.jsonl in ms-swift's messages format
    probes_path: str   # held-out evaluation probes
    version: str       # content hash of the normalized training records
    samples: int


@asset(group_name="persona", code_version="1", description=__doc__)
def curated_dataset(
    context: AssetExecutionContext, config: CurationConfig, workspace: Workspace, base_model: BaseModel
) -> Output[CuratedDataset]:
    sources = [workspace.data_file(s) for s in config.sources]
    probes_file = workspace.data_file(config.probes)
    try:
        probes = load_probes(probes_file)
        dataset = load_dataset(sources, [p.question for p in probes], min_samples=config.min_samples)
    except DatasetError as exc:
        context.log.error(str(exc))
        raise Failure(description=str(exc), metadata={"problems": len(exc.problems)}) from None

    target = workspace.output("datasets", dataset.version[:16])
    if not (target / "train.jsonl").exists():
        with staged_dir(target) as tmp:
            dataset.write_jsonl(tmp / "train.jsonl")
            shutil.copy2(probes_file, tmp / "probes.jsonl")
    curated = CuratedDataset(str(target / "train.jsonl"), str(target / "probes.jsonl"), dataset.version,
                             len(dataset.samples))
    preview = "\n".join(f"| {s.question} | {s.answer} |" for s in dataset.samples[:5])
    return Output(
        curated,
        metadata={
            "version": dataset.version,
            "samples": len(dataset.samples),
            "sources": MetadataValue.json(dataset.sources),
            "path": MetadataValue.path(curated.path),
            "eval_probes": len(probes),
            "base_model": base_model.source,
            "preview": MetadataValue.md("| question | answer |\n|---|---|\n" + preview),
        },
    )
