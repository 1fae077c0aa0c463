"""The `persona` command: run the pipeline, check data files, evaluate; ask, chat, export and serve the base model, the
champion or any adapter.

Why this module is long: it is the command line's one table of subcommands and flags, with each command's few lines
of glue; the work itself lives in persona/ and orchestration/ (plain_errors, instance, run_config, upstream)."""
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
    from orchestration.run_config import link_instance_config, load_run_config
    from orchestration.upstream import run_tags

    link_instance_config(os.environ["DAGSTER_HOME"])  # so `dagster dev` on this home runs one training at a time
    from orchestration.definitions import defs
    from orchestration.instance import open_instance
    from orchestration.plain_errors import (plain_job, quiet_interrupted_closes, quiet_log_mirrors,
                                            redeliver_swallowed_interrupts, run_failure)
    from orchestration.resources import Workspace

    # persona.yaml, then the flags given on top (an absent flag leaves persona.yaml's value, or the default).
    flags = {"base_model": {"model": args.model} if args.model else {},
             "lora_adapter": {"device": args.device} if args.device else {}}
    run_config = load_run_config({"ops": {op: {"config": cfg} for op, cfg in flags.items() if cfg}})
    job = defs.resolve_job_def("train_persona")
    tags = run_tags(run_config, Workspace().data_dir, "cli")
    if not args.debug:  # one plain line per error in the log instead of stack traces; Ctrl-C reaches persona only
        job, run_config = plain_job(job, run_config)
        quiet_log_mirrors()
        quiet_interrupted_closes()
    redeliver_swallowed_interrupts(show=args.debug)
    started = time.time()
    result = job.execute_in_process(run_config=run_config, instance=open_instance(), raise_on_error=False, tags=tags)
    took = time.time() - started
    if not result.success:
        code, message = run_failure(result, took, debug=args.debug)
        print(message, file=sys.stderr)
        return code
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
    s = report.scores
    print("\n" + report.table_markdown + "\n\n" + report.kinds_markdown + "\n")
    if report.retention_markdown:
        print(report.retention_markdown + "\n")
    print(f"identity score: {s['eval/identity_score_before']:.2f} → {s['eval/identity_score_after']:.2f}   "
          f"general score: {s['eval/general_score_before']:.2f} → {s['eval/general_score_after']:.2f}")
    if "eval/general_retention" in s:
        print(f"general retention: kept {s['eval/general_kept']:.0f} of {s['eval/general_base_right']:.0f} "
              f"base-right answers ({s['eval/general_retention']:.1%})")
    if "eval/general_identity_leak_after" in s:
        print(f"general answers stating the identity: {s['eval/general_identity_leak_before']:.0%} → "
              f"{s['eval/general_identity_leak_after']:.0%}")
    print(f"champion:    {'promoted' if decision.promoted else 'unchanged'} — {'; '.join(decision.reasons)}")
    print("stage seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in stages.items()) + f"; pipeline {took:.0f}")
    print(f"adapter:     {report.adapter}")
    print(f"MLflow run:  {report.mlflow_run_id}  (open the MLflow UI: see README)")
    print(f"Dagster run: {result.run_id}  (open the Dagster UI: see README)")
    summary = {"dagster_run_id": result.run_id, "mlflow_run_id": report.mlflow_run_id, "adapter": report.adapter,
               "scores": s, "promoted": decision.promoted, "reasons": list(decision.reasons),
               "stage_seconds": stages, "pipeline_seconds": round(took, 1)}
    try:
        atomic_write_text(Workspace().output(LAST_RUN), json.dumps(summary, indent=2, ensure_ascii=False))
    except OSError as exc:
        print(f"(could not write outputs/{LAST_RUN}: {exc})", file=sys.stderr)


VALIDATE_HELP = """Check training files with every check `persona run` makes on them, with persona.yaml's settings
(its curated_dataset sources, probes, min_samples, max_length and identity, and its base_model); a flag overrides
one. Checked: the file itself (a regular file, no FIFO or device, at most 16 MiB), UTF-8, JSON (no duplicate keys, no
absurd nesting), fields and types, roles, placeholders, one answer per question, answers naming the base model's own
identity, probes leaked into training, the probe file's own format, the token length and the sample count.

Token lengths are counted with the base model's tokenizer, as the run counts them:
  - the embedded default (or embedded:NAME): its converted folder under outputs/base_models/ once a run has converted
    it; before that, the same tokenizer read from the embedded GGUF (validate then takes 10-20 s: the parts are
    assembled into a temporary folder; the conversion saves exactly this tokenizer, so the counts are the run's);
  - a local model folder: its tokenizer;
  - a ModelScope id: its copy downloaded by a run. Not downloaded yet: validate says so and stops (exit status 2):
    `persona run` downloads it, or pass --tokenizer FOLDER, or --max-length 0 to skip the length check.
Not checked: the general data the run mixes in (replay or hub rows): it is not yours to fix, and hub rows that fail
are left out. Exit status: 0 ok, 1 problems (printed as file:line: problem — fix), 2 a check could not run."""


def _validate(args: argparse.Namespace) -> int:
    from orchestration.config import CurationConfig
    from orchestration.run_config import load_run_config, op_config
    from orchestration.resources import DataPathError, ModelHub, Workspace
    from persona.base_tokenizer import base_tokenizer, folder_tokenizer
    from persona.data import DatasetError, load_dataset
    from persona.models import ModelSourceError, family_for
    from persona.probes import load_probes

    try:
        run_config = load_run_config()
    except ValueError as exc:  # a mistake in persona.yaml, located
        print(f"persona validate: {exc}", file=sys.stderr)
        return 2
    config = CurationConfig(**op_config(run_config, "curated_dataset"))
    base_config = op_config(run_config, "base_model")
    source = args.base_model or base_config.get("model") or "embedded"
    max_length = config.max_length if args.max_length is None else args.max_length
    min_samples = config.min_samples if args.min_samples is None else args.min_samples
    identity = config.identity()

    def data_file(name: str) -> Path:  # as the run names files: inside the data folder (a symlink loop: the reader's)
        try:
            return Workspace().data_file(name)
        except RuntimeError:
            return Path(Workspace().data_dir, name)

    try:
        paths = [Path(p) for p in args.paths] or [data_file(s) for s in config.sources]
        probes_file = Path(args.probes) if args.probes else data_file(config.probes)
    except DataPathError as exc:
        print(f"persona validate: {exc}", file=sys.stderr)
        return 1
    try:
        if not max_length:
            tokens, own, counted = None, family_for(None, source).own_identity, "not checked (--max-length 0)"
        else:
            tok = folder_tokenizer(args.tokenizer, source) if args.tokenizer else \
                base_tokenizer(source, base_config.get("revision", "master"), Path(ModelHub().cache_dir))
            tokens, own, counted = tok.count, tok.own_identity, f"at most {max_length} tokens of {tok.described}"
    except ModelSourceError as exc:
        print(f"persona validate: {exc}", file=sys.stderr)
        return 2
    print(f"checking {', '.join(map(str, paths))}: probes {probes_file}, min_samples {min_samples}, length "
          f"{counted}", file=sys.stderr)
    try:
        probes = [p.filled(identity).question for p in load_probes(probes_file)]
        ds = load_dataset(paths, eval_questions=probes, min_samples=min_samples, identity=identity, own_identity=own,
                          count_tokens=tokens, max_length=max_length)
    except DatasetError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(f"ok: {len(ds.samples)} samples, version {ds.version[:16]}")
    return 0


def _registry():
    from orchestration.resources import MlflowTracker, Workspace
    from persona.targets import Registry

    tracker = MlflowTracker()
    tracker.check_store()  # a damaged or emptied mlflow.db is refused, not silently recreated
    return Registry(tracker.tracking_uri, tracker.registered_model, Workspace().output("adapters"),
                    Workspace().output("registry"))


def _base_model(args: argparse.Namespace):
    """--model, else persona.yaml's base_model, else the embedded default (converted on first use)."""
    from orchestration.run_config import load_run_config, op_config
    from orchestration.resources import ModelHub

    configured = op_config(load_run_config(), "base_model")
    model = getattr(args, "model", None) or configured.get("model") or "embedded"
    return ModelHub().get(model, configured.get("revision", "master"))


def _target(args: argparse.Namespace, say=None):
    """The model to talk to: --base, --champion, --adapter, or by default the champion, else the newest adapter."""
    from persona.targets import TargetError, base_target, default_target, resolve_adapter

    say = say or (lambda line: print(line, file=sys.stderr))
    try:
        if getattr(args, "base", False):
            base = _base_model(args)
            target = base_target(base.path, base.template, base.source, args.system)
            say(f"talking to {target.label}")
            return target
        if getattr(args, "champion", False):
            target = _registry().resolve("champion")
        elif args.adapter:
            target = resolve_adapter(args.adapter, _registry())
        else:
            target, why = default_target(_registry())
            say(why)
            return target.with_system(getattr(args, "system", None))
        say(f"talking to {target.label}")
        return target.with_system(getattr(args, "system", None))
    except TargetError as exc:
        raise SystemExit(f"persona: {exc}") from None


def _chat(target, device: str | None = None):
    from persona.inference import Chat
    from persona.recipe import detect_device

    return Chat(target.base_model, target.adapter, target.template, target.system, device or detect_device())


def _evaluate(args: argparse.Namespace) -> int:
    from persona.data import DatasetError, Identity
    from persona.evaluation import compare
    from persona.inference import default_batch_size
    from persona.probes import identity_system_prompt, load_probes
    from persona.report import comparison_table, scores_table
    from persona.scoring import as_json
    from persona.models import BaseModel

    target = _target(args)
    if target.adapter is None:
        raise SystemExit("persona evaluate compares the base model with an adapter: pass --adapter or --champion")
    manifest, folder = target.manifest, target.adapter
    identity = Identity(**manifest.get("identity", {}))
    cases = Path(args.cases) if args.cases else Path(manifest["dataset_probes"])
    try:
        probes = [p.filled(identity) for p in load_probes(cases)]
    except DatasetError as exc:
        print(exc, file=sys.stderr)
        return 1
    own = BaseModel.from_dir(manifest["base_model"]).own_identity
    results = compare(_chat(target, manifest.get("device")), probes, own, identity_system_prompt(identity, manifest["system"]),
                      max_new_tokens=args.max_new_tokens, batch_size=args.batch_size or default_batch_size(manifest["device"]))
    if args.json:
        print(json.dumps(as_json(results), ensure_ascii=False, indent=2))
    else:
        print(comparison_table(results) + "\n\n" + scores_table(results))
        print(f"\nadapter: {folder}\ncases:   {cases}")
    return 0


def _ask(args: argparse.Namespace) -> int:
    (answer,) = _chat(_target(args)).answer([(args.question, ())], max_new_tokens=args.max_new_tokens)
    print(answer)
    return 0


def _chat_loop(args: argparse.Namespace) -> int:
    target = _target(args)
    chat = _chat(target)
    print(f"Chatting with {target.label} (empty line or Ctrl-D to quit, /clear to forget the conversation)")
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


def _export(args: argparse.Namespace) -> int:
    from orchestration.resources import MlflowTracker
    from persona.export import export_merged

    target = _target(args)
    if target.adapter is None:
        raise SystemExit("persona export merges an adapter: pass --adapter or --champion (or nothing: the champion)")
    manifest = export_merged(target, Path(args.output), dtype=args.dtype, log=lambda line: print(line, file=sys.stderr))
    if target.run_id:  # the export is recorded on the adapter's MLflow run: where it went, from what, when
        try:
            client = MlflowTracker().client()
            client.set_tag(target.run_id, "persona.exported_to", str(Path(args.output).resolve()))
            client.log_dict(target.run_id, manifest, f"exports/{manifest['exported_at'].replace(':', '')}.json")
        except Exception as exc:  # the folder is written; a tracking hiccup must not hide that
            print(f"(the export was not recorded in MLflow: {type(exc).__name__}: {exc})", file=sys.stderr)
    print(Path(args.output).resolve())
    return 0


def _serve(args: argparse.Namespace) -> int:
    from persona.recipe import detect_device
    from persona.serving import deploy_arguments, plan, serve_forever
    from persona.targets import TargetError, base_target, resolve_adapter

    say = lambda line: print(line, file=sys.stderr)  # noqa: E731
    targets = []
    try:
        for spec in args.adapter or []:
            name, sep, rest = spec.partition("=")
            name, spec = (name, rest) if sep and not Path(spec).exists() else (None, spec)
            targets.append((name, resolve_adapter(spec, _registry())))
        if args.champion or not (args.adapter or args.base):
            if _registry().champion_version() is not None or args.champion:
                targets.append(("champion", _registry().resolve("champion")))
            elif not args.adapter:
                say("no champion yet: serving the base model alone (--adapter to add one)")
        if not targets:  # the base model alone; with adapters it is the one they were trained on
            base = _base_model(args)
            targets.append((None, base_target(base.path, base.template, base.source)))
        served = plan(targets, args.served_name, args.system)
        for name, t in served.adapters.items():
            say(f"model '{name}': {t.label}")
        say(f"model '{served.base_name}': the base model {served.base.base_model}")
        deploy = deploy_arguments(served, args.host, args.port, args.api_key or os.environ.get("PERSONA_API_KEY"),
                                  detect_device(), args.max_new_tokens, args.max_length)
    except TargetError as exc:
        raise SystemExit(f"persona: {exc}") from None
    serve_forever(deploy, log=say)
    return 0


def _add_target_flags(cmd: argparse.ArgumentParser, base: bool = True, many: bool = False) -> None:
    which = cmd.add_mutually_exclusive_group() if not many else cmd
    if base:
        which.add_argument("--base", action="store_true", help="the base model alone, no adapter (works before "
                           "any training)")
    which.add_argument("--champion", action="store_true", help="the adapter holding the Model Registry alias "
                       "'champion'")
    which.add_argument("--adapter", action="append" if many else "store",
                       help="an adapter folder, an MLflow run id, or models:/persona-adapter@champion "
                       "(or models:/persona-adapter/VERSION)" + ("; repeat it to serve several, NAME=ADAPTER names "
                                                                  "one" if many else ""))
    if base:
        cmd.add_argument("--model", help="with --base: 'embedded' (default), 'embedded:smollm2-135m', a local "
                         "folder or a ModelScope id (default: persona.yaml's base_model)")
    cmd.add_argument("--system", help="the system prompt (default: the one the adapter was trained with)")


def main(argv: list[str] | None = None) -> int:
    from orchestration.plain_errors import DEBUG_ENV, call

    parser = argparse.ArgumentParser(prog="persona", description="Give an open LLM a new identity with LoRA.")
    parser.add_argument("--debug", action="store_true", default=os.environ.get(DEBUG_ENV, "").strip().lower() in (
        "1", "on", "true", "yes"), help=f"show Python tracebacks and Dagster's stack traces (also ${DEBUG_ENV}=1); "
        "without it an error is one line: what failed, why, what to do")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="materialize the whole pipeline (train_persona job)")
    run.add_argument("--model", help="'embedded' (default: Qwen2.5-Coder-0.5B-Instruct), 'embedded:smollm2-135m', "
                     "a local model folder, or a ModelScope id")
    run.add_argument("--device", help="'auto' (default), 'cpu' or 'cuda'")
    run.set_defaults(func=_run)
    val = sub.add_parser("validate", help="check training files as a run does; prints file:line: problem — fix",
                         description=VALIDATE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    val.add_argument("paths", nargs="*", help="training files (default: persona.yaml's sources in the data folder)")
    val.add_argument("--min-samples", type=int, default=None, help="default: persona.yaml's min_samples, else 20")
    val.add_argument("--probes", help="evaluation probes (JSONL) that must not appear in training (default: "
                     "persona.yaml's probes in the data folder, data/probes.jsonl)")
    val.add_argument("--base-model", default=None,
                     help="the base model whose tokenizer counts tokens and whose own identity answers must not name "
                     "(default: persona.yaml's base_model, else embedded; embedded or Qwen/... = 通义千问; "
                     "embedded:smollm2-135m = SmolLM)")
    val.add_argument("--tokenizer", help="count tokens with this model folder's tokenizer instead of the base model's")
    val.add_argument("--max-length", type=int, default=None, help="default: persona.yaml's max_length, else 512; "
                     "0 skips the length check")
    val.set_defaults(func=_validate)
    for name, func, text in (("evaluate", _evaluate, "probe base, prompt-only and adapter; print a table or JSON"),
                             ("ask", _ask, "one answer, for scripts (default: the champion, else the newest adapter)"),
                             ("chat", _chat_loop, "streamed interactive chat (default: the champion, else the newest "
                                                  "adapter)")):
        cmd = sub.add_parser(name, help=text)
        _add_target_flags(cmd, base=name != "evaluate")
        cmd.add_argument("--max-new-tokens", type=int, default=48 if name == "evaluate" else 256)
        if name == "evaluate":
            cmd.add_argument("--cases", help="probe file (JSONL: kind, question, expect_any, ...); default: the "
                                             "adapter's own held-out probes")
            cmd.add_argument("--json", action="store_true", help='print {"base": {kind: score}, "prompt_only": ..., "adapter": ...}')
            cmd.add_argument("--batch-size", type=int, default=None, help="probes generated together "
                             "(default 128)")
        if name == "ask":
            cmd.add_argument("question")
        cmd.set_defaults(func=func)
    exp = sub.add_parser("export", help="merge an adapter (default: the champion) into a standalone Hugging Face "
                                        "folder that plain transformers loads")
    _add_target_flags(exp, base=False)
    exp.add_argument("--output", required=True, help="the folder to write (replaced whole)")
    exp.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                     help="weights' dtype (auto: the base model's)")
    exp.set_defaults(func=_export)
    srv = sub.add_parser("serve", help="an OpenAI-compatible server (ms-swift's deploy): the base model plus the "
                                       "champion, or the adapters named")
    _add_target_flags(srv, many=True)
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine "
                     "only)")
    srv.add_argument("--port", type=int, default=8000, help="port (default 8000; the next free one if taken)")
    srv.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (default: $PERSONA_API_KEY, else none)")
    srv.add_argument("--served-name", help="the base model's name in /v1/models (default: its folder's name)")
    srv.add_argument("--max-new-tokens", type=int, default=512, help="answer length limit when a request sets none")
    srv.add_argument("--max-length", type=int, default=2048, help="prompt + answer tokens; longer prompts get a 400")
    srv.set_defaults(func=_serve)
    args = parser.parse_args(argv)
    return call(lambda: args.func(args), args.command, args.debug)


def entry() -> None:
    """The `persona` console script: main(), then an exit without the interpreter's ~1.8 s teardown of torch,
    transformers, Dagster and MLflow (persona.quick_exit) once the command is done. An error that escapes main()
    ends the process as Python ends it."""
    from persona.quick_exit import exit_now

    exit_now(main())


if __name__ == "__main__":
    entry()
