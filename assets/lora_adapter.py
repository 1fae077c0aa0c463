"""`lora_adapter`: LoRA SFT of the base model on the curated dataset with ms-swift (the tutorials' `swift sft`).

One MLflow run per materialization: every resolved hyperparameter, the loss curve, time and peak memory.
"""

import math
import json
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dagster import AssetExecutionContext, Backoff, Failure, MetadataValue, Output, RetryPolicy, asset

from assets.curated_dataset import CuratedDataset
from orchestration.config import TrainingConfig
from orchestration.resources import MlflowTracker, Trainer, Workspace, unwritable_is_failure
from persona.models import BaseModel
from persona.plots import loss_curve_markdown, loss_curve_png
from persona.recipe import CPU_DTYPE_ENV, cpu_dtype, default_recipe, detect_device, resolve_dtype
from persona.families import trained_settings
from persona.locks import exclusive
from persona.training import TrainingError, TrainingInterrupted, available_recipe
from persona.targets import ADAPTER_MANIFEST

STEP_METRICS = {"loss": "train/loss", "learning_rate": "train/learning_rate", "grad_norm": "train/grad_norm"}


@dataclass(frozen=True)
class LoraAdapter:
    path: str
    mlflow_run_id: str
    device: str
    system: str
    dataset_version: str
    identity: dict = field(default_factory=dict)  # the Identity fields it was trained for


MANIFEST = ADAPTER_MANIFEST  # written last: its presence marks a complete adapter
TRAINING_LOCK = ".training.lock"  # under outputs/: held while a training runs (persona.locks)


# code_version: bump it with any change to how an adapter is trained (persona/recipe.py, training.py,
# train_worker.py); Dagster then marks adapters and evaluation reports stale, and the retrain schedule retrains.
# The schedule also sees edits to the default recipes' values without a bump (orchestration/upstream.py).
# pool: at most one training at a time; the limit is in dagster.yaml.
# retry_policy: a killed trainer (a signal, the out-of-memory killer; TrainingInterrupted) is tried again, and the
# retry resumes from the training's last checkpoint (outputs/checkpoints/); other failures are not retried.
TRAINER_RETRIES = RetryPolicy(max_retries=2, delay=5, backoff=Backoff.EXPONENTIAL)


@asset(group_name="persona", code_version="2", pool="training", retry_policy=TRAINER_RETRIES, description=__doc__)
def lora_adapter(
    context: AssetExecutionContext,
    config: TrainingConfig,
    base_model: BaseModel,
    curated_dataset: CuratedDataset,
    workspace: Workspace,
    mlflow_tracker: MlflowTracker,
    trainer: Trainer,
) -> Output[LoraAdapter]:
    import mlflow
    from mlflow.entities import Metric

    device = detect_device() if config.device == "auto" else config.device
    recipe = resolve_dtype(default_recipe(device, config.recipe, base_model.parameters)
                           .with_overrides(**config.overrides()), device)
    recipe = available_recipe(recipe, warn=context.log.warning)  # an optional kernel missing: knob off, one warning
    if device == "cpu":
        dtype, why = cpu_dtype()
        context.log.info(f"CPU dtype: {recipe.torch_dtype} (automatic choice {dtype}: {why}; set torch_dtype or "
                         f"${CPU_DTYPE_ENV} to override)")
    run_name = f"{curated_dataset.version[:8]}-lr{recipe.learning_rate:g}-e{recipe.num_train_epochs}-{device}"
    with mlflow_tracker.run(run_name=run_name) as run:
        run_id = run.info.run_id
        mlflow.log_params({**recipe.as_params(), "device": device, "base_model": base_model.source,
                           "base_model_revision": base_model.revision, "base_model_sha256": base_model.weights_sha256,
                           "dataset_version": curated_dataset.version, "dataset_samples": curated_dataset.samples})
        mlflow.set_tags({"dagster_run_id": context.run_id, "persona.stage": "lora_adapter"})
        context.log.info(f"Training on {device} with {recipe}; MLflow run {run_id}")

        def progress(p: dict) -> None:
            context.log.info(f"step {p.get('global_step/max_steps')}: loss {p.get('loss', p.get('train_loss'))}, "
                             f"elapsed {p.get('elapsed_time')}, remaining {p.get('remaining_time')}")

        identity = curated_dataset.identity()

        def output(line: str) -> None:  # persona's own lines from the trainer (resuming, fallbacks, start-up stages)
            if line.startswith("[persona]"):
                context.log.info(line.removeprefix("[persona] "))

        target = workspace.output("adapters", run_id)
        mlflow_tracker.discard_on_failure(target)  # a run that fails from here on leaves no adapter folder behind
        # One training at a time on this machine, whoever started it (`persona run`, the sensor, the schedule, the
        # launchpad): the pool limit covers the daemon's runs only. A second training waits here, and says so.
        slot = exclusive(workspace.output(TRAINING_LOCK), f"the training of Dagster run {context.run_id[:8]}",
                         on_wait=context.log.info)
        try:
            with unwritable_is_failure(target), slot:
                result = trainer.train(base_model, curated_dataset.path, recipe, target, device, on_progress=progress,
                                       checkpoint_root=workspace.output("checkpoints"), owner=run_id,
                                       on_output=output)
        except TrainingError as exc:
            mlflow.set_tag("persona.error", str(exc)[:5000])  # the run ends FAILED
            raise Failure(description=str(exc), allow_retries=isinstance(exc, TrainingInterrupted)) from None
        if result.resumed_from_step:
            mlflow.set_tags({"persona.resumed_from_run": result.resumed_from or "",
                             "persona.resumed_from_step": str(result.resumed_from_step)})
            context.log.info(f"Resumed at step {result.resumed_from_step} from the interrupted MLflow run "
                             f"{result.resumed_from}")

        logged_at = int(time.time() * 1000)  # the loss curve in one batch (not a request per point: ~6 ms each)
        mlflow.MlflowClient().log_batch(run_id, metrics=[
            Metric(name, float(h[key]), logged_at, int(h.get("step", 0)))
            for h in result.log_history for key, name in STEP_METRICS.items()
            if key in h and h[key] is not None and math.isfinite(float(h[key]))])
        mlflow.log_metrics({
            "train/seconds": result.train_seconds,
            "train/wall_seconds": result.wall_seconds,
            "train/peak_memory_gib": result.peak_memory_gib,
            "train/tokens_per_second": result.tokens_per_second,
            "train/final_loss": result.final_loss,
            "train/global_step": result.global_step,
        })
        with tempfile.TemporaryDirectory() as tmp:  # the picture lives in MLflow, not in the adapter folder
            mlflow.log_artifact(str(loss_curve_png(result.log_history, Path(tmp, "loss_curve.png"), run_name)), "plots")
        adapter = LoraAdapter(result.adapter_dir, run_id, device, recipe.system, curated_dataset.version, identity)
        trained = trained_settings(result.adapter_dir)  # what ms-swift trained with (its args.json)
        manifest = {**asdict(adapter), "base_model": base_model.path,
                    "template": trained["template"] or base_model.template,
                    "dataset_probes": curated_dataset.probes_path}
        mlflow.log_artifacts(result.adapter_dir, artifact_path="adapter")
        # The registry's copy is usable on its own (`persona chat --champion`, `serve`, `export`).
        mlflow.log_dict(manifest, f"adapter/{MANIFEST}")
        mlflow.set_tag("persona.trainer", "standby" if result.standby else "fresh process")
        if result.gradient_checkpointing is not None:  # the fast recipe's choice is made by the child (pre-flight)
            mlflow.set_tag("persona.gradient_checkpointing", "on" if result.gradient_checkpointing else "off")
        # Last, inside the run: the manifest marks a complete adapter, and a failure to write it fails the run too.
        Path(result.adapter_dir, MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False),
                                                      encoding="utf-8")
    return Output(
        adapter,
        metadata={
            "adapter_path": MetadataValue.path(result.adapter_dir),  # "path" is the IO manager's pickle
            "global_step": result.global_step,
            "final_loss": result.final_loss,
            "train_seconds": round(result.train_seconds, 1),
            "wall_seconds": MetadataValue.float(round(result.wall_seconds, 1)),
            "trainer": "standby (imports done ahead)" if result.standby else "fresh process",
            "resumed_from_step": result.resumed_from_step,
            "peak_memory_gib": round(result.peak_memory_gib, 2),
            "gradient_checkpointing": str(result.gradient_checkpointing),
            "tokens_per_second": round(result.tokens_per_second, 1),
            "device": device,
            "mlflow_run": MetadataValue.url(mlflow_tracker.run_url(run_id)),
            "loss_curve": MetadataValue.md(loss_curve_markdown(result.log_history, image_url=(  # MLflow UI serves it
                f"{mlflow_tracker.ui_url}/get-artifact?path=plots/loss_curve.png&run_uuid={run_id}"),
                link_url=f"{mlflow_tracker.run_url(run_id)}/artifacts/plots/loss_curve.png")),
        },
    )
