"""Resources: where files live, where base weights come from, the MLflow experiment tracker, and the trainer (real,
and a fast fake for tests)."""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Literal

from dagster import ConfigurableResource, Failure
from pydantic import Field

from persona.models import BaseModel, resolve_base_model

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CHAMPION = "champion"


_DISCARD: dict[str, list[Path]] = {}  # MLflow run id -> what MlflowTracker.run removes if its block fails


def _home(*parts: str) -> str:
    return str(Path(os.environ.get("PERSONA_HOME", PROJECT_ROOT), *parts))


@contextmanager
def unwritable_is_failure(target: Path) -> Iterator[None]:
    """A full disk or an unwritable folder becomes one clear line; staged writes have already been cleaned up."""
    try:
        yield
    except OSError as exc:
        raise Failure(description=f"Cannot write {target}: {exc.strerror or exc}. Free disk space or fix the folder's "
                                  "permissions, then run again; earlier datasets, adapters and MLflow runs are untouched.",
                      allow_retries=False) from None


class DataPathError(ValueError):
    """A configured data file lies outside the data folder."""


class Workspace(ConfigurableResource):
    """The data folder users edit, and the outputs folder the pipeline owns."""

    data_dir: str = Field(default_factory=lambda: _home("data"))
    outputs_dir: str = Field(default_factory=lambda: _home("outputs"))

    def data_file(self, name: str) -> Path:
        """A file inside the data folder. `../` and symlinks that lead outside it are refused."""
        root = Path(self.data_dir).resolve()
        path = (root / name).resolve()
        if not path.is_relative_to(root):
            raise DataPathError(f"{name}: resolves to {path}, outside the data folder {root}; "
                                "put the file inside the data folder and name it relative to it")
        return path

    def output(self, *parts: str) -> Path:
        return Path(self.outputs_dir, *parts)


class Trainer(ConfigurableResource):
    """Trains LoRA adapters: ms-swift's `sft_main` in a child process (persona.training.train_lora).

    On a GPU a standby trainer (persona.standby) is started when the run starts (`setup_for_execution`): the training
    child, started ahead of time, imports torch and ms-swift and creates its CUDA context while the run prepares the
    weights and the data, so a run does not wait ~20 s for a fresh process. `train` hands it the job and starts the
    next one, which waits `idle_seconds` for the next run (the sensor's or the schedule's) and then exits; it holds
    a CUDA context (~0.5 GiB of GPU memory) while it waits.

    standby: "gpu" (on a GPU, where the import is the largest part of a training run), "always", "never"; the
    default comes from $PERSONA_TRAINER_STANDBY, else "gpu".
    """

    standby: Literal["gpu", "always", "never"] = Field(
        default_factory=lambda: os.environ.get("PERSONA_TRAINER_STANDBY", "gpu"))
    idle_seconds: float = Field(default=900.0, gt=0, description="How long a standby waits for a job, then exits.")

    def setup_for_execution(self, context) -> None:
        if self.warm():
            context.log.info("Started a standby trainer (torch and ms-swift import while the run goes on).")

    def idle_for(self, device: str) -> float | None:
        """How long a standby for `device` waits for its job; None: no standby for this device."""
        from persona.training import world_size_from_env

        if self.standby == "never" or (self.standby == "gpu" and device == "cpu"):
            return None
        if world_size_from_env(device) > 1:
            return None  # torchrun starts one process per GPU itself
        return self.idle_seconds

    def warm(self, device: str | None = None) -> bool:
        """Start a standby for `device` (default: this machine's) unless one is waiting; True when one was started."""
        from persona.recipe import detect_device_early
        from persona.standby import Standby
        from persona.training import child_env

        if self.standby == "never":
            return False
        device = device or detect_device_early()  # (before this run imports torch: the standby starts 5 s sooner)
        idle = self.idle_for(device)
        return idle is not None and Standby(device, child_env(device), idle).warm()

    def train(self, base: BaseModel, dataset_path: str, recipe, target: Path, device: str,
              on_progress: Callable[[dict], None] | None = None, checkpoint_root: Path | None = None,
              owner: str | None = None, on_output: Callable[[str], None] | None = None):
        """A persona.training.TrainResult; the adapter folder `target` appears only if training succeeds. With
        `checkpoint_root`, an interrupted training of the same data and config resumes from its last checkpoint."""
        from persona.training import train_lora

        return train_lora(base, dataset_path, recipe, target, device, on_progress=on_progress, on_output=on_output,
                          standby_idle_seconds=self.idle_for(device), checkpoint_root=checkpoint_root, owner=owner)


class FakeTrainer(Trainer):
    """The local stand-in for tests of what surrounds training: a valid, untrained adapter and a synthetic loss
    history in about a second (persona.fake_training), no ms-swift child, no standby."""

    standby: Literal["gpu", "always", "never"] = "never"

    def setup_for_execution(self, context) -> None:
        pass

    def train(self, base: BaseModel, dataset_path: str, recipe, target: Path, device: str,
              on_progress: Callable[[dict], None] | None = None, checkpoint_root: Path | None = None,
              owner: str | None = None, on_output: Callable[[str], None] | None = None):
        from persona.fake_training import fake_train_lora

        return fake_train_lora(base, dataset_path, recipe, target, device, on_progress)


class ModelHub(ConfigurableResource):
    """Base weights: the embedded GGUF, a local folder, or a ModelScope download (cached under outputs)."""

    cache_dir: str = Field(default_factory=lambda: _home("outputs", "base_models"))

    def get(self, model: str, revision: str) -> BaseModel:
        return resolve_base_model(model, revision, Path(self.cache_dir))


def _unwritable(exc: BaseException) -> str | None:
    """'<what>: <why>' when `exc` (or what it came from) is a full disk or an unwritable file or database."""
    import errno

    seen = 0
    while exc is not None and seen < 20:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES,
                                                      errno.EPERM):
            return f"{exc.filename or 'a file'}: {exc.strerror or exc}"
        text = str(exc)
        if "database or disk is full" in text or "readonly database" in text:
            return f"MLflow's tracking database: {'database or disk is full' if 'full' in text else 'read-only'}"
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


def _is_server(tracking_uri: str) -> bool:
    return tracking_uri.startswith(("http://", "https://"))


class MlflowTracker(ConfigurableResource):
    """An MLflow experiment. Locally: SQLite and artifacts under mlruns/; remotely: the tracking server that
    $MLFLOW_TRACKING_URI names (http(s)://HOST:PORT), which stores the artifacts (`--serve-artifacts`) and serves
    the UI."""

    tracking_uri: str = Field(default_factory=lambda: os.environ.get("MLFLOW_TRACKING_URI")
                              or "sqlite:///" + _home("mlruns", "mlflow.db"))
    artifact_root: str | None = Field(
        default_factory=lambda data: None if _is_server(data["tracking_uri"]) else _home("mlruns", "artifacts"),
        description="Where a new experiment's artifacts go; None: the server's default (its artifact proxy).")
    experiment: str = "persona"
    registered_model: str = Field(default="persona-adapter", description="Model Registry name; alias 'champion'.")
    ui_url: str = Field(
        default_factory=lambda data: data["tracking_uri"].rstrip("/") if _is_server(data["tracking_uri"])
        else "http://127.0.0.1:5000", description="The MLflow UI: the server itself, else where `make ui` serves it.")

    def client(self):
        import mlflow

        self.check_store()
        if self.tracking_uri.startswith("sqlite:///"):
            Path(self.tracking_uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        mlflow.set_tracking_uri(self.tracking_uri)
        return mlflow.MlflowClient(self.tracking_uri)

    def check_store(self) -> None:
        """Refuse (TrackingStoreError) a local tracking database that is damaged, or missing or empty while earlier
        runs' artifacts exist, before MLflow would silently start a new history (orchestration.tracking_store). A
        tracking server guards its own store."""
        from orchestration.tracking_store import check_local_store, local_path

        if self.tracking_uri.startswith("sqlite:///"):
            check_local_store(Path(self.tracking_uri.removeprefix("sqlite:///")), local_path(self.artifact_root))

    def experiment_id(self) -> str:
        client = self.client()
        exp = client.get_experiment_by_name(self.experiment)
        if exp is not None:
            return exp.experiment_id
        location = (None if not self.artifact_root else self.artifact_root if "://" in self.artifact_root
                    else Path(self.artifact_root).resolve().as_uri())
        return client.create_experiment(self.experiment, artifact_location=location)

    @contextmanager
    def run(self, run_id: str | None = None, **start_kwargs) -> Iterator:
        """Start (or reopen) a run. If the block raises, the run ends FAILED (KILLED when interrupted: Ctrl-C, a
        termination request) with the reason in the tag persona.error unless the block set one; a run started here
        keeps no artifacts (they would be partial), the paths given to discard_on_failure are removed, and an
        interrupt, a full disk or an unwritable folder becomes a Failure that is not retried. A new run starts with a
        copy of a local tracking database (orchestration.tracking_store)."""
        import mlflow

        from orchestration.tracking_store import backup_local_store

        self.client()
        if run_id is None and self.tracking_uri.startswith("sqlite:///"):
            backup_local_store(Path(self.tracking_uri.removeprefix("sqlite:///")))
        active = mlflow.start_run(run_id=run_id, experiment_id=None if run_id else self.experiment_id(), **start_kwargs)
        try:
            yield active
        except BaseException as exc:
            failure = self._failed(active.info.run_id, exc, started=run_id is None)
            if failure is None:
                raise
            raise failure from exc
        else:
            mlflow.end_run()
        finally:
            _DISCARD.pop(active.info.run_id, None)

    def discard_on_failure(self, *paths: str | Path) -> None:
        """Remove `paths` if the block of the active `run()` fails: what the run made that is no use without it (the
        adapter folder of a training whose run did not finish)."""
        import mlflow

        _DISCARD.setdefault(mlflow.active_run().info.run_id, []).extend(Path(p) for p in paths)

    def _failed(self, run_id: str, exc: BaseException, started: bool) -> Failure | None:
        """End the failed run as run() says; the Failure to raise instead of `exc`, or None to re-raise it."""
        import shutil

        import mlflow

        from orchestration.plain_errors import INTERRUPTS, reason
        from orchestration.tracking_store import remove_run_artifacts

        stopped = type(exc).__name__ in INTERRUPTS
        why = ("interrupted (Ctrl-C, or a termination request)" if stopped
               else exc.description if isinstance(exc, Failure) and exc.description else reason(exc))
        client, recorded = mlflow.MlflowClient(self.tracking_uri), True
        try:
            if "persona.error" not in client.get_run(run_id).data.tags:
                client.set_tag(run_id, "persona.error", why[:5000])
        except Exception:  # noqa: BLE001 - the store may be what failed
            recorded = False
        try:
            mlflow.end_run("KILLED" if stopped else "FAILED")
        except Exception:  # noqa: BLE001
            recorded = False
        if started:
            try:
                remove_run_artifacts(client, run_id)
            except Exception:  # noqa: BLE001
                pass
        for path in _DISCARD.get(run_id, []):
            shutil.rmtree(path, ignore_errors=True)
        status = (f"MLflow run {run_id} ended {'KILLED' if stopped else 'FAILED'}"
                  + (" and its partial artifacts were removed" if started and not stopped else "") if recorded
                  else f"MLflow could not record it either (run {run_id} stays RUNNING: its store is not writable)")
        if stopped:
            return Failure(description=f"Interrupted (Ctrl-C, or a termination request); {status}.",
                           allow_retries=False)
        unwritable = None if isinstance(exc, Failure) else _unwritable(exc)  # (a Failure says it already)
        if unwritable is not None:
            return Failure(description=f"Cannot write {unwritable}. Free disk space or fix the folder's permissions, "
                                       f"then run again; {status}, and earlier datasets, adapters, MLflow runs and the "
                                       "champion are untouched.", allow_retries=False)
        return None

    def end_runs_of(self, dagster_run_id: str, reason: str) -> list[str]:
        """End the RUNNING MLflow runs that the Dagster run `dagster_run_id` started (tag dagster_run_id) as KILLED,
        with `reason` in the tag persona.error; their ids. (For a run whose process died: orchestration.stale_runs.)"""
        client = self.client()
        exp = client.get_experiment_by_name(self.experiment)
        if exp is None:
            return []
        runs = client.search_runs([exp.experiment_id], filter_string=f"tags.dagster_run_id = '{dagster_run_id}' "
                                  "and attributes.status = 'RUNNING'")
        for run in runs:
            client.set_tag(run.info.run_id, "persona.error", reason)
            client.set_terminated(run.info.run_id, status="KILLED")
        return [run.info.run_id for run in runs]

    def run_url(self, run_id: str) -> str:
        run = self.client().get_run(run_id)
        return f"{self.ui_url}/#/experiments/{run.info.experiment_id}/runs/{run_id}"

    # --- Model Registry: adapter-only versions, the `champion` alias ------------------------------

    def champion(self):
        """(model version, its run's metrics) for the alias `champion`, or None."""
        from mlflow.exceptions import MlflowException

        client = self.client()
        try:
            version = client.get_model_version_by_alias(self.registered_model, CHAMPION)
        except MlflowException:
            return None
        return version, client.get_run(version.run_id).data.metrics

    @contextmanager
    def promotion_lock(self, on_wait: Callable[[str], None] | None = None) -> Iterator[None]:
        """Held while a run reads the champion, decides and moves the alias (persona.locks). A file lock beside a
        local store; a tracking server has no lock that spans machines, so there the decision relies on one
        promotion at a time (the training pool; DEPLOYMENT.md)."""
        from persona.locks import exclusive

        if not self.tracking_uri.startswith("sqlite:///"):
            yield
            return
        lock = Path(self.tracking_uri.removeprefix("sqlite:///")).parent / ".promotion.lock"
        with exclusive(lock, "a champion promotion", on_wait):
            yield

    def promote(self, run_id: str, description: str) -> str:
        """Register the run's `adapter/` artifacts (not the base weights) and move `champion` to them."""
        from mlflow.exceptions import MlflowException

        client = self.client()
        try:
            client.create_registered_model(self.registered_model, description="LoRA adapters trained by persona "
                                           "(adapter weights only; the base model is recorded in each run's params).")
        except MlflowException:
            pass  # exists already
        source = client.get_run(run_id).info.artifact_uri.rstrip("/") + "/adapter"
        version = client.create_model_version(self.registered_model, source, run_id=run_id, description=description)
        client.set_registered_model_alias(self.registered_model, CHAMPION, version.version)
        return version.version
