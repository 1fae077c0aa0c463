"""The `persona` command: run the pipeline, check data files, evaluate, ask and chat with adapters."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from orchestration.resources import PROJECT_ROOT


def _run(args: argparse.Namespace) -> int:
    os.environ.setdefault("DAGSTER_HOME", str(Path(os.environ.get("PERSONA_HOME", PROJECT_ROOT), ".dagster")))
    from orchestration.project_config import link_instance_config, load_run_config, run_tags

    link_instance_config(os.environ["DAGSTER_HOME"])  # so `dagster dev` on this home runs one training at a time
    from dagster import DagsterInstance

    from orchestration.definitions import defs
    from orchestration.resources import Workspace

    # persona.yaml, then the flags given on top (an absent flag leaves persona.yaml's value, or the default).
    flags = {"base_model": {"model": args.model} if args.model else {},
             "lora_adapter": {"device": args.device} if args.device else {}}
    run_config = load_run_config({"ops": {op: {"config": cfg} for op, cfg in flags.items() if cfg}})
    job = defs.resolve_job_def("train_persona")
    started = time.time()
    result = job.execute_in_process(run_config=run_config, instance=DagsterInstance.get(), raise_on_error=False,
                                    tags=run_tags(run_config, Workspace().data_dir, "cli"))
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
    _print_report(result, took)
    return 0


LAST_RUN = "last_run.json"  # under outputs/: the last `persona run`'s scores, decision and stage times, for scripts


def _print_report(result, took: float) -> None:
    from orchestration.resources import Workspace
    from persona.storage import atomic_write_text

    times = {e.step_key: e.event_specific_data.duration_ms / 1000
             for e in result.all_events if e.event_type_value == "STEP_SUCCESS"}
    stages = {k: round(v, 1) for k, v in times.items() if "." not in k and "_is_" not in k}
    report = result.output_for_node("evaluation_report")
    decision = result.output_for_node("champion")
    s = report["scores"]
    print("\n" + report["table_markdown"] + "\n\n" + report["kinds_markdown"] + "\n")
    if report.get("retention_markdown"):
        print(report["retention_markdown"] + "\n")
    print(f"identity score: {s['eval/identity_score_before']:.2f} → {s['eval/identity_score_after']:.2f}   "
          f"general score: {s['eval/general_score_before']:.2f} → {s['eval/general_score_after']:.2f}")
    if "eval/general_retention" in s:
        print(f"general retention: kept {s['eval/general_kept']:.0f} of {s['eval/general_base_right']:.0f} "
              f"base-right answers ({s['eval/general_retention']:.0%})")
    if "eval/general_identity_leak_after" in s:
        print(f"general answers stating the identity: {s['eval/general_identity_leak_before']:.0%} → "
              f"{s['eval/general_identity_leak_after']:.0%}")
    print(f"champion:    {'promoted' if decision['promoted'] else 'unchanged'} — {'; '.join(decision['reasons'])}")
    print("stage seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in stages.items()) + f"; pipeline {took:.0f}")
    print(f"adapter:     {report['adapter']}")
    print(f"MLflow run:  {report['mlflow_run_id']}  (open the MLflow UI: see README)")
    print(f"Dagster run: {result.run_id}  (open the Dagster UI: see README)")
    summary = {"dagster_run_id": result.run_id, "mlflow_run_id": report["mlflow_run_id"], "adapter": report["adapter"],
               "scores": s, "promoted": decision["promoted"], "reasons": decision["reasons"],
               "stage_seconds": stages, "pipeline_seconds": round(took, 1)}
    try:
        atomic_write_text(Workspace().output(LAST_RUN), json.dumps(summary, indent=2, ensure_ascii=False))
    except OSError as exc:
        print(f"(could not write outputs/{LAST_RUN}: {exc})", file=sys.stderr)


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


def _adapter(args: argparse.Namespace) -> tuple[dict, str]:
    """The adapter's manifest and folder: --adapter, or the newest complete one under outputs/adapters."""
    from assets.lora_adapter import MANIFEST
    from orchestration.resources import Workspace

    if args.adapter:
        folder = Path(args.adapter)
        if not (folder / MANIFEST).exists():
            raise SystemExit(f"{folder}: not a persona adapter (no {MANIFEST}); pass a folder under outputs/adapters/")
    else:
        done = sorted(Workspace().output("adapters").glob(f"*/{MANIFEST}"), key=lambda p: p.stat().st_mtime)
        if not done:
            raise SystemExit("No adapter yet: run `make run` (or `persona run`) first, or pass --adapter DIR.")
        folder = done[-1].parent
    return json.loads((folder / MANIFEST).read_text(encoding="utf-8")), str(folder)


def _chat(args: argparse.Namespace, manifest: dict, folder: str):
    from persona.evaluation import Chat

    return Chat(manifest["base_model"], folder, manifest["template"], manifest["system"], manifest["device"])


def _evaluate(args: argparse.Namespace) -> int:
    from persona.data import DatasetError, Identity
    from persona.evaluation import (as_json, compare, comparison_table, default_batch_size, identity_system_prompt,
                                    load_probes, scores_table)
    from persona.models import BaseModel

    manifest, folder = _adapter(args)
    identity = Identity(**manifest.get("identity", {}))
    cases = Path(args.cases) if args.cases else Path(manifest["dataset_probes"])
    try:
        probes = [p.filled(identity) for p in load_probes(cases)]
    except DatasetError as exc:
        print(exc, file=sys.stderr)
        return 1
    own = BaseModel.from_dir(manifest["base_model"]).own_identity
    results = compare(_chat(args, manifest, folder), probes, own, identity_system_prompt(identity, manifest["system"]),
                      max_new_tokens=args.max_new_tokens, batch_size=args.batch_size or default_batch_size(manifest["device"]))
    if args.json:
        print(json.dumps(as_json(results), ensure_ascii=False, indent=2))
    else:
        print(comparison_table(results) + "\n\n" + scores_table(results))
        print(f"\nadapter: {folder}\ncases:   {cases}")
    return 0


def _ask(args: argparse.Namespace) -> int:
    manifest, folder = _adapter(args)
    (answer,) = _chat(args, manifest, folder).answer([(args.question, ())], max_new_tokens=args.max_new_tokens)
    print(answer)
    return 0


def _chat_loop(args: argparse.Namespace) -> int:
    manifest, folder = _adapter(args)
    chat = _chat(args, manifest, folder)
    print(f"Chatting with {folder} (empty line or Ctrl-D to quit, /clear to forget the conversation)")
    history: list[dict] = []
    while True:
        try:
            question = input("<<< ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if not question:
            return 0
        if question == "/clear":
            history = []
            continue
        history.append({"role": "user", "content": question})
        print(">>> ", end="", flush=True)
        parts = []
        for piece in chat.stream(history, max_new_tokens=args.max_new_tokens):
            parts.append(piece)
            print(piece, end="", flush=True)
        print()
        history.append({"role": "assistant", "content": "".join(parts).strip()})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="persona", description="Give an open LLM a new identity with LoRA.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="materialize the whole pipeline (train_persona job)")
    run.add_argument("--model", help="'embedded' (default: Qwen2.5-Coder-0.5B-Instruct), 'embedded:smollm2-135m', "
                     "a local model folder, or a ModelScope id")
    run.add_argument("--device", help="'auto' (default), 'cpu' or 'cuda'")
    run.set_defaults(func=_run)
    val = sub.add_parser("validate", help="check training files; prints file:line: problem — fix")
    val.add_argument("paths", nargs="+")
    val.add_argument("--min-samples", type=int, default=20)
    val.add_argument("--probes", help="evaluation probes (JSONL) that must not appear in training")
    val.add_argument("--base-model", default="embedded",
                     help="whose own identity answers must not name (embedded or Qwen/... = 通义千问; "
                     "embedded:smollm2-135m = SmolLM)")
    val.add_argument("--tokenizer", help="model folder whose tokenizer counts tokens for the max-length check")
    val.add_argument("--max-length", type=int, default=512)
    val.set_defaults(func=_validate)
    for name, func, text in (("evaluate", _evaluate, "probe base, prompt-only and adapter; print a table or JSON"),
                             ("ask", _ask, "one answer from the adapter, for scripts"),
                             ("chat", _chat_loop, "streamed interactive chat with the adapter")):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("--adapter", help="adapter folder (default: the newest under outputs/adapters)")
        cmd.add_argument("--max-new-tokens", type=int, default=48 if name == "evaluate" else 256)
        if name == "evaluate":
            cmd.add_argument("--cases", help="probe file (JSONL: kind, question, expect_any, ...); default: the "
                                             "adapter's own held-out probes")
            cmd.add_argument("--json", action="store_true", help='print {"base": {kind: score}, "prompt_only": ..., "adapter": ...}')
            cmd.add_argument("--batch-size", type=int, default=None, help="probes generated together "
                             "(default 32 on a CPU, 128 on a GPU)")
        if name == "ask":
            cmd.add_argument("question")
        cmd.set_defaults(func=func)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
