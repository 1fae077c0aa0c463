"""The whole pipeline through Dagster's own execution, as `persona run`, the dataset sensor and the retrain schedule
run it: the `train_persona` job of orchestration.definitions with its in-process executor and its real resources.

Each run is a new Python process timed from the moment it starts (its imports count), in one of two ways:

    --path cli      `persona run`'s code: job.execute_in_process in this process
    --path launch   as the sensor's and the schedule's runs go: a new process loads the code location and executes
                    the job with the Definitions' executor (`dagster job execute -m orchestration.definitions`), as
                    the daemon's run launcher does

The first run on a fresh home converts or hashes the base weights and decodes the baseline answers; later runs are
re-training runs (the data changed: one line of the training file is edited before each), which reuse the
remembered baseline answers.

    python bench/bench_pipeline.py --runs 2 [--model DIR] [--path cli|launch] [--home /tmp/persona-bench]

Writes $OUT/bench_pipeline.json (or --out): per run, the process's wall seconds and each step's seconds from
Dagster's STEP_SUCCESS events; on the launch path also the launched run process's own seconds (the outer process's
imports are the bench's, which a running daemon does not pay; they include the process's exit after the run ended)
and its output in HOME/launch-RUN_ID.log. `to_run_end_seconds`, on both paths: from the start of the process that
runs the job to Dagster's RUN_SUCCESS (or RUN_FAILURE) record, the moment the run is over for the daemon, the run
queue and the UI; the comparable figure for the two paths.
"""
from __future__ import annotations

import time

PROCESS_START = time.time()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def step_seconds(instance, run_id: str) -> dict[str, float]:
    from dagster import DagsterEventType

    records = instance.get_records_for_run(run_id, of_type=DagsterEventType.STEP_SUCCESS).records
    return {r.event_log_entry.step_key: round(r.event_log_entry.dagster_event.event_specific_data.duration_ms / 1000, 1)
            for r in records}


def run_end(instance, run_id: str) -> float | None:
    """When Dagster recorded the run's end (RUN_SUCCESS or RUN_FAILURE): the run is over for the daemon, the run queue
    and the UI from then on, whatever its process still does before it exits."""
    from dagster import DagsterEventType

    for kind in (DagsterEventType.RUN_SUCCESS, DagsterEventType.RUN_FAILURE):
        records = instance.get_records_for_run(run_id, of_type=kind).records
        if records:
            return records[-1].event_log_entry.timestamp
    return None


def run_once(args) -> dict:
    sys.path.insert(0, str(ROOT))
    from dagster import DagsterInstance

    from orchestration.definitions import defs
    from orchestration.run_config import load_run_config
    from orchestration.upstream import run_tags

    config = load_run_config({"ops": {"base_model": {"config": {"model": args.model}}}} if args.model else {})
    instance = DagsterInstance.get()
    job = defs.resolve_job_def("train_persona")
    tags = run_tags(config, Path(args.home, "data"), "bench")
    if args.path == "cli":
        started = PROCESS_START
        result = job.execute_in_process(run_config=config, instance=instance, tags=tags, raise_on_error=False)
        run_id, ok = result.run_id, result.success
    else:
        import yaml

        cfg = Path(args.home, "run_config.yaml")
        cfg.write_text(yaml.safe_dump(config))
        before = {r.run_id for r in instance.get_runs()}
        started = time.time()
        proc = subprocess.run(["dagster", "job", "execute", "-m", "orchestration.definitions", "-j", "train_persona",
                               "-c", str(cfg)], cwd=ROOT, capture_output=True, text=True)
        # The run's own process, as the daemon's run launcher starts it; this process's imports above are the
        # bench's bookkeeping (a daemon has them loaded already).
        run_process_seconds = round(time.time() - started, 1)
        new = [r for r in instance.get_runs() if r.run_id not in before]
        run_id, ok = (new[0].run_id if new else ""), proc.returncode == 0
        Path(args.home, f"launch-{run_id or 'failed'}.log").write_text(proc.stdout + proc.stderr)
        if not ok:
            print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
    ended = run_end(instance, run_id) if run_id else None
    return {"ok": ok, "path": args.path, "run_id": run_id, "wall_seconds": round(time.time() - PROCESS_START, 1),
            **({"run_process_seconds": run_process_seconds} if args.path == "launch" else {}),
            "to_run_end_seconds": round(ended - started, 1) if ended else None,
            "steps": step_seconds(instance, run_id)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--model", default=None, help="BaseModelConfig.model (default: the embedded default)")
    ap.add_argument("--path", choices=("cli", "launch"), default="cli")
    ap.add_argument("--home", default="/tmp/persona-bench", help="PERSONA_HOME and DAGSTER_HOME (kept between runs)")
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "/tmp"), "bench_pipeline.json"))
    ap.add_argument("--one-run", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one_run:
        Path(args.one_run).write_text(json.dumps(run_once(args)))
        return
    home = Path(args.home)
    retraining = (home / "data").exists()  # an earlier invocation's home: every run here re-trains
    if not retraining:
        shutil.copytree(ROOT / "data", home / "data")
    (home / "dagster").mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PERSONA_HOME": str(home), "DAGSTER_HOME": str(home / "dagster")}
    results = []
    for i in range(args.runs):
        if i or retraining:  # a re-training run: the data changed
            train = home / "data" / "self_cognition.json"
            rows = json.loads(train.read_text(encoding="utf-8"))
            text = rows[0]["output"]
            rows[0]["output"] = text[:-1] if text.endswith("。") else text + "。"  # toggled: always a change
            train.write_text(json.dumps(rows, ensure_ascii=False, indent=1), encoding="utf-8")
        out = home / f"run{i}.json"
        cmd = [sys.executable, __file__, "--one-run", str(out), "--path", args.path, "--home", str(home)]
        subprocess.run(cmd + (["--model", args.model] if args.model else []), env=env, check=True)
        results.append(json.loads(out.read_text()))
        print(json.dumps(results[-1]), flush=True)
    Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
