"""Child-process entry point: `python -m persona.train_worker job.json` runs ms-swift's sft_main once."""
from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

from persona.training import RESULT_FILE


def peak_memory_gib(device: str) -> float:
    if device != "cpu":
        import torch

        return torch.cuda.max_memory_reserved() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def main(job_file: str) -> None:
    job = json.loads(Path(job_file).read_text())
    from swift import SftArguments, sft_main

    args = job["swift_args"]
    started = time.time()
    out = sft_main(SftArguments(**args))
    result = {
        "last_model_checkpoint": out["last_model_checkpoint"],
        "global_step": out["global_step"],
        "log_history": out["log_history"],
        "wall_seconds": time.time() - started,
        "peak_memory_gib": peak_memory_gib(job["device"]),
    }
    Path(args["output_dir"], RESULT_FILE).write_text(json.dumps(result, default=str))


if __name__ == "__main__":
    main(sys.argv[1])
