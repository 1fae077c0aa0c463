"""Resumable training on a GPU: what the checkpoint clock costs on the seed workload, and a real kill and resume.

The seed workload of bench/bench_train.py (50 samples, 10 epochs, 16 samples a step: 40 steps) on a model with
Qwen2.5-7B's shape, the fast recipe, through persona.training.train_lora as the lora_adapter asset calls it:
1. no checkpoint_root (no mid-run save);
2. checkpoint_root with PERSONA_CHECKPOINT_MIN_SECONDS=0: as many checkpoints as the 5 % share allows (the worst
   case of the clock; the default 60 s gap would save none in a run this short);
3. the same, SIGKILLed (the training child) at step --kill-at;
4. the same call again: it resumes from 3's last checkpoint.
Writes $OUT/bench_gpu_resume.json.

    python bench/bench_gpu_resume.py [--kill-at 24]
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from qwen7b_shape import ROOT, ensure_model, with_repo_on_path  # noqa: E402

with_repo_on_path()
sys.path.insert(0, str(ROOT))
from persona.recipe import FAST_GPU  # noqa: E402
from persona.training import TrainingInterrupted, train_lora  # noqa: E402

DATA = ROOT / "bench" / "self_cognition50_bench.json"


def children() -> list[int]:
    me, found = os.getpid(), []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            if ppid == me and b"persona.train_worker" in (stat.parent / "cmdline").read_bytes():
                found.append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            pass
    return found


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kill-at", type=int, default=24)
    args = ap.parse_args()
    out = Path(os.environ.get("OUT", "."))
    base = ensure_model()
    recipe = FAST_GPU.with_overrides(logging_steps=1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        def run(name: str, root: Path | None, kill_at: int | None = None) -> dict:
            lines, steps = [], []

            def progress(p: dict) -> None:
                step = int(p["global_step/max_steps"].split("/")[0])
                steps.append(step)
                if kill_at is not None and step == kill_at:
                    for pid in children():
                        os.kill(pid, signal.SIGKILL)

            started = time.time()
            row = {"arm": name}
            try:
                res = train_lora(base, str(DATA), recipe, Path(tmp, f"adapter-{name}"), "cuda", on_progress=progress,
                                 on_output=lines.append, checkpoint_root=root, owner=name)
                losses = [h["loss"] for h in res.log_history if "loss" in h]
                row.update(train_runtime_s=round(res.train_seconds, 2), global_step=res.global_step,
                           final_loss=losses[-1] if losses else None, resumed_from_step=res.resumed_from_step,
                           resumed_from=res.resumed_from, peak_gib=round(res.peak_memory_gib, 2))
            except TrainingInterrupted as exc:
                row["interrupted"] = str(exc).splitlines()[0]
            row.update(call_s=round(time.time() - started, 1), first_step_seen=min(steps, default=None),
                       last_step_seen=max(steps, default=None),
                       saves=[line for line in lines if "[persona] checkpoint at" in line],
                       resume_lines=[line for line in lines if "resuming from" in line])
            print(json.dumps(row), flush=True)
            rows.append(row)
            return row

        run("no checkpoints", None)
        os.environ["PERSONA_CHECKPOINT_MIN_SECONDS"] = "0"
        run("checkpoints (clock, no least gap)", Path(tmp, "ckpt-a"))
        run("killed", Path(tmp, "ckpt-b"), kill_at=args.kill_at)
        run("resumed", Path(tmp, "ckpt-b"))
        run("no checkpoints again", None)
    (out / "bench_gpu_resume.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
