"""Optional kernel packages (issue #17): every package a shipped recipe asks for beyond the declared dependencies is
either installed or falls back with one warning, so that a fresh install never dies on ms-swift's
"use_liger_kernel requires liger_kernels". CPU only: find_spec is faked, nothing is imported or trained."""
import importlib.util
import json
import re
import sys
import tomllib
import warnings
from dataclasses import fields
from pathlib import Path

import pytest

from persona import recipe as recipe_module
from persona import training
from persona.models import BaseModel
from persona.recipe import CPU_DEFAULT, FAST_GPU, GPU_RECIPES, SEED_GPU, Recipe, default_recipe
from persona.training import (NEEDS_KNOB, OPTIONAL_PACKAGES, MissingKernelWarning, TrainingError, available_recipe,
                              missing_packages, swift_arguments, train_lora)

ROOT = Path(__file__).resolve().parent.parent

# Knobs that need nothing beyond the declared dependencies (torch, transformers, peft, ms-swift) or persona's own
# code. A new Recipe field must be put here or in persona.training.OPTIONAL_PACKAGES / NEEDS_KNOB.
PLAIN_KNOBS = {
    "learning_rate", "num_train_epochs", "per_device_train_batch_size", "gradient_accumulation_steps",
    "gradient_checkpointing", "torch_dtype", "lora_rank", "lora_alpha", "target_modules", "max_length", "system",
    "warmup_ratio", "logging_steps", "seed", "lora_dropout",
    "loss_scale",               # ms-swift
    "liger_kernels",            # which Liger kernels: used only with use_liger_kernel, which is in the table
    "use_logits_to_keep",       # ms-swift / transformers
    "dataloader_num_workers",   # torch
    "cudnn_attention",          # torch's SDPA backends
    "checkpointing_if_needed",  # persona.train_worker: the pre-flight estimate decides
    "lora_input_cast",          # peft: an attribute of its tuner layers (a PEFT without it keeps the copy)
    "replay_kl_weight",         # persona.distill: torch
    "padding_free",             # ms-swift, on SDPA where flash-attn is missing (persona.packing)
}
OPTIONAL_MODULES = {module for needs in OPTIONAL_PACKAGES.values() for module, _ in needs.values()}


def shipped_recipes() -> dict[str, Recipe]:
    """Every Recipe persona.recipe defines (FAST_GPU, SEED_GPU, the CPU ones) and what default_recipe returns."""
    out = {name: value for name, value in vars(recipe_module).items() if isinstance(value, Recipe)}
    out.update({f"default_recipe(cuda, {name})": recipe for name, recipe in GPU_RECIPES.items()})
    out.update({f"default_recipe(cpu, {name})": default_recipe("cpu", name) for name in GPU_RECIPES})
    return out


def base() -> BaseModel:
    return BaseModel(path="/models/x", source="test", revision="r", model_type="qwen2", template="qwen2_5",
                     own_identity=(), weights_sha256="", parameters=0, bytes=0)


def spec_says(installed: bool, only: set[str] | None = None):
    """find_spec as if the optional modules (or `only` these) were all installed, or all missing."""
    real = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        if name in (OPTIONAL_MODULES if only is None else only):
            return importlib.machinery.ModuleSpec(name, None) if installed else None
        return real(name, *args, **kwargs)
    return find_spec


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    monkeypatch.delenv(training.EXTRA_ARGS_ENV, raising=False)
    monkeypatch.delenv(training.NPROC_ENV, raising=False)


def test_every_recipe_knob_is_classified():
    """A knob that needs a package must be in the table: every field is either plain or covered."""
    covered = set(OPTIONAL_PACKAGES) | set(NEEDS_KNOB)
    unclassified = {f.name for f in fields(Recipe)} - PLAIN_KNOBS - covered
    assert not unclassified, f"classify these Recipe fields in PLAIN_KNOBS or OPTIONAL_PACKAGES: {unclassified}"
    assert not PLAIN_KNOBS & covered
    assert set(NEEDS_KNOB.values()) <= set(OPTIONAL_PACKAGES)
    assert set(PLAIN_KNOBS | covered) <= {f.name for f in fields(Recipe)}  # no stale names


@pytest.mark.parametrize("name", list(shipped_recipes()))
def test_each_knob_a_shipped_recipe_turns_on_is_covered(name):
    recipe = shipped_recipes()[name]
    defaults = {f.name: f.default for f in fields(Recipe)}
    for knob in OPTIONAL_PACKAGES:
        value = getattr(recipe, knob)
        if value != defaults[knob]:  # turned on: the table must say which package this value needs
            assert value in OPTIONAL_PACKAGES[knob], f"{name}: {knob}={value!r} is not in OPTIONAL_PACKAGES"
    for knob, needed in NEEDS_KNOB.items():
        if getattr(recipe, knob) != defaults[knob]:
            assert getattr(recipe, needed) in OPTIONAL_PACKAGES[needed], f"{name}: {knob} without {needed}"


@pytest.mark.parametrize("name", list(shipped_recipes()))
def test_each_optional_package_is_importable_or_falls_back(name):
    """With this machine's packages: a knob stays on only where its package is installed; otherwise one warning."""
    recipe = shipped_recipes()[name]
    asked = missing_packages(recipe, spec_says(installed=False))  # every optional package the recipe asks for
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ran = available_recipe(recipe)
    kw = swift_arguments(base(), "/d", ran, "cuda", "/o")
    for knob, (value, module, _) in asked.items():
        if importlib.util.find_spec(module) is not None:
            assert getattr(ran, knob) == value
        else:
            assert getattr(ran, knob) != value and kw.get(knob) != value
    missing = [k for k, (_, module, _) in asked.items() if importlib.util.find_spec(module) is None]
    assert len([w for w in caught if issubclass(w.category, MissingKernelWarning)]) == len(missing)


def test_fast_recipe_without_liger_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", spec_says(installed=False, only={"liger_kernel"}))
    with pytest.warns(MissingKernelWarning) as caught:
        ran = available_recipe(FAST_GPU)
    ours = [w for w in caught if issubclass(w.category, MissingKernelWarning)]
    assert len(ours) == 1
    message = str(ours[0].message)
    assert "\n" not in message
    assert "use_liger_kernel=True needs the Python package liger_kernel" in message and "'.[gpu]'" in message
    kw = swift_arguments(base(), "/d", ran, "cuda", "/o")
    assert "use_liger_kernel" not in kw and "liger_kernel_config" not in kw
    # Everything else is the fast recipe's: same optimization.
    assert ran == FAST_GPU.with_overrides(use_liger_kernel=False) and not ran.cudnn_attention
    lines = []
    assert available_recipe(FAST_GPU, warn=lines.append) == ran and len(lines) == 1  # a logger instead
    assert available_recipe(ran, warn=lines.append) is ran and len(lines) == 1         # nothing left to warn about


def test_fast_recipe_with_liger_keeps_it(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", spec_says(installed=True))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ran = available_recipe(FAST_GPU)
    assert ran is FAST_GPU
    kw = swift_arguments(base(), "/d", ran, "cuda", "/o")
    assert kw["use_liger_kernel"] is True and kw["liger_kernel_config"]["fused_linear_cross_entropy"] is True


def test_flash_attention_falls_back_to_sdpa_and_keeps_padding_free(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", spec_says(installed=False))
    recipe = FAST_GPU.with_overrides(attn_impl="flash_attn", padding_free=True)
    lines = []
    ran = available_recipe(recipe, warn=lines.append)
    assert len(lines) == 2  # one per missing package: liger_kernel, flash_attn
    assert any(line.startswith("attn_impl='flash_attn' needs the Python package flash_attn") for line in lines)
    assert (ran.attn_impl, ran.padding_free, ran.use_liger_kernel) == (None, True, False)
    kw = swift_arguments(base(), "/d", ran, "cuda", "/o")
    assert not {"attn_impl", "use_liger_kernel"} & set(kw) and kw["padding_free"] is True  # on SDPA
    monkeypatch.setattr(importlib.util, "find_spec", spec_says(installed=True))
    assert available_recipe(recipe, warn=lines.append) is recipe and len(lines) == 2


def test_seed_and_cpu_recipes_need_no_optional_package():
    for recipe in (SEED_GPU, CPU_DEFAULT):
        assert missing_packages(recipe, spec_says(installed=False)) == {}


def test_gpu_extra_installs_what_the_shipped_recipes_ask_for():
    """`pip install -e '.[gpu]'` (make EXTRAS=dev,gpu) brings every optional package a shipped recipe asks for,
    pinned in constraints.txt."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    gpu = project["optional-dependencies"]["gpu"]
    names = {re.split(r"[<>=!~;\[ ]", spec, maxsplit=1)[0].lower().replace("-", "_") for spec in gpu}
    pinned = {line.split("==")[0].lower().replace("-", "_") for line in (ROOT / "constraints.txt").read_text().split()
              if "==" in line}
    asked = {module for recipe in shipped_recipes().values()
             for _, module, _ in missing_packages(recipe, spec_says(installed=False)).values()}
    assert asked == {"liger_kernel", "torch.nn.attention.varlen"}
    assert "liger_kernel" in names and "liger_kernel" in pinned
    # the varlen kernel comes with torch itself, from 2.10 on (the declared floor is older: it falls back to SDPA)
    assert OPTIONAL_PACKAGES["attn_impl"]["torch_varlen"][1].startswith("PyTorch >= 2.10")


def test_fast_recipe_on_an_older_torch_packs_on_sdpa():
    def find_spec(name, *args, **kwargs):  # liger installed, a torch before 2.10
        return None if name == "torch.nn.attention.varlen" else importlib.machinery.ModuleSpec(name, None)
    lines = []
    ran = available_recipe(FAST_GPU, warn=lines.append, find_spec=find_spec)
    assert FAST_GPU.attn_impl == "torch_varlen"
    assert len(lines) == 1 and "attn_impl='torch_varlen' needs" in lines[0] and "PyTorch >= 2.10" in lines[0]
    assert (ran.attn_impl, ran.padding_free, ran.use_liger_kernel) == (None, True, True)
    kw = swift_arguments(base(), "/d", ran, "cuda", "/o")
    assert "attn_impl" not in kw and kw["padding_free"] is True  # the block-diagonal mask (persona.packing)


def test_a_dotted_module_whose_parent_is_missing_counts_as_missing():
    def find_spec(name):
        raise ModuleNotFoundError(f"No module named {name.split('.')[0]!r}")
    assert set(missing_packages(FAST_GPU, find_spec)) == {"use_liger_kernel", "attn_impl"}


def test_train_lora_falls_back_before_the_child_starts(tmp_path, monkeypatch):
    """The product's path: the job handed to the training child has no use_liger_kernel, the warning is given once
    (warnings and on_output), and the child would have been started anyway."""
    monkeypatch.setattr(importlib.util, "find_spec", spec_says(installed=False, only={"liger_kernel"}))
    copy = tmp_path / "job.json"

    def fake_child(job_file, world_size=1, python=None):  # copies the job and exits without a result
        return [sys.executable, "-c", "import shutil, sys; shutil.copy(sys.argv[1], sys.argv[2])", str(job_file),
                str(copy)]

    monkeypatch.setattr(training, "launch_command", fake_child)
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "你是谁?"},
                                             {"role": "assistant", "content": "我是助手。"}]}) + "\n")
    output = []
    with pytest.warns(MissingKernelWarning) as caught, pytest.raises(TrainingError, match="training failed"):
        train_lora(base(), data, FAST_GPU, tmp_path / "adapter", "cuda", on_output=output.append)
    ours = [w for w in caught if issubclass(w.category, MissingKernelWarning)]
    assert len(ours) == 1
    assert [line for line in output if "warning" in line] == [f"[persona] warning: {ours[0].message}"]
    job = json.loads(copy.read_text())
    assert "use_liger_kernel" not in job["swift_args"] and job["swift_args"]["per_device_train_batch_size"] == 16
    assert job["cudnn_attention"] is False
    assert not (tmp_path / "adapter").exists()
