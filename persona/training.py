"""LoRA SFT through ms-swift's Python API, run in a child process.

A child process keeps an OOM, a CUDA error or a kill from taking the orchestrator down. It trains
into a scratch folder; the adapter is moved to its final place only when training succeeded.

On a GPU, a pre-flight check in the child compares free VRAM with an estimate (persona.preflight) before any
weight is loaded. With NPROC_PER_NODE > 1 the child is started under torchrun (data-parallel LoRA, one process per
GPU); the per-device batch is divided so that the samples per optimizer step stay the recipe's.

Why this module is long: ms-swift's arguments, the optional-kernel fallbacks and the three ways a child starts
(fresh, torchrun, standby) all change with ms-swift's own interface, so they live together.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Callable

from persona import adapter_casts
from persona.checkpointing import CALLBACK as CHECKPOINT_CALLBACK
from persona.models import BaseModel
from persona.preflight import PreflightError, VramEstimate
from persona.recipe import Recipe, resolve_dtype, scale_for_world
from persona.standby import Standby, StandbyJob
from persona.storage import staged_dir

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "args.json", "additional_config.json")
# What a checkpoint holds beyond the adapter, for resuming only: not copied into the adapter folder.
TRAINER_STATE_FILES = ("optimizer.pt", "scheduler.pt", "scaler.pt", "rng_state.pth", "trainer_state.json",
                       "training_args.bin")
# Mid-run checkpoints of a resumable training: on one device by the clock, so that saving costs at most 5 % of the
# training time (persona.checkpointing); with several GPUs, whose ranks must agree on the step, one every
# CHECKPOINT_FRACTION of the steps (transformers reads a save_steps below 1 as a ratio of the total).
CHECKPOINT_FRACTION = 0.1
RESUME_FILE = "persona_resume.json"  # in a run's checkpoint folder: what it trains, and the attempts so far
RESULT_FILE = "persona_train_result.json"
PREFLIGHT_FILE = "persona_preflight_error.json"
NPROC_ENV = "NPROC_PER_NODE"
HUB_TOKENS = ("MODELSCOPE_API_TOKEN", "MODELSCOPE_TOKEN", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
EXTRA_ARGS_ENV = "PERSONA_SWIFT_ARGS"  # JSON object of further ms-swift arguments, applied last (an escape hatch)


class TrainingError(RuntimeError):
    """ms-swift failed; the message carries the child's last output lines."""


class TrainingInterrupted(TrainingError):
    """The training child was killed (a signal, the out-of-memory killer): trying again may succeed, and resumes
    from the last checkpoint when there is one."""


class PreflightFailed(TrainingError, PreflightError):
    """The pre-flight check refused the run before loading: it would not fit in GPU memory."""


class MissingKernelWarning(UserWarning):
    """A recipe knob asked for an optional package that is not installed; the knob went back to its default."""


# Recipe knobs that need a package beyond the declared dependencies: knob -> {value: (module, what to install)}.
# The module is looked up with importlib.util.find_spec, never imported (liger_kernel imports triton: seconds).
# Where it is missing, the knob falls back to the Recipe field's default, with one warning: a bigger (or slower) run
# of the same optimization, never a training child that dies on ms-swift's assertion. Knobs listed in
# NEEDS_KNOB fall back with the knob they need. tests/test_optional_kernels.py checks that every knob a shipped
# recipe sets is either here or needs nothing beyond the declared dependencies.
OPTIONAL_PACKAGES: dict[str, dict[object, tuple[str, str]]] = {
    "use_liger_kernel": {True: ("liger_kernel", "liger-kernel (the gpu extra: pip install -e '.[gpu]')")},
    "attn_impl": {"flash_attn": ("flash_attn", "flash-attn"), "flash_attention_2": ("flash_attn", "flash-attn"),
                  "flash_attention_3": ("flash_attn_interface", "FlashAttention 3 (flash_attn_interface)"),
                  "torch_varlen": ("torch.nn.attention.varlen", "PyTorch >= 2.10 (torch.nn.attention.varlen)")},
}
# Knobs that only work with another knob's optional package: knob -> the knob it needs. None today: padding_free,
# which ms-swift ties to flash attention, runs on SDPA too (persona.packing), so it stays on when flash-attn is missing.
NEEDS_KNOB: dict[str, str] = {}


def missing_packages(recipe: Recipe, find_spec: Callable | None = None) -> dict[str, tuple]:
    """{knob: (value, module, what to install)} for each knob of `recipe` whose optional package is not installed."""
    find_spec = find_spec or importlib.util.find_spec

    def installed(module: str) -> bool:
        try:
            return find_spec(module) is not None
        except ModuleNotFoundError:  # a dotted name whose parent package is missing
            return False

    missing = {}
    for knob, needs in OPTIONAL_PACKAGES.items():
        value = getattr(recipe, knob)
        if value in needs and not installed(needs[value][0]):
            missing[knob] = (value, *needs[value])
    return missing


def available_recipe(recipe: Recipe, warn: Callable[[str], None] | None = None,
                     find_spec: Callable | None = None) -> Recipe:
    """`recipe` with each knob whose optional package is missing set back to its default, one warning line each
    (`warn`, default: warnings.warn with MissingKernelWarning). The recipe itself when everything is installed."""
    missing = missing_packages(recipe, find_spec)
    if not missing:
        return recipe
    defaults = {f.name: f.default for f in fields(recipe)}
    off = {knob: defaults[knob] for knob in missing}
    off.update({knob: defaults[knob] for knob, needed in NEEDS_KNOB.items()
                if needed in missing and getattr(recipe, knob) != defaults[knob]})
    for knob, (value, module, install) in missing.items():
        also = [k for k in off if NEEDS_KNOB.get(k) == knob]
        message = (f"{knob}={value!r} needs the Python package {module}, which is not installed: training without "
                   f"it ({', '.join(f'{k}={off[k]!r}' for k in [knob, *also])}; same optimization, more GPU "
                   f"memory or time). Install {install} to use it.")
        if warn is None:
            warnings.warn(message, MissingKernelWarning, stacklevel=2)
        else:
            warn(message)
    return replace(recipe, **off)


@dataclass
class TrainResult:
    adapter_dir: str
    global_step: int
    final_loss: float
    train_seconds: float
    peak_memory_gib: float
    num_tokens: int
    tokens_per_second: float
    log_history: list[dict]
    world_size: int = 1
    estimated_peak_gib: float = float("nan")
    wall_seconds: float = float("nan")  # the whole call: start-up, loading, training, saving
    standby: bool = False               # trained by a standby trainer (persona.standby), not a fresh child
    resumed_from_step: int = 0          # > 0: continued an interrupted attempt's checkpoint at this step
    resumed_from: str | None = None     # that attempt's owner (the MLflow run id the caller passed)
    step_ends: list[float] = field(default_factory=list)  # seconds from the Trainer's start to each step's end
    gradient_checkpointing: bool | None = None  # what the child trained with (Recipe.checkpointing_if_needed)

    def slice_tokens_per_second(self, first: int, last: int) -> float | None:
        """Real tokens per second over optimizer steps first+1 .. last (1-based), from the step clock and the
        logged token counts (logging_steps 1); None when either is missing for those steps."""
        seen = {int(h["step"]): h["num_input_tokens_seen"] for h in self.log_history
                if "num_input_tokens_seen" in h and "step" in h}
        if not (0 < first < last <= len(self.step_ends)) or first not in seen or last not in seen:
            return None
        return (seen[last] - seen[first]) / (self.step_ends[last - 1] - self.step_ends[first - 1])

    def summary(self) -> dict:
        d = asdict(self)
        d.pop("log_history")
        d.pop("step_ends")
        return d


def swift_arguments(base: BaseModel, dataset_path: str, recipe: Recipe, device: str, output_dir: str) -> dict:
    """Keyword arguments for `swift.SftArguments`: the seed's `swift sft` flags, as Python."""
    kw = dict(
        model=base.path,
        tuner_type="lora",
        dataset=[dataset_path],
        torch_dtype=recipe.torch_dtype,
        num_train_epochs=recipe.num_train_epochs,
        per_device_train_batch_size=recipe.per_device_train_batch_size,
        gradient_accumulation_steps=recipe.gradient_accumulation_steps,
        gradient_checkpointing=recipe.gradient_checkpointing,
        learning_rate=recipe.learning_rate,
        lora_rank=recipe.lora_rank,
        lora_alpha=recipe.lora_alpha,
        lora_dropout=recipe.lora_dropout,
        target_modules=list(recipe.target_modules),
        max_length=recipe.max_length,
        system=recipe.system,
        warmup_ratio=recipe.warmup_ratio,
        logging_steps=recipe.logging_steps,
        seed=recipe.seed,
        loss_scale=recipe.loss_scale,
        output_dir=output_dir,
        add_version=False,
        create_checkpoint_symlink=False,
        split_dataset_ratio=0,          # evaluation is its own stage; no mid-run eval
        save_steps=10**9,               # ms-swift always saves the last step; train_lora sets mid-run checkpoints
        save_only_model=True,           # (False with checkpoints: resuming needs the optimizer, scheduler and RNG)
        report_to=["none"],             # persona logs to MLflow itself, under its own metric names
        check_model=False,              # no hub lookups: works offline
        dataloader_num_workers=recipe.dataloader_num_workers,
        include_num_input_tokens_seen="non_padding",  # real tokens, for tokens/s and MFU
        # ms-swift's default, 1, makes datasets 4 start a pool of one process for each map and pickle the template
        # and the rows to it (1-3 s before the first step, measured with py-spy); None maps in this process, as
        # ms-swift itself does when streaming. Same rows, same order.
        dataset_num_proc=None,
    )
    if recipe.dataloader_num_workers > 0:
        kw["dataloader_persistent_workers"] = True  # no worker start-up at every epoch
    if recipe.use_liger_kernel:
        kw["use_liger_kernel"] = True
        config = liger_kernel_config(recipe.liger_kernels)
        if config is not None:
            kw["liger_kernel_config"] = config
    if recipe.attn_impl:
        kw["attn_impl"] = recipe.attn_impl
    if recipe.padding_free:
        kw["padding_free"] = True
    if recipe.use_logits_to_keep is not None:
        kw["use_logits_to_keep"] = recipe.use_logits_to_keep
    if not recipe.lora_input_cast:
        kw["callbacks"] = [*kw.get("callbacks", []), adapter_casts.CALLBACK]
    if base.model_type:
        kw["model_type"] = base.model_type
    if base.template:
        kw["template"] = base.template
    if device == "cpu":
        kw["use_cpu"] = True
    extra = os.environ.get(EXTRA_ARGS_ENV, "").strip()
    if extra:
        try:
            parsed = json.loads(extra)
        except json.JSONDecodeError as exc:
            raise ValueError(f"${EXTRA_ARGS_ENV} is not valid JSON: {exc}") from None
        if not isinstance(parsed, dict):
            raise ValueError(f"${EXTRA_ARGS_ENV} must be a JSON object of ms-swift arguments")
        kw.update(parsed)
    return kw


LIGER_KERNELS = ("rope", "rms_norm", "swiglu", "cross_entropy", "fused_linear_cross_entropy")


def liger_kernel_config(names: tuple[str, ...] | list[str]) -> dict | None:
    """transformers' `liger_kernel_config` for the named Liger kernels; None (Liger's defaults) for ('all',)."""
    names = tuple(names)
    if "all" in names:
        return None
    unknown = set(names) - set(LIGER_KERNELS)
    if unknown:
        raise ValueError(f"unknown Liger kernel(s) {', '.join(sorted(unknown))}; known: {', '.join(LIGER_KERNELS)}")
    return {k: k in names for k in LIGER_KERNELS}


def world_size_from_env(device: str, env: dict | None = None) -> int:
    """GPUs to train on: $NPROC_PER_NODE (ms-swift's convention) on a GPU, 1 otherwise."""
    env = os.environ if env is None else env
    if device == "cpu":
        return 1
    raw = str(env.get(NPROC_ENV, "") or "1").strip()
    try:
        n = int(raw)
    except ValueError:
        raise ValueError(f"{NPROC_ENV}={raw!r}: expected a whole number of GPUs") from None
    if n < 1:
        raise ValueError(f"{NPROC_ENV}={n}: expected at least 1")
    return n


def launch_command(job_file: str | Path, world_size: int = 1, python: str | None = None) -> list[str]:
    """The child's command line: the worker itself, or the worker under torchrun for several GPUs."""
    python = python or sys.executable
    worker = ["-m", "persona.train_worker", str(job_file)]
    if world_size <= 1:
        return [python, *worker]
    # `python -m torch.distributed.run` is torchrun from the same interpreter; --standalone picks a free port.
    return [python, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
            "--nproc_per_node", str(world_size), *worker]


def child_env(device: str, world_size: int = 1, base: dict | None = None) -> dict:
    env = {**(os.environ if base is None else base), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONUNBUFFERED": "1", "PERSONA_TRAINING_PARENT": str(os.getpid())}  # the child dies with this process
    for secret in HUB_TOKENS:  # the child trains from a local folder: it needs no hub, and must not log in to one
        env.pop(secret, None)
    if device != "cpu":
        # Fewer, growable segments: less fragmentation, so the peak reserved is close to the peak allocated.
        env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
        if world_size == 1 and not env.get("CUDA_VISIBLE_DEVICES"):
            # One process, one GPU. Seeing several, ms-swift would split the model across them (device_map):
            # slower than one GPU for a model that fits, and refused with Liger kernels. Use NPROC_PER_NODE for
            # data parallelism instead.
            env["CUDA_VISIBLE_DEVICES"] = "0"
    if world_size > 1:
        env[NPROC_ENV] = str(world_size)
    else:
        env.pop(NPROC_ENV, None)
    return env


def preflight_job(base: BaseModel, dataset_path: str, recipe: Recipe, world_size: int = 1) -> dict | None:
    """What the child checks before loading: the estimate (bytes) and what to suggest if it does not fit."""
    from persona import preflight

    try:
        shape = preflight.ModelShape.from_dir(base.path, parameters=base.parameters or None)
    except (OSError, KeyError, ValueError):
        return None  # unknown architecture: no estimate, no check
    count = preflight.tokenizer_counter(base.path)
    lengths = [min(n, recipe.max_length) for n in preflight.sample_tokens(dataset_path, recipe.system, count)]
    replay_rows = preflight.has_replay_rows(dataset_path)
    if recipe.padding_free:  # one row of a micro-batch's samples; max_length caps each sample, not the row
        batch = recipe.per_device_train_batch_size
        micro_batches = math.ceil(len(lengths) / (batch * world_size)) * recipe.num_train_epochs
        seq_len = preflight.packed_tokens(lengths, batch, micro_batches)
        as_estimated = recipe.with_overrides(per_device_train_batch_size=1, max_length=max(seq_len, recipe.max_length))
    else:
        seq_len = max(lengths, default=0)
        as_estimated = recipe
    estimate = preflight.estimate_for_recipe(shape, as_estimated, seq_len, world_size, replay_rows)
    job = {"estimate": asdict(estimate), "total_bytes": estimate.total, "seq_len": seq_len, "world_size": world_size,
           "describe": estimate.describe(), "shape": asdict(shape), "recipe": recipe.as_params(),
           "replay_rows": replay_rows}
    if recipe.gradient_checkpointing and recipe.checkpointing_if_needed:  # the child decides on its free memory
        job["without_checkpointing"] = asdict(preflight.estimate_for_recipe(
            shape, as_estimated.with_overrides(gradient_checkpointing=False), seq_len, world_size, replay_rows))
    return job


PROGRESS_FILE = "logging.jsonl"  # ms-swift appends one JSON object per logging step to its output folder


class ProgressLog:
    """The training's progress as ms-swift records it: the records appended to `folder`/logging.jsonl since this
    object was made (in a resumed folder, the interrupted attempt's records are skipped)."""

    def __init__(self, folder: str | Path):
        self.path = Path(folder, PROGRESS_FILE)
        self.offset = self.path.stat().st_size if self.path.exists() else 0

    def new(self) -> list[dict]:
        """The logging steps recorded since the last call, e.g. {'loss': 3.01, 'global_step/max_steps': '5/192',
        'elapsed_time': '8s', 'remaining_time': '2m 1s', ...}."""
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except OSError:
            return []
        complete = data[:data.rfind(b"\n") + 1]  # a record still being written is read next time
        self.offset += len(complete)
        records = []
        for line in complete.splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and "global_step/max_steps" in record:
                records.append(record)
        return records


def resume_key(base: BaseModel, dataset_path: str | Path, swift_args: dict) -> str:
    """What makes two trainings the same one, so that the second may resume the first's checkpoints: the base
    weights, the dataset's bytes and every ms-swift argument but the folders."""
    import hashlib

    h = hashlib.sha256()
    h.update(json.dumps({k: v for k, v in swift_args.items() if k not in ("output_dir", "resume_from_checkpoint")},
                        sort_keys=True, default=str).encode())
    h.update((base.weights_sha256 or base.path).encode())
    with open(dataset_path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def last_checkpoint(folder: str | Path) -> Path | None:
    """The newest complete checkpoint-N in `folder` (transformers writes trainer_state.json last), or None."""
    complete = [p for p in Path(folder).glob("checkpoint-*")
                if p.name.removeprefix("checkpoint-").isdigit() and (p / "trainer_state.json").is_file()]
    return max(complete, key=lambda p: int(p.name.removeprefix("checkpoint-")), default=None)


@dataclass(frozen=True)
class Resume:
    """A training's own checkpoint folder, and what an earlier attempt left there."""

    folder: Path
    checkpoint: Path | None  # resume from here; None: start at step 0
    attempts: list           # the owners (e.g. MLflow run ids) of earlier attempts, oldest first

    @property
    def step(self) -> int:
        return int(self.checkpoint.name.removeprefix("checkpoint-")) if self.checkpoint else 0

    @property
    def previous(self) -> str | None:
        return self.attempts[-1] if self.attempts else None


def open_resume(root: str | Path, key: str, owner: str | None) -> Resume:
    """The checkpoint folder of the training `key` under `root`, with this attempt (`owner`) recorded in it."""
    folder = Path(root, key[:16])
    folder.mkdir(parents=True, exist_ok=True)
    record = folder / RESUME_FILE
    try:
        state = json.loads(record.read_text())
        if state.get("key") != key:
            raise ValueError("another training")
    except (OSError, ValueError):
        state = {"key": key, "attempts": []}
    checkpoint = last_checkpoint(folder)
    resume = Resume(folder, checkpoint, list(state["attempts"]) if checkpoint else [])
    state["attempts"] = [*resume.attempts, owner]
    tmp = record.with_suffix(".tmp")
    tmp.write_text(json.dumps(state))
    os.replace(tmp, record)
    return resume


def interrupted_by_ctrl_c(code: int | None, tail: list[str]) -> bool:
    """The training child ended on SIGINT: by the signal, or with Python's KeyboardInterrupt as its last words.

    Ctrl-C in a terminal reaches the whole process group, this process and the child. Usually this process's own
    KeyboardInterrupt wins and the run ends as interrupted; when the child's exit is seen first, the run must end
    the same way (the CLI's exit 130, no retry), not as a failed training."""
    import signal

    return code == -signal.SIGINT or "KeyboardInterrupt" in (line.strip() for line in tail[-3:])


def train_lora(
    base: BaseModel,
    dataset_path: str | Path,
    recipe: Recipe,
    adapter_dir: str | Path,
    device: str = "cpu",
    on_progress: Callable[[dict], None] | None = None,
    on_output: Callable[[str], None] | None = None,
    standby_idle_seconds: float | None = None,
    checkpoint_root: str | Path | None = None,
    owner: str | None = None,
) -> TrainResult:
    """Train a LoRA adapter; `adapter_dir` appears only if training succeeds.

    A knob whose optional package is not installed (OPTIONAL_PACKAGES, e.g. use_liger_kernel without liger-kernel)
    is turned off with one warning (`available_recipe`: warnings.warn, and a line to `on_output`); the adapter's
    persona_recipe.json records the recipe that trained. Call `available_recipe` first to log the warning
    elsewhere and record the same recipe; then nothing is missing here.

    With `standby_idle_seconds`, a single-process training is handed to a standby trainer (persona.standby: torch
    and ms-swift imported ahead of time), started now if none is waiting, and a new standby is started for the next
    run, which waits that long. Without it, on several GPUs, or when the standby does not answer, a fresh child
    trains.

    With `checkpoint_root`, the training checkpoints (persona.checkpointing: at most 5 % of its time) into a folder of
    its own under it (named by resume_key: base weights, dataset bytes, ms-swift arguments), and a later call for the same
    training (a retry, a re-launch) resumes from the last complete checkpoint with ms-swift's resume_from_checkpoint.
    `owner` (e.g. the MLflow run id) is recorded there, so that the resumed attempt knows whom it continues
    (TrainResult.resumed_from). The folder is removed once the adapter is complete. Without it, a scratch folder is
    used and an interrupted training starts over.
    """
    import contextlib
    import time

    adapter_dir = Path(adapter_dir)

    def warn(message: str) -> None:
        warnings.warn(message, MissingKernelWarning, stacklevel=3)
        if on_output:
            on_output(f"[persona] warning: {message}")

    recipe = available_recipe(recipe, warn)
    world_size = world_size_from_env(device)
    env = child_env(device, world_size)
    standby = Standby(device, env, standby_idle_seconds) if standby_idle_seconds and world_size == 1 else None
    run_recipe = scale_for_world(resolve_dtype(recipe, device), world_size)
    started = time.time()
    if standby is not None:
        standby.warm()  # usually one is waiting (base_model started it); if not, it imports during the pre-flight
    resume = None
    if checkpoint_root is not None:
        key = resume_key(base, dataset_path, swift_arguments(base, str(dataset_path), run_recipe, device, ""))
        resume = open_resume(checkpoint_root, key, owner)
        if on_output and resume.checkpoint:
            on_output(f"[persona] resuming from {resume.checkpoint} (step {resume.step}), left by an interrupted "
                      f"attempt{f' ({resume.previous})' if resume.previous else ''}")
    scratch = (contextlib.nullcontext(str(resume.folder)) if resume
               else tempfile.TemporaryDirectory(prefix="persona-train-"))
    with staged_dir(adapter_dir) as staged, scratch as work:
        swift_args = swift_arguments(base, str(dataset_path), run_recipe, device, work)
        if resume is not None:
            for stale in (RESULT_FILE, PREFLIGHT_FILE):  # an earlier attempt's
                Path(work, stale).unlink(missing_ok=True)
            swift_args.update(save_only_model=False, save_total_limit=2)
            if world_size > 1:
                swift_args["save_steps"] = CHECKPOINT_FRACTION
            else:
                swift_args["callbacks"] = [*swift_args.get("callbacks", []), CHECKPOINT_CALLBACK]
            if resume.checkpoint:
                swift_args["resume_from_checkpoint"] = str(resume.checkpoint)
        job = {"swift_args": swift_args, "device": device,
               "world_size": world_size,
               "cudnn_attention": run_recipe.cudnn_attention, "replay_kl_weight": run_recipe.replay_kl_weight,
               "cwd": os.getcwd()}  # (a standby was started elsewhere)
        if device != "cpu":
            job["preflight"] = preflight_job(base, str(dataset_path), run_recipe, world_size)
        job_file = Path(work, "job.json")
        job_file.write_text(json.dumps(job))
        tail: list[str] = []
        progress = ProgressLog(work)  # before the child starts: it records from its first step on
        conn = standby.claim(job_file) if standby is not None else None
        if conn is not None:
            child = StandbyJob(conn)
            lines = iter(child)
            if on_output:
                on_output("[persona] training in the standby trainer (torch and ms-swift already imported)")
        else:
            child = subprocess.Popen(launch_command(job_file, world_size), stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, env=env, bufsize=1)
            assert child.stdout is not None
            lines = child.stdout
        try:
            for line in lines:  # ms-swift writes a logging step to its file, then prints it
                tail = (tail + [line.rstrip()])[-40:]
                if on_output:
                    on_output(line.rstrip())
                for record in progress.new() if on_progress else ():
                    on_progress(record)
            code = child.wait()
            for record in progress.new() if on_progress else ():
                on_progress(record)
        finally:
            if standby is not None:
                standby.warm()  # for the next run: the sensor's, the schedule's, or a user's
        if code != 0 and interrupted_by_ctrl_c(code, tail):
            raise KeyboardInterrupt("the training child was interrupted (Ctrl-C)")
        preflight_file = Path(work, PREFLIGHT_FILE)
        if code != 0 and preflight_file.exists():
            raise PreflightFailed(json.loads(preflight_file.read_text())["message"])
        result_file = Path(work, RESULT_FILE)
        if code != 0 or not result_file.exists():
            if code is None:
                how = "the standby trainer ended without an exit code: killed, e.g. by the out-of-memory killer"
            else:
                how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
            error = TrainingInterrupted if code is None or code < 0 else TrainingError
            kept = (f" Its checkpoints are kept in {resume.folder}; the same training resumes from them."
                    if resume is not None and last_checkpoint(resume.folder) else "")
            raise error(f"ms-swift training failed ({how}).{kept} Last output:\n" + "\n".join(tail[-15:]))
        raw = json.loads(result_file.read_text())
        checkpoint = Path(raw["last_model_checkpoint"])
        for f in checkpoint.iterdir():
            if f.is_file() and f.name not in TRAINER_STATE_FILES and not f.name.startswith("rng_state"):
                shutil.copy2(f, staged / f.name)
        params = {**resolve_dtype(recipe, device).as_params(), "world_size": world_size}
        if world_size > 1:
            params["per_device_train_batch_size_run"] = run_recipe.per_device_train_batch_size
            params["gradient_accumulation_steps_run"] = run_recipe.gradient_accumulation_steps
        (staged / "persona_recipe.json").write_text(json.dumps(params, indent=2, ensure_ascii=False))
    if resume is not None:  # the adapter is complete: its checkpoints have done their job
        shutil.rmtree(resume.folder, ignore_errors=True)
        raw["resumed_from_step"], raw["resumed_from"] = resume.step, resume.previous
    raw["world_size"] = world_size
    raw["call_seconds"] = time.time() - started
    raw["standby"] = conn is not None
    if job.get("preflight"):
        spec = job["preflight"]
        turned_off = raw.get("gradient_checkpointing") is False and "without_checkpointing" in spec
        estimate = VramEstimate(**spec["without_checkpointing" if turned_off else "estimate"])
        raw["estimated_peak_gib"] = estimate.total / 2**30
    return _result(raw, adapter_dir)


def _result(raw: dict, adapter_dir: Path) -> TrainResult:
    history = raw["log_history"]
    losses = [h["loss"] for h in history if "loss" in h]
    summary = next((h for h in reversed(history) if "train_runtime" in h), {})
    seconds = float(summary.get("train_runtime") or raw["wall_seconds"])
    tokens = int(max((h.get("num_input_tokens_seen", 0) for h in history), default=0))
    return TrainResult(
        adapter_dir=str(adapter_dir),
        global_step=int(raw["global_step"]),
        final_loss=float(losses[-1]) if losses else float("nan"),
        train_seconds=seconds,
        peak_memory_gib=float(raw["peak_memory_gib"]),
        num_tokens=tokens,
        tokens_per_second=tokens / seconds if seconds else 0.0,
        log_history=history,
        world_size=int(raw.get("world_size", 1)),
        estimated_peak_gib=float(raw.get("estimated_peak_gib", math.nan)),
        wall_seconds=float(raw.get("call_seconds", raw.get("wall_seconds", math.nan))),
        standby=bool(raw.get("standby", False)),
        resumed_from_step=int(raw.get("resumed_from_step", 0)),
        resumed_from=raw.get("resumed_from"),
        step_ends=[float(t) for t in raw.get("step_ends") or []],
        gradient_checkpointing=raw.get("gradient_checkpointing"),
    )
