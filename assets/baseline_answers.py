"""`baseline_answers`: the held-out probes put to the base model as it is, and with the identity in its system
prompt only (the tutorials' "before" column and their prompt-only alternative). They need no adapter, so this step
runs beside `lora_adapter` and the evaluation decodes the adapter's rows alone.

The answers depend only on the base weights, the probes, the system prompt and the decoding settings: they are
remembered in outputs/answer_cache under a hash of all of it, and a run that changed only the training data reuses
them instead of decoding again.
"""
import time
from dataclasses import dataclass

from dagster import AssetExecutionContext, MetadataValue, Output, asset

from assets.curated_dataset import CuratedDataset
from orchestration.config import EvaluationConfig
from orchestration.resources import Workspace
from persona.data import Identity
from persona.evaluation import Decoded, EvaluationSetup
from persona.inference import release_memory
from persona.models import BaseModel
from persona.recipe import default_recipe, detect_device


@dataclass(frozen=True)
class BaselineAnswers:
    setup: EvaluationSetup        # what they were decoded with; the evaluation decodes with the same settings
    answers: dict[str, Decoded]   # "base", "prompt_only"


@asset(group_name="persona", code_version="1", description=__doc__)
def baseline_answers(context: AssetExecutionContext, config: EvaluationConfig, base_model: BaseModel,
                     curated_dataset: CuratedDataset, workspace: Workspace) -> Output[BaselineAnswers]:
    device = detect_device()
    system = default_recipe(device, parameters=base_model.parameters).system
    setup = config.setup(base_model, curated_dataset.probes_path, Identity(**curated_dataset.identity()), system,
                         device, workspace.output("answer_cache"))
    started = time.time()
    loads = []  # setup.baseline loads the model only for answers it does not remember
    answers = setup.baseline(lambda: loads.append(1) or setup.load(), log=context.log.info,
                             on_batch=lambda done, total: context.log.info(f"answered {done}/{total}"))
    if loads:  # (nothing loaded, nothing to give back: a full collection costs ~0.5 s)
        release_memory(device)  # before the training child claims the GPU
    counts = {name: len(d.texts) for name, d in answers.items()}
    context.log.info(f"Baseline answers: {counts} in {time.time() - started:.1f} s.")
    return Output(BaselineAnswers(setup, answers), metadata={
        "answers": MetadataValue.json(counts),
        "system": system,
        "device": device,
        "seconds": round(time.time() - started, 1),
    })
