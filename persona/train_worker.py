"""Child-process entry point: `python -m persona.train_worker job.json` runs ms-swift's sft_main once.

Under torchrun (one process per GPU) every rank trains; rank 0 alone writes the result file. On a GPU the job's
pre-flight estimate is checked against this device's free memory before ms-swift loads anything.
"""
from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path

from persona.training import PREFLIGHT_FILE, RESULT_FILE


def peak_memory_gib(device: str) -> float:
    if device != "cpu":
        import torch

        return torch.cuda.max_memory_reserved() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def max_over_ranks(value: float) -> float:
    """The largest value across ranks when a process group is up (every rank must call this)."""
    try:
        import torch
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return value
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
        t = torch.tensor([value], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t.item())
    except Exception:  # a broken group must not lose a finished training
        return value


def trim_trainer_overhead() -> list[str]:
    """Per-step CPU work in transformers' Trainer that LoRA on a GPU does not need.

    A 7B LoRA step with 16 short samples is bound by the CPU issuing ~8,000 kernels, so Python work per step
    shows in the wall time. Every micro-step the Trainer counts FLOPs for `total_flos` by walking every module and
    parameter of the model (~2,300 modules with LoRA adapters), a metric persona never reads: skipped. Nothing
    that is optimized or logged by persona changes. PERSONA_NO_TRAINER_PATCHES=1 keeps the Trainer as it is.
    Returns the names of what was patched.
    """
    if os.environ.get("PERSONA_NO_TRAINER_PATCHES"):
        return []
    try:
        from transformers import Trainer
    except Exception:
        return []
    Trainer.floating_point_ops = lambda self, inputs: 0
    return ["Trainer.floating_point_ops"]


def run_preflight(job: dict, local_rank: int) -> None:
    """Raise persona.preflight.PreflightError when the job's estimate does not fit this GPU's free memory."""
    from persona import preflight

    spec = job.get("preflight")
    if not spec or os.environ.get("PERSONA_SKIP_PREFLIGHT"):
        return
    estimate = preflight.VramEstimate(**spec["estimate"])
    shape = preflight.ModelShape(**spec["shape"])
    fake = os.environ.get("PERSONA_FAKE_FREE_VRAM_GIB")  # dry runs and tests: pretend this much is free
    if fake:
        free, total, name = int(float(fake) * 2**30), None, f"GPU {local_rank} (PERSONA_FAKE_FREE_VRAM_GIB)"
    else:
        free, total, name = preflight.free_cuda_memory(local_rank)
    hints = []
    if estimate.total * preflight.SAFETY_MARGIN > free:
        from persona.recipe import Recipe

        hints = preflight.suggestions(shape, Recipe.from_params(spec["recipe"]), spec["seq_len"], free,
                                      spec.get("world_size", 1))
    preflight.check_fits(estimate, free, total, name, hints)
    print(f"[persona] pre-flight: {name}: {free / 2**30:.1f} GiB free; estimate {estimate.describe()}", flush=True)


def main(job_file: str) -> None:
    job = json.loads(Path(job_file).read_text())
    args = job["swift_args"]
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if job["device"] != "cpu":
        from persona.preflight import PreflightError

        try:
            run_preflight(job, local_rank)
        except PreflightError as exc:
            print(f"[persona] pre-flight refused the run: {exc}", flush=True)
            Path(args["output_dir"], PREFLIGHT_FILE).write_text(json.dumps({"message": str(exc), "rank": rank}))
            sys.exit(3)

    from swift import SftArguments, sft_main
    from swift.model.register import ModelLoader

    # ms-swift's loader defaults to trust_remote_code=True; persona never runs code shipped with weights.
    ModelLoader.default_trust_remote_code = False

    if job["device"] != "cpu":
        patched = trim_trainer_overhead()
        if patched and rank == 0:
            print(f"[persona] trainer overhead trimmed: {', '.join(patched)}", flush=True)
    started = time.time()
    profile_to = os.environ.get("PERSONA_CPROFILE") if rank == 0 else None
    if profile_to:  # a diagnosis aid: where the trainer's CPU time goes
        import cProfile
        import pstats

        profiler = cProfile.Profile()
        out = profiler.runcall(sft_main, SftArguments(**args))
        with open(profile_to, "w") as fh:
            stats = pstats.Stats(profiler, stream=fh)
            stats.sort_stats("tottime").print_stats(45)
            stats.sort_stats("cumulative").print_stats(70)
    else:
        out = sft_main(SftArguments(**args))
    wall = time.time() - started
    peak = max_over_ranks(peak_memory_gib(job["device"]))
    if rank != 0:
        return
    result = {
        "last_model_checkpoint": out["last_model_checkpoint"],
        "global_step": out["global_step"],
        "log_history": out["log_history"],
        "wall_seconds": wall,
        "peak_memory_gib": peak,
        "train_dataset": out.get("train_dataset"),
    }
    Path(args["output_dir"], RESULT_FILE).write_text(json.dumps(result, default=str))


if __name__ == "__main__":
    main(sys.argv[1])
