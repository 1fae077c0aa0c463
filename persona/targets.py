"""What `persona chat`, `ask`, `export` and `serve` talk to: the base model alone, or the base model with one adapter.

An adapter is named the way users already know it: a folder under outputs/adapters, an MLflow run id, or a Model
Registry URI (`models:/persona-adapter@champion`, `models:/persona-adapter/3`). A folder is usable when it holds
ADAPTER_MANIFEST, which says which base model, chat template and system prompt it was trained with.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

ADAPTER_MANIFEST = "persona_adapter.json"  # written last into an adapter folder: its presence marks a complete adapter
DEFAULT_SYSTEM = "You are a helpful assistant."  # the recipes' system prompt (persona.recipe.Recipe.system)


class TargetError(RuntimeError):
    """The asked-for model or adapter cannot be used; the message says what to pass instead."""


@dataclass(frozen=True)
class Target:
    """A base model folder, optionally with a LoRA adapter folder, and how to prompt it."""

    base_model: str
    template: str | None
    system: str
    adapter: str | None = None
    label: str = ""                  # what it is, in words, for the line that says which model answers
    run_id: str | None = None        # the adapter's MLflow run
    manifest: dict = field(default_factory=dict, compare=False)

    def with_system(self, system: str | None) -> "Target":
        if not system:
            return self
        return Target(self.base_model, self.template, system, self.adapter, self.label, self.run_id, self.manifest)


def base_target(base_dir: str, template: str | None, name: str, system: str | None = None) -> Target:
    return Target(str(base_dir), template, system or DEFAULT_SYSTEM, None, f"the base model {name} (no adapter)")


def adapter_target(folder: str | Path, label: str | None = None) -> Target:
    """The adapter in `folder`, as its manifest describes it."""
    folder = Path(folder)
    manifest_file = folder / ADAPTER_MANIFEST
    if not folder.is_dir():
        raise TargetError(f"{folder}: no such adapter folder; pass a folder under outputs/adapters/, an MLflow run "
                          "id, or models:/persona-adapter@champion")
    if not manifest_file.exists():
        raise TargetError(f"{folder}: not a persona adapter (no {ADAPTER_MANIFEST}); pass a folder under "
                          "outputs/adapters/ or an MLflow run id")
    manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
    base = manifest["base_model"]
    if not Path(base).is_dir():
        raise TargetError(f"{manifest_file}: its base model {base} is gone; run `persona run` (or `make run`) "
                          "again to prepare it")
    return Target(base, manifest.get("template"), manifest.get("system") or DEFAULT_SYSTEM, str(folder),
                  label or f"the adapter {folder}", manifest.get("mlflow_run_id"), manifest)


def newest_adapter(adapters_root: Path) -> Path | None:
    done = sorted(Path(adapters_root).glob(f"*/{ADAPTER_MANIFEST}"), key=lambda p: p.stat().st_mtime)
    return done[-1].parent if done else None


def local_adapter_of_run(adapters_root: Path, run_id: str) -> Path | None:
    """The folder under `adapters_root` that `run_id` trained, if it is still there."""
    for manifest in Path(adapters_root).glob(f"*/{ADAPTER_MANIFEST}"):
        try:
            if json.loads(manifest.read_text(encoding="utf-8")).get("mlflow_run_id") == run_id:
                return manifest.parent
        except (OSError, json.JSONDecodeError):
            continue
    return None


class Registry:
    """Adapters in MLflow: runs' `adapter/` artifacts and the Model Registry versions made from them."""

    def __init__(self, tracking_uri: str, registered_model: str, adapters_root: Path, download_root: Path):
        self.tracking_uri = tracking_uri
        self.registered_model = registered_model
        self.adapters_root = Path(adapters_root)
        self.download_root = Path(download_root)

    def client(self):
        import mlflow

        mlflow.set_tracking_uri(self.tracking_uri)
        return mlflow.MlflowClient(self.tracking_uri)

    def champion_version(self):
        """The Model Registry version holding the alias `champion`, or None."""
        from mlflow.exceptions import MlflowException

        try:
            return self.client().get_model_version_by_alias(self.registered_model, "champion")
        except MlflowException:
            return None

    def version(self, uri: str):
        """The model version `models:/NAME@ALIAS` or `models:/NAME/VERSION` names."""
        from mlflow.exceptions import MlflowException

        rest = uri.removeprefix("models:/")
        name, sep, alias = rest.partition("@")
        try:
            if sep:
                return self.client().get_model_version_by_alias(name, alias)
            name, _, number = rest.rpartition("/")
            if not name or not number.isdigit():
                raise TargetError(f"{uri}: write models:/NAME@ALIAS or models:/NAME/VERSION, "
                                  f"e.g. models:/{self.registered_model}@champion")
            return self.client().get_model_version(name, number)
        except MlflowException as exc:
            raise TargetError(f"{uri}: not in the Model Registry at {self.tracking_uri} "
                              f"({str(exc).splitlines()[0][:160]})") from None

    def run_adapter(self, run_id: str, label: str) -> Target:
        """The adapter MLflow run `run_id` trained: its folder under outputs/adapters when it is still there, else its
        `adapter/` artifacts downloaded once under download_root."""
        local = local_adapter_of_run(self.adapters_root, run_id)
        if local is not None:
            return adapter_target(local, label)
        target = self.download_root / run_id
        if not (target / ADAPTER_MANIFEST).exists():
            import mlflow
            from mlflow.exceptions import MlflowException

            from persona.storage import staged_dir

            self.client()
            try:
                with staged_dir(target) as tmp:
                    mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="adapter", dst_path=str(tmp))
                    inner = Path(tmp, "adapter")
                    for item in inner.iterdir():
                        item.rename(Path(tmp, item.name))
                    inner.rmdir()
                    if not Path(tmp, ADAPTER_MANIFEST).exists():
                        raise TargetError(f"MLflow run {run_id}: its adapter/ artifacts have no {ADAPTER_MANIFEST} "
                                          "(trained before adapters carried one) and its folder is no longer under "
                                          f"{self.adapters_root}; train again with `persona run`")
            except MlflowException as exc:
                raise TargetError(f"MLflow run {run_id}: no adapter/ artifacts at {self.tracking_uri} "
                                  f"({str(exc).splitlines()[0][:160]})") from None
        return adapter_target(target, label)

    def resolve(self, spec: str) -> Target:
        """`spec`: a Model Registry URI, an MLflow run id, or 'champion'."""
        if spec == "champion":
            version = self.champion_version()
            if version is None:
                raise TargetError("No champion yet: no adapter has passed the gate. Run `persona run`, or pass "
                                  "--adapter with a folder or run id, or --base for the base model alone")
            return self.run_adapter(version.run_id, f"the champion ({self.registered_model} version "
                                                    f"{version.version}, MLflow run {version.run_id})")
        if spec.startswith("models:/"):
            version = self.version(spec)
            return self.run_adapter(version.run_id, f"{spec} ({version.name} version {version.version}, "
                                                    f"MLflow run {version.run_id})")
        from mlflow.exceptions import MlflowException

        try:
            self.client().get_run(spec)
        except MlflowException:
            raise TargetError(f"{spec}: neither an adapter folder, nor an MLflow run id, nor a models:/ URI") from None
        return self.run_adapter(spec, f"the adapter of MLflow run {spec}")


def resolve_adapter(spec: str, registry: Registry) -> Target:
    """--adapter's value: a folder, else an MLflow run id or a models:/ URI."""
    if Path(spec).exists() or "/" in spec and not spec.startswith("models:/"):
        return adapter_target(spec)
    return registry.resolve(spec)


def default_target(registry: Registry) -> tuple[Target, str]:
    """The champion when there is one, else the newest adapter; with the reason, in one line."""
    version = registry.champion_version()
    if version is not None:
        target = registry.resolve("champion")
        return target, f"talking to {target.label}: the adapter that passed the gate last (--base, --adapter to change)"
    newest = newest_adapter(registry.adapters_root)
    if newest is None:
        raise TargetError("No adapter yet: run `make run` (or `persona run`) first, or use --base to talk to the "
                          "base model alone")
    target = adapter_target(newest)
    return target, (f"talking to {target.label}: the newest adapter, as no adapter has passed the gate yet "
                    "(no champion); --base or --adapter to change")
