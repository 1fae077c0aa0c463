"""A/B: the training child ending at once (persona.quick_exit.exit_now) against Python's normal exit.

Each run is one persona.training.train_lora call, the call the lora_adapter asset makes through the trainer
resource, on the embedded default (or --model) with the CPU recipe the product picks for it and the 50 identity rows
of bench/self_cognition50_bench.json, stopped after --steps steps (PERSONA_STOP_AFTER_STEPS). Arms alternate:

- exit_now: the product's child, `python -m persona.train_worker JOB`;
- teardown: the same worker's main() run by `python -c`, then the interpreter's normal exit (the code before).

    python bench/bench_worker_exit.py --rounds 3

Prints, per run, the call's wall seconds and the seconds from the child's last line ("ms-swift finished") to the
call's return; writes them to --out (default $OUT/bench_worker_exit.json, else bench_worker_exit.json here).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import persona.training as training  # noqa: E402
from persona.models import from_local_dir  # noqa: E402
from persona.recipe import default_recipe  # noqa: E402
from persona.step_clock import STOP_ENV  # noqa: E402

DATA = ROOT / "bench" / "self_cognition50_bench.json"
TEARDOWN = "import sys; from persona.train_worker import main; main(sys.argv[1])"


def embedded_model() -> Path:
    found = sorted((ROOT / "outputs" / "base_models").glob("qwen2.5-coder-0.5b-*"))
    if not found:
        sys.exit("no converted embedded model under outputs/base_models: run `make run` once, or pass --model")
    return found[-1]


def one_run(arm: str, base, recipe, work: Path) -> dict:
    product = training.launch_command

    def teardown(job_file, world_size=1, python=None):
        return [python or sys.executable, "-c", TEARDOWN, str(job_file)]

    training.launch_command = product if arm == "exit_now" else teardown
    finished = []
    try:
        started = time.time()
        result = training.train_lora(base, DATA, recipe, work / f"adapter-{arm}-{time.time_ns()}", "cpu",
                                     on_output=lambda line: finished.append(time.time())
                                     if "ms-swift finished" in line else None)
        ended = time.time()
    finally:
        training.launch_command = product
    return {"arm": arm, "wall_s": round(ended - started, 2), "after_finish_s": round(ended - finished[-1], 2),
            "steps": result.global_step}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=None, help="a model folder (default: the embedded default)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")) / "bench_worker_exit.json")
    args = ap.parse_args()
    os.environ[STOP_ENV] = str(args.steps)
    base = from_local_dir(str(args.model or embedded_model()))
    recipe = default_recipe("cpu", parameters=base.parameters)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-exit-") as work:
        for i in range(args.rounds):
            for arm in (("exit_now", "teardown") if i % 2 == 0 else ("teardown", "exit_now")):
                rows.append(one_run(arm, base, recipe, Path(work)))
                print(json.dumps(rows[-1]), flush=True)
    summary = {arm: {k: statistics.mean(r[k] for r in rows if r["arm"] == arm) for k in ("wall_s", "after_finish_s")}
               for arm in ("exit_now", "teardown")}
    print(json.dumps(summary))
    args.out.write_text(json.dumps({"runs": rows, "mean": summary, "model": str(args.model or embedded_model()),
                                    "steps": args.steps}, indent=1))


if __name__ == "__main__":
    main()
