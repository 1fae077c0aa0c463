"""The project's run config: `persona.yaml`, read and checked (every mistake located `file:line`), and the
switches read from the environment. The dataset sensor, the retrain schedule and `persona run` launch
`train_persona` with this config; orchestration/upstream.py digests what a run was made from.
"""
from __future__ import annotations

import os
from pathlib import Path

import yaml

from orchestration.config import BaseModelConfig, CurationConfig, EvaluationConfig, TrainingConfig
from orchestration.promotion_gate import PromotionGate
from orchestration.resources import PROJECT_ROOT

PROJECT_FILE = "persona.yaml"
INSTANCE_FILE = "dagster.yaml"  # the shipped instance config: one training run at a time


def switched_off(env: str) -> bool:
    return os.environ.get(env, "").strip().lower() in ("0", "off", "false", "no")


def switched_on(env: str) -> bool:
    return os.environ.get(env, "").strip().lower() in ("1", "on", "true", "yes")


def project_file() -> Path:
    return Path(os.environ.get("PERSONA_HOME", PROJECT_ROOT), PROJECT_FILE)


class ProjectConfigError(ValueError):
    """A mistake in persona.yaml, located: `file:line: key.path: what is wrong — what is allowed`, one line each."""


# The steps persona.yaml configures, and their config classes (None: no settings). tests/test_plain_errors.py checks
# that these are the train_persona job's.
STEP_CONFIGS = {"base_model": BaseModelConfig, "curated_dataset": CurationConfig, "baseline_answers": EvaluationConfig,
                "lora_adapter": TrainingConfig, "evaluation_report": None, "champion": None}
# The resources persona.yaml may configure (the others are set by the project: paths, MLflow, the trainer).
RESOURCE_CONFIGS = {"promotion_gate": PromotionGate}
TOP_KEYS = ("ops", "resources", "execution", "loggers")  # Dagster run config; persona.yaml needs ops and resources


def load_run_config(overrides: dict | None = None) -> dict:
    """persona.yaml's Dagster run config ({} when there is no file), checked (ProjectConfigError), with `overrides`
    merged on top."""
    path = project_file()
    text = path.read_text(encoding="utf-8") if path.is_file() else ""
    try:
        base = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ProjectConfigError(_yaml_problem(path, exc)) from None
    if base is None:
        base = {}
    if not isinstance(base, dict):
        raise ProjectConfigError(f"{path}: expected Dagster run config such as 'ops: {{curated_dataset: {{config: "
                                 f"...}}}}', found a {type(base).__name__}")
    problems = check_run_config(base)
    if problems:
        lines = _key_lines(text)
        problems.sort(key=lambda problem: lines.get(problem[0], 10**9))
        raise ProjectConfigError("\n".join(f"{path}{f':{lines[keys]}' if keys in lines else ''}: {what}"
                                           for keys, what in problems))
    return _merge(base, overrides or {})


def _yaml_problem(path: Path, exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
    what = " ".join(str(part) for part in (getattr(exc, "problem", None), getattr(exc, "context", None)) if part)
    return (f"{where}: not valid YAML ({what or exc}) — fix the syntax there: indent with spaces, not tabs, keep "
            "the keys of one mapping at one indentation, and quote a value that contains ': ' or starts with one of "
            "[ ] { } & * ! | > ' \" % @ `")


def check_run_config(config: dict) -> list[tuple[tuple, str]]:
    """The problems of a run config, as (key path, 'dotted.path: what is wrong — what is allowed')."""
    from dagster._config import validate_config

    problems = []
    for key in config:
        if key not in TOP_KEYS:
            problems.append(((key,), f"{key}: unknown key{_did_you_mean(key, TOP_KEYS)} — allowed at the top: "
                                     f"{', '.join(TOP_KEYS)} (persona's settings go under ops)"))
    ops = config.get("ops") or {}
    if not isinstance(ops, dict):
        return problems + [(("ops",), "ops: must be a mapping of steps to their config, e.g. 'ops: {lora_adapter: "
                                      "{config: {learning_rate: 0.0005}}}'")]
    for op, section in ops.items():
        if op not in STEP_CONFIGS:
            problems.append((("ops", op), f"ops.{op}: unknown step{_did_you_mean(op, STEP_CONFIGS)} — allowed: "
                                          f"{', '.join(STEP_CONFIGS)}"))
            continue
        if section is None:
            continue
        if not isinstance(section, dict):
            problems.append((("ops", op), f"ops.{op}: must be a mapping with 'config', found {section!r}"))
            continue
        for key in section:
            if key != "config":
                problems.append((("ops", op, key), f"ops.{op}.{key}: unknown key — allowed: config"))
        settings, cls = section.get("config"), STEP_CONFIGS[op]
        if settings is None:
            continue
        if cls is None:
            moved = " (the promotion thresholds are resources.promotion_gate.config: the gate and the quality checks " \
                    "read them there)" if op == "champion" else ""
            problems.append((("ops", op, "config"), f"ops.{op}.config: {op} has no settings — remove it{moved}"))
            continue
        if not isinstance(settings, dict):
            problems.append((("ops", op, "config"), f"ops.{op}.config: must be a mapping of settings, found "
                                                    f"{settings!r}"))
            continue
        for error in validate_config(cls.to_config_schema().config_type, settings).errors or []:
            problems.append(_setting_problem(op, cls, settings, error))
    resources = config.get("resources") or {}
    if not isinstance(resources, dict):
        return problems + [(("resources",), "resources: must be a mapping, e.g. 'resources: {promotion_gate: "
                                            "{config: {min_identity: 0.9}}}'")]
    for name, section in resources.items():
        if name not in RESOURCE_CONFIGS:
            problems.append((("resources", name), f"resources.{name}: not set in persona.yaml"
                                                  f"{_did_you_mean(name, RESOURCE_CONFIGS)} — allowed: "
                                                  f"{', '.join(RESOURCE_CONFIGS)}"))
            continue
        settings = section.get("config") if isinstance(section, dict) else None
        if not isinstance(section, dict) or set(section) - {"config"} or not isinstance(settings, dict):
            problems.append((("resources", name), f"resources.{name}: must be 'config:' and a mapping of settings"))
            continue
        cls = RESOURCE_CONFIGS[name]
        for error in validate_config(cls.to_config_schema().config_type, settings).errors or []:
            problems.append(_setting_problem(name, cls, settings, error, top="resources"))
    return problems


def _setting_problem(op: str, cls, settings: dict, error, top: str = "ops") -> tuple[tuple, str]:
    from dagster._config.errors import DagsterEvaluationErrorReason as Reason

    fields = sorted(cls.model_fields)
    steps = [getattr(e, "field_name", None) if getattr(e, "field_name", None) is not None else getattr(e, "list_index")
             for e in error.stack.entries]
    if error.reason in (Reason.FIELD_NOT_DEFINED, Reason.FIELDS_NOT_DEFINED):
        names = getattr(error.error_data, "field_names", None) or [error.error_data.field_name]
        first = names[0]
        return ((top, op, "config", first), f"{top}.{op}.config.{', '.join(names)}: unknown setting"
                f"{_did_you_mean(first, fields)} — allowed: {', '.join(fields)}")
    keys = (top, op, "config", *[s for s in steps if isinstance(s, str)])
    dotted = ".".join(str(s) for s in (top, op, "config", *steps))
    if error.reason == Reason.RUNTIME_TYPE_MISMATCH:
        value = settings
        for step in steps:
            value = value[step]
        snap = error.error_data.config_type_snap
        expected = {"Float": "a number", "Int": "a whole number", "Bool": "true or false", "String": "a string"}.get(
            snap.given_name or "", "a list" if snap.kind.value == "ARRAY" else snap.key)
        fix = {"a number": "write it unquoted, e.g. 0.0005 or 5.0e-4 (YAML reads 5e-4, without a dot, as text)",
               "a whole number": "write it unquoted, without a decimal point",
               "true or false": "write true or false, unquoted",
               "a string": "quote it",
               "a list": f"write a list, e.g. [{value!r}]"}.get(expected, "see the launchpad's description of it")
        return keys, f"{dotted}: {value!r} is not {expected} — {fix}"
    return keys, f"{dotted}: {error.message}"


def _did_you_mean(word: str, allowed) -> str:
    import difflib

    close = difflib.get_close_matches(str(word), [str(a) for a in allowed], n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def _key_lines(text: str) -> dict[tuple, int]:
    """The line of each mapping key in the YAML text, by key path."""
    lines: dict[tuple, int] = {}

    def walk(node, path: tuple) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode):
                    lines[path + (key.value,)] = key.start_mark.line + 1
                    walk(value, path + (key.value,))

    try:
        walk(yaml.compose(text, Loader=yaml.SafeLoader), ())
    except yaml.YAMLError:
        pass
    return lines


def _merge(base: dict, top: dict) -> dict:
    merged = dict(base)
    for key, value in top.items():
        merged[key] = _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) \
            else value
    return merged


def op_config(run_config: dict, op: str) -> dict:
    return ((run_config.get("ops") or {}).get(op) or {}).get("config") or {}


def link_instance_config(dagster_home: str | Path) -> None:
    """Make $DAGSTER_HOME use the shipped dagster.yaml, unless it already has an instance config of its own."""
    target = Path(dagster_home, INSTANCE_FILE)
    if not target.exists() and not target.is_symlink():
        Path(dagster_home).mkdir(parents=True, exist_ok=True)
        target.symlink_to(PROJECT_ROOT / INSTANCE_FILE)
