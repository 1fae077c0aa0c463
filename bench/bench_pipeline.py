"""The whole pipeline on one GPU for the 7B shape, stage by stage, with the functions the Dagster assets call.

Each run is a new Python process, as every Dagster run is, timed from the moment it starts (its imports count):

    base_model       starts the trainer standby (persona.standby: a training child that imports torch and ms-swift
                     ahead of time; the GPU is detected without importing torch, as TrainerStandby.warm does), then
                     persona.models.from_local_dir (reads config, counts parameters, hashes the weights)
    curated_dataset  persona.evaluation.load_probes + persona.data.load_dataset, with every sample counted by the
                     base model's tokenizer against max_length as the asset does -> train.jsonl
    lora_adapter     persona.recipe.detect_device (imports torch), then persona.training.train_lora with
                     default_recipe('cuda') (the fast recipe), claiming the
                     standby and starting the next one. Meanwhile, as the asset does with EvaluationConfig's
                     while_training 'auto': persona.evaluation.EarlyEvaluation loads the base model in this process
                     and decodes the base and prompt-only answers, if training and decoding fit together
    evaluation       takes the early evaluation's model and puts the adapter on it (or loads base + adapter), then
                     EvaluationSetup.compare: every probe answered by the three contenders (base, identity in the
                     system prompt, base + adapter), 40 new tokens, batch 128, remembered baseline answers reused

`--runs N` starts N such processes one after the other. The first run on a fresh machine hashes the weights and
decodes the baseline answers; later runs are re-training runs (e.g. the dataset sensor's): digests, baseline
answers and the standby are waiting. `--fresh-answers` gives every run an empty answer cache, so each decodes the
baseline answers as a first run does. The training call's output is kept with the seconds at which each line came
(train_timeline in the JSON).

Dagster and MLflow are left out (their bookkeeping is milliseconds; they are not installed on the GPU machine).
With random weights no answer ever stops early, so every probe runs to max_new_tokens: the slowest case.

    python bench/bench_pipeline.py [--model-dir /tmp/q7] [--runs 2] [--no-standby] [--no-early] [--fresh-answers]
"""
from __future__ import annotations

import time

PROCESS_START = time.time()  # a run's clock starts before its imports, as a Dagster run's process does

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from qwen7b_shape import DEFAULT_DIR, ROOT, ensure_model, versions, with_repo_on_path  # noqa: E402


def run_once(args) -> dict:
    """One pass of the graph's work in this process; returns seconds per stage and what the report needs."""
    from persona.data import Identity, load_dataset
    from persona.evaluation import EarlyEvaluation, EvaluationSetup, load_probes, token_counter
    from persona.models import from_local_dir
    from persona.recipe import default_recipe, detect_device, detect_device_early
    from persona.standby import Standby
    from persona.training import child_env, train_lora

    stages: dict[str, float] = {"process_start_and_imports": time.time() - PROCESS_START}
    idle = None if args.no_standby else args.standby_idle  # TrainerStandby's decision, made here by hand

    t = time.time()
    if idle:
        device = detect_device_early()  # as TrainerStandby.warm() does, before anything imports torch
        Standby(device, child_env(device), idle).warm()
    base = from_local_dir(args.model_dir)
    stages["base_model"] = time.time() - t

    work = Path(tempfile.mkdtemp(prefix="persona-pipeline-"))
    t = time.time()
    identity = Identity()
    probes = [p.filled(identity) for p in load_probes(args.probes)]
    dataset = load_dataset([Path(args.data)], [p.question for p in probes], min_samples=20, identity=identity,
                           own_identity=base.own_identity, count_tokens=token_counter(base.path, base.template),
                           max_length=512)  # CurationConfig.max_length's default
    train_path = work / "train.jsonl"
    dataset.write_jsonl(train_path)
    probes_path = work / "probes.jsonl"
    probes_path.write_text("".join(json.dumps(p.as_row(), ensure_ascii=False) + "\n" for p in probes), encoding="utf-8")
    stages["curated_dataset"] = time.time() - t

    t = time.time()
    device = detect_device()  # as lora_adapter does with device 'auto': the first import of torch in this process
    assert device == "cuda", "this benchmark needs a GPU"
    recipe = default_recipe(device)
    setup = EvaluationSetup(base.path, base.template, recipe.system, device, str(probes_path), identity,
                            tuple(base.own_identity), args.answer_cache, base.weights_sha256,
                            max_new_tokens=args.max_new_tokens, batch_size=args.eval_batch_size)
    started: dict[str, float] = {}

    def meanwhile(training_bytes):  # what lora_adapter does with while_training 'auto' on a GPU
        started["training_estimate_gib"] = (training_bytes or 0) / 2**30
        timeline.append((round(time.time() - t, 2), "[bench] job ready; handing it to the standby"))
        if not args.no_early:
            EarlyEvaluation.start(setup, training_bytes)

    timeline: list[tuple[float, str]] = []  # the training child's output, seconds since the call began
    result = train_lora(base, train_path, recipe, work / "adapter", device,
                        on_output=lambda line: timeline.append((round(time.time() - t, 2), line[:200])),
                        standby_idle_seconds=idle, meanwhile=meanwhile)
    stages["lora_adapter"] = time.time() - t

    t = time.time()
    early = EarlyEvaluation.take(setup)
    chat = early.chat() if early else None
    if chat is None:
        chat = setup.load(result.adapter_dir)
    else:
        chat.attach_adapter(result.adapter_dir)
    stages["evaluation_load"] = time.time() - t
    t = time.time()
    results = setup.compare(chat, log=lambda line: print(f"[evaluation] {line}", flush=True))
    stages["evaluation_answers"] = time.time() - t
    stages["total"] = time.time() - PROCESS_START

    import torch

    decoding = setup.decoding_bytes()
    return {"stages_s": stages, "train": result.summary(), "standby": result.standby, "samples": len(dataset.samples),
            "probes": len(probes), "eval_batch_size": setup.batch, "identity_adapter": results["adapter"].identity,
            "early_evaluation": None if early is None else {
                "outcome": early.outcome, "seconds": early.seconds, "peak_reserved_gib": early.peak_gib},
            "training_estimate_gib": started.get("training_estimate_gib"),
            "decoding_estimate_gib": decoding / 2**30 if decoding else None,
            "peak_reserved_gib_in_this_process": torch.cuda.max_memory_reserved() / 2**30,
            "train_timeline": timeline}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", default=DEFAULT_DIR)
    ap.add_argument("--data", default=str(ROOT / "data" / "self_cognition.json"))
    ap.add_argument("--probes", default=str(ROOT / "data" / "probes.jsonl"))
    ap.add_argument("--eval-batch-size", type=int, default=None, help="default: the pipeline's (128 on a GPU)")
    ap.add_argument("--max-new-tokens", type=int, default=40, help="default: the pipeline's "
                    "(EvaluationConfig.max_new_tokens)")
    ap.add_argument("--runs", type=int, default=2, help="runs, each a new process: the first after the download, "
                    "then re-training runs")
    ap.add_argument("--answer-cache", default="/tmp/persona-bench-answers",
                    help="where the base and prompt-only answers are remembered between runs, as the pipeline does")
    ap.add_argument("--fresh-answers", action="store_true", help="empty the answer cache before every run, so each "
                    "decodes the baseline answers as a first run does")
    ap.add_argument("--no-early", action="store_true", help="no early evaluation: everything is decoded after "
                    "training (while_training: off)")
    ap.add_argument("--no-standby", action="store_true", help="no trainer standby: a fresh child trains every run")
    ap.add_argument("--standby-idle", type=float, default=300.0, help="seconds a standby waits for its job")
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "/tmp"), "bench_pipeline.json"))
    ap.add_argument("--one-run", default=None, help=argparse.SUPPRESS)  # (internal: run once, write JSON here)
    args = ap.parse_args()

    if args.one_run:
        Path(args.one_run).write_text(json.dumps(run_once(args), default=str))
        return

    with_repo_on_path()
    ensure_model(args.model_dir)  # building the random weights stands in for a download: not timed
    runs = []
    for i in range(args.runs):
        if args.fresh_answers:
            shutil.rmtree(args.answer_cache, ignore_errors=True)
        out = Path(tempfile.mkdtemp(prefix="persona-bench-run-"), "run.json")
        cmd = [sys.executable, __file__, *sys.argv[1:], "--one-run", str(out)]
        subprocess.run(cmd, check=True, env=os.environ)
        runs.append(json.loads(out.read_text()))
        r = runs[-1]
        print(f"\n| stage (run {i + 1}, {'standby' if r['standby'] else 'fresh child'}) | seconds |\n|---|---|")
        for k, v in r["stages_s"].items():
            print(f"| {k} | {v:.1f} |", flush=True)
        print(f"early evaluation: {r['early_evaluation']}; estimates: training {r['training_estimate_gib']:.2f} GiB, "
              f"decoding {r['decoding_estimate_gib']:.2f} GiB; this process's peak {r['peak_reserved_gib_in_this_process']:.2f} GiB")
        print("training call, stage by stage (s since the call began):")
        for at, line in r["train_timeline"]:
            if line.startswith("[persona]") or "train_runtime" in line:
                print(f"  {at:6.1f}  {line}")
    result = {"date": time.strftime("%Y-%m-%d"), "versions": versions(), "runs": runs,
              "max_new_tokens": args.max_new_tokens, "argv": sys.argv[1:]}
    Path(args.out).write_text(json.dumps(result, indent=1, default=str))
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=1, default=str))


if __name__ == "__main__":
    main()
