"""`persona serve`: an OpenAI-compatible HTTP server for the base model and its adapters, built on ms-swift's own
`swift deploy` (FastAPI + uvicorn; its PyTorch engine on a CPU or GPU, vLLM where asked and installed).

What is served is named in the API's model list: the base model under its own name, each adapter under the name
given to it here (the champion as `champion`). Requests naming another model, empty conversations, prompts over
`max_length` and malformed JSON get a 4xx with a message, and the server keeps serving.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from persona.targets import Target, TargetError


@dataclass(frozen=True)
class ServePlan:
    base: Target
    adapters: dict[str, Target]  # served name -> adapter
    base_name: str

    def model_names(self) -> list[str]:
        return [self.base_name, *self.adapters]


def plan(targets: list[tuple[str | None, Target]], base_name: str | None = None, system: str | None = None) -> ServePlan:
    """One base model and the adapters to put on it. `targets`: (served name or None, target); a target without an
    adapter only names the base model. All adapters must share one base model. `system`: the system prompt for
    requests that send none (default: the first target's, i.e. the one its adapter was trained with)."""
    if not targets:
        raise TargetError("nothing to serve: pass --base, --champion or --adapter")
    bases = {t.base_model for _, t in targets}
    if len(bases) > 1:
        raise TargetError("these adapters were trained on different base models, and one server holds one base "
                          "model: " + "; ".join(f"{t.adapter or 'base'} on {t.base_model}" for _, t in targets)
                          + ". Start one `persona serve` per base model, on different ports")
    base = next(t for _, t in targets).with_system(system)
    adapters: dict[str, Target] = {}
    for name, t in targets:
        if t.adapter is None:
            continue
        name = name or Path(t.adapter).name
        if name in adapters and adapters[name].adapter != t.adapter:
            raise TargetError(f"two adapters would both be served as '{name}'; name them with NAME=ADAPTER")
        adapters[name] = t
    base_name = base_name or Path(base.base_model).name
    if base_name in adapters:
        raise TargetError(f"'{base_name}' names both the base model and an adapter; pick another adapter name")
    return ServePlan(base, adapters, base_name)


def deploy_arguments(serve: ServePlan, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
                     device: str = "cpu", max_new_tokens: int = 512, max_length: int = 2048, verbose: bool = False):
    """ms-swift's DeployArguments for `serve` (imports ms-swift: seconds)."""
    from swift.arguments import DeployArguments

    from persona.models import BaseModel, from_local_dir

    base = serve.base
    try:
        model_type = BaseModel.from_dir(base.base_model).model_type
    except (OSError, KeyError, ValueError):  # a folder persona has not described yet
        model_type = from_local_dir(base.base_model).model_type
    if device == "cpu":
        from persona.recipe import cpu_dtype

        dtype = cpu_dtype()[0]
    else:
        dtype = "bfloat16"
    kwargs = dict(model=base.base_model, adapters=[f"{n}={t.adapter}" for n, t in serve.adapters.items()],
                  infer_backend="pt", host=host, port=port, api_key=api_key or None,
                  served_model_name=serve.base_name, owned_by="persona", system=base.system,
                  torch_dtype=dtype, max_new_tokens=max_new_tokens, max_length=max_length,
                  truncation_strategy="raise", temperature=0.0, verbose=verbose, log_interval=-1,
                  device_map="cpu" if device == "cpu" else None)
    if model_type:
        kwargs["model_type"] = model_type
    if base.template:
        kwargs["template"] = base.template
    return DeployArguments(**kwargs)


def serve_forever(args, log=print) -> None:
    """Run ms-swift's server until interrupted."""
    from swift.pipelines.infer.deploy import SwiftDeploy

    server = SwiftDeploy(args)
    log(f"serving {', '.join(server._get_model_list())} on http://{args.host}:{args.port}/v1 "
        f"({'API key required' if args.api_key else 'no API key'}); Ctrl-C to stop")
    server.run()
