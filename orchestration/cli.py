"""The `persona` command: run the pipeline, check data files."""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from orchestration.resources import PROJECT_ROOT


def _run(args: argparse.Namespace) -> int:
    os.environ.setdefault("DAGSTER_HOME", str(Path(os.environ.get("PERSONA_HOME", PROJECT_ROOT), ".dagster")))
    Path(os.environ["DAGSTER_HOME"]).mkdir(parents=True, exist_ok=True)
    from dagster import DagsterInstance

    from orchestration.definitions import defs

    run_config = {"ops": {
        "base_model": {"config": {"model": args.model}},
        "lora_adapter": {"config": {"device": args.device}},
    }}
    job = defs.resolve_job_def("train_persona")
    started = time.time()
    result = job.execute_in_process(run_config=run_config, instance=DagsterInstance.get(), raise_on_error=False)
    took = time.time() - started
    if not result.success:
        for event in result.all_events:
            if event.is_step_failure:
                err = event.step_failure_data.error
                user = event.step_failure_data.user_failure_data
                print(f"\n✗ {event.step_key} failed:\n{(user.description if user and user.description else err.message)}",
                      file=sys.stderr)
        print(f"\nThe run stopped after {took:.0f} s; earlier datasets, adapters and MLflow runs are untouched.",
              file=sys.stderr)
        return 1
    times = {}
    for event in result.all_events:
        if event.event_type_value == "STEP_SUCCESS":
            times[event.step_key] = event.event_specific_data.duration_ms / 1000
    report = result.output_for_node("evaluation_report")
    s = report["scores"]
    print("\n" + report["table_markdown"] + "\n")
    print(f"identity score: {s['eval/identity_score_before']:.2f} → {s['eval/identity_score_after']:.2f}   "
          f"general score: {s['eval/general_score_before']:.2f} → {s['eval/general_score_after']:.2f}")
    print("stage seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()) + f"; pipeline {took:.0f}")
    print(f"adapter:     {report['adapter']}")
    print(f"MLflow run:  {report['mlflow_run_id']}  (make ui, then open http://127.0.0.1:5000)")
    print(f"Dagster run: {result.run_id}  (make ui, then open http://127.0.0.1:3000)")
    return 0


def _validate(args: argparse.Namespace) -> int:
    from persona.data import DatasetError, load_dataset
    from persona.evaluation import load_probes, token_counter
    from persona.models import family_for

    family = family_for(None, args.base_model)
    try:
        probes = [p.question for p in load_probes(args.probes)] if args.probes else []
        ds = load_dataset([Path(p) for p in args.paths], eval_questions=probes, min_samples=args.min_samples,
                          own_identity=family.own_identity, max_length=args.max_length,
                          count_tokens=token_counter(args.tokenizer, family.template) if args.tokenizer else None)
    except DatasetError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(f"ok: {len(ds.samples)} samples, version {ds.version[:16]}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="persona", description="Give an open LLM a new identity with LoRA.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="materialize the whole pipeline (train_persona job)")
    run.add_argument("--model", default="embedded", help="'embedded', a local model folder, or a ModelScope id")
    run.add_argument("--device", default="auto", help="'auto', 'cpu' or 'cuda'")
    run.set_defaults(func=_run)
    val = sub.add_parser("validate", help="check training files; prints file:line: problem — fix")
    val.add_argument("paths", nargs="+")
    val.add_argument("--min-samples", type=int, default=20)
    val.add_argument("--probes", help="evaluation probes (JSONL) that must not appear in training")
    val.add_argument("--base-model", default="embedded",
                     help="whose own identity answers must not name (embedded = SmolLM, Qwen/... = 通义千问)")
    val.add_argument("--tokenizer", help="model folder whose tokenizer counts tokens for the max-length check")
    val.add_argument("--max-length", type=int, default=512)
    val.set_defaults(func=_validate)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
