"""Child-process entry point: `python -m persona.train_worker job.json` runs ms-swift's sft_main once.

`python -m persona.train_worker --standby SOCKET` is the same child started ahead of time: it imports torch and
ms-swift, then waits for one job on a Unix socket (persona.standby).

Under torchrun (one process per GPU) every rank trains; rank 0 alone writes the result file. On a GPU the job's
pre-flight estimate is checked against this device's free memory before ms-swift loads anything.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import sys
import traceback
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

PROCESS_START = time.time()  # before persona's imports, which bring transformers
PARENT_ENV = "PERSONA_TRAINING_PARENT"  # the pid of the process that started this child (persona.training.child_env)


def die_with_parent(expected_parent: int | None) -> None:
    """Ask Linux to SIGKILL this process when its parent dies (prctl PR_SET_PDEATHSIG), so that a killed run never
    leaves a training that holds the CPU or GPU, whether it prints or not. If the parent died before this call, exit
    now. Under torchrun the parent is torchrun's agent, which has the same setting."""
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the parent's supervision is all there is
        return
    if expected_parent and os.getppid() != expected_parent:
        sys.exit(f"[persona] the process that started this training ({expected_parent}) is gone; not training")


if __name__ == "__main__" and sys.argv[1:2] != ["--standby"]:  # a standby outlives runs by design (persona.standby)
    die_with_parent(int(os.environ.get(PARENT_ENV) or 0) or None)

from persona.training import PREFLIGHT_FILE, RESULT_FILE  # noqa: E402


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


def start_cuda(job: dict, local_rank: int) -> bool | None:
    """Create this rank's CUDA context, then run the pre-flight check (raises PreflightError; returns its answer)."""
    import torch

    if torch.cuda.is_available():  # (not in the CPU tests, which fake the free memory)
        torch.cuda.mem_get_info(local_rank)
    return run_preflight(job, local_rank)


def run_preflight(job: dict, local_rank: int) -> bool | None:
    """Raise persona.preflight.PreflightError when the job's estimate does not fit this GPU's free memory. Returns
    False when the job may train without gradient checkpointing (checkpointing_needed), None to keep its setting."""
    from persona import preflight

    spec = job.get("preflight")
    if not spec or os.environ.get("PERSONA_SKIP_PREFLIGHT"):
        return None
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
                                      spec.get("world_size", 1), spec.get("replay_rows", False))
    preflight.check_fits(estimate, free, total, name, hints)
    print(f"[persona] pre-flight: {name}: {free / 2**30:.1f} GiB free; estimate {estimate.describe()}", flush=True)
    if "without_checkpointing" in spec and not checkpointing_needed(spec, free):
        without = preflight.VramEstimate(**spec["without_checkpointing"])
        print(f"[persona] gradient checkpointing off: the estimate without it, ~{without.total / 2**30:.1f} GiB, "
              f"fits the {free / 2**30:.1f} GiB free", flush=True)
        return False
    return None


def checkpointing_needed(spec: dict, free: int) -> bool:
    """Whether a job needs gradient checkpointing to fit `free` bytes: yes unless its pre-flight carries an estimate
    without it (the recipe's checkpointing_if_needed) that fits with preflight.CHECKPOINTING_OFF_MARGIN. Each rank
    decides on its own GPU's free memory (before the process group exists); ranks that differ compute the same
    gradients, one of them with recomputation."""
    from persona import preflight

    without = spec.get("without_checkpointing")
    return not without or preflight.VramEstimate(**without).total * preflight.CHECKPOINTING_OFF_MARGIN > free


def main(job_file: str, started: float = PROCESS_START) -> None:
    job = json.loads(Path(job_file).read_text())
    if job.get("cwd"):
        os.chdir(job["cwd"])  # relative paths mean what they meant to the caller
    args = job["swift_args"]
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))

    def mark(what: str) -> None:  # start-up stages, with seconds since the process (or the standby's job) started
        if rank == 0:
            print(f"[persona] {what} (+{time.time() - started:.1f} s)", flush=True)

    preflight = None
    if job["device"] != "cpu":
        # Starting CUDA takes seconds (4.5 s measured on an H100 machine); it and the pre-flight run in a thread
        # while this one imports ms-swift. No weight is loaded before the pre-flight has passed.
        import torch  # noqa: F401  (imported here once, so that the two threads do not import it together)

        from persona import preflight as _preflight_module  # noqa: F401

        preflight = ThreadPoolExecutor(1).submit(start_cuda, job, local_rank)

    from swift import SftArguments, sft_main
    from swift.model.register import ModelLoader

    mark("ms-swift imported")
    if preflight is not None:
        from persona.preflight import PreflightError

        try:
            if preflight.result() is False:
                args = {**args, "gradient_checkpointing": False}
        except PreflightError as exc:
            print(f"[persona] pre-flight refused the run: {exc}", flush=True)
            Path(args["output_dir"], PREFLIGHT_FILE).write_text(json.dumps({"message": str(exc), "rank": rank}))
            sys.exit(3)
        mark("CUDA ready, pre-flight passed")

    # ms-swift's loader defaults to trust_remote_code=True; persona never runs code shipped with weights.
    ModelLoader.default_trust_remote_code = False
    from persona import adapter_casts, checkpointing, packing, step_clock

    if checkpointing.CALLBACK in args.get("callbacks", []):
        checkpointing.register()  # (the clock that decides when a resumable training saves)
    if adapter_casts.CALLBACK in args.get("callbacks", []):
        adapter_casts.register()
    step_clock.register()
    if args.get("attn_impl") == packing.VARLEN:
        packing.register_varlen()
    args = {**args, "callbacks": [*args.get("callbacks", []), step_clock.CALLBACK]}

    if job.get("replay_kl_weight"):
        from persona import distill

        weight = float(job["replay_kl_weight"])
        if distill.enable(weight) and rank == 0:
            print(f"[persona] replay rows, if any, keep the base model's distribution (KL weight {weight})", flush=True)
    if job["device"] != "cpu" and not job.get("cudnn_attention", True):
        import torch

        torch.backends.cuda.enable_cudnn_sdp(False)
    started = time.time()
    out = sft_main(packing.sft_arguments(SftArguments, args))
    wall = time.time() - started
    mark("ms-swift finished")
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
        "step_ends": list(step_clock.STEP_ENDS),
        "gradient_checkpointing": bool(args.get("gradient_checkpointing")),  # after the pre-flight's choice
    }
    Path(args["output_dir"], RESULT_FILE).write_text(json.dumps(result, default=str))


def prepare(device: str) -> None:
    """What every job needs before its own work: torch, ms-swift and, on a GPU, the CUDA context."""
    import torch

    cuda = None
    if device != "cpu" and torch.cuda.is_available():  # CUDA starts (0.3-4.5 s) while ms-swift imports (~15 s)
        cuda = ThreadPoolExecutor(1).submit(torch.cuda.mem_get_info, 0)
    from swift import SftArguments, sft_main  # noqa: F401
    from swift.model.register import ModelLoader  # noqa: F401

    from persona import preflight  # noqa: F401

    if cuda is not None:
        cuda.result()


def _read_request(conn: socket.socket) -> dict | None:
    """{"job": path, "env": {...}}, or None for a liveness probe (nothing sent) or anything else."""
    data = b""
    while not data.endswith(b"\n") and len(data) < 2**20:
        chunk = conn.recv(65536)
        if not chunk:
            break
        data += chunk
    try:
        request = json.loads(data)
    except ValueError:
        return None
    return request if isinstance(request, dict) and isinstance(request.get("job"), str) else None


def _apply_env(env: dict, started_with: dict) -> None:
    """The job's environment: its values win; what the caller has unset is unset; what imports set stays."""
    for k in set(started_with) - set(env):
        os.environ.pop(k, None)
    os.environ.update({str(k): str(v) for k, v in env.items()})


def watch_client(conn: socket.socket) -> None:
    """End this process when the run that handed it the job goes away (its end of the socket closes), also while
    the training prints nothing: a killed run must not leave a training behind."""
    import select
    import threading

    def watch() -> None:
        while True:
            select.select([conn], [], [])
            try:
                if conn.recv(1, socket.MSG_PEEK) == b"":
                    break
            except OSError:
                break
            time.sleep(1)  # (the client sends nothing after the request; anything else is ignored)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="persona-client-watch").start()


def serve(address: str, device: str, idle_seconds: float) -> int:
    """`--standby`: listen on `address`, prepare, then run the first job handed over (see persona.standby).

    Connections that ask nothing are liveness probes. The job's output goes down the connection, followed by its
    exit code; then this process ends. With no job for `idle_seconds`, it ends too.
    """
    from persona.standby import ACCEPTED, EXIT_PREFIX

    started_with = dict(os.environ)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(address)
    except OSError as exc:  # another standby took this address first (two runs warmed it at once)
        print(f"[persona] standby: {address} is taken ({exc}); exiting", flush=True)
        return 0
    listener.listen(8)
    try:
        prepare(device)
        print(f"[persona] standby ready on {device} (+{time.time() - PROCESS_START:.1f} s)", flush=True)
        listener.settimeout(idle_seconds)
        while True:
            try:
                conn, _ = listener.accept()
            except socket.timeout:
                print(f"[persona] standby: no job in {idle_seconds:g} s; exiting", flush=True)
                return 0
            conn.settimeout(10)
            try:
                request = _read_request(conn)
            except OSError:
                request = None
            if request is None:
                conn.close()  # a liveness probe, or a client that gave up
                continue
            try:
                conn.sendall(f"{ACCEPTED}\n".encode())
            except OSError:
                conn.close()
                continue
            break
    finally:
        try:
            os.unlink(address)  # from here on, nobody else can hand this process a job
        except FileNotFoundError:
            pass
        listener.close()
    started = time.time()
    conn.setblocking(True)  # (a socket with a timeout is non-blocking underneath; stdout must block)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(conn.fileno(), 1)
    os.dup2(conn.fileno(), 2)
    watch_client(conn.dup())
    conn.close()
    _apply_env(request.get("env") or {}, started_with)
    code = 0
    try:
        main(request["job"], started)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        traceback.print_exc()
        code = 1
    print(f"{EXIT_PREFIX}{code}", flush=True)
    return code


if __name__ == "__main__":
    from persona.quick_exit import exit_now

    if sys.argv[1] == "--standby":
        ap = argparse.ArgumentParser(prog="python -m persona.train_worker")
        ap.add_argument("--standby", required=True, help="the Unix socket to listen on")
        ap.add_argument("--device", default="cuda")
        ap.add_argument("--idle", type=float, default=600.0, help="seconds to wait for a job before exiting")
        opts = ap.parse_args()
        exit_now(serve(opts.standby, opts.device, opts.idle))
    exit_now(main(sys.argv[1]) or 0)  # (an error or sys.exit() in main ends the process as Python ends it)
