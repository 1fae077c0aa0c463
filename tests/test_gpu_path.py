"""The GPU path's logic, on the CPU: recipe selection, ms-swift arguments, the torchrun launcher, the pre-flight
VRAM estimate and its refusal. Nothing here needs a GPU, ms-swift's training or a real model."""
import json
import sys
from pathlib import Path

import pytest

from persona import preflight
from persona.models import BaseModel
from persona.preflight import GIB, ModelShape, PreflightError, estimate_for_recipe, estimate_vram, lora_parameters
from persona.recipe import (CPU_DEFAULT, CPU_DTYPE_ENV, CPU_SMALL, SMALL_MODEL_PARAMETERS, cpu_dtype, resolve_dtype,
                            default_general_ratio,
                            FAST_GPU, RECIPE_ENV, SEED_GPU, Recipe, default_recipe, recipe_name,
                            scale_for_world)
from persona.training import (EXTRA_ARGS_ENV, NPROC_ENV, PREFLIGHT_FILE, PreflightFailed, TrainingError, _result,
                              child_env, launch_command, liger_kernel_config, swift_arguments, train_lora,
                              world_size_from_env)

QWEN25_7B = dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                 num_attention_heads=28, num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in (RECIPE_ENV, EXTRA_ARGS_ENV, NPROC_ENV, "CUDA_VISIBLE_DEVICES", "PYTORCH_CUDA_ALLOC_CONF",
                 "PERSONA_SKIP_PREFLIGHT", "PERSONA_FAKE_FREE_VRAM_GIB"):
        monkeypatch.delenv(name, raising=False)


def base(path="/models/x", model_type="qwen2", template="qwen2_5", parameters=0) -> BaseModel:
    return BaseModel(path=str(path), source="test", revision="r", model_type=model_type, template=template,
                     own_identity=(), weights_sha256="", parameters=parameters, bytes=0)


# --- recipes --------------------------------------------------------------------------------------------------

def test_cpu_default_uses_no_gpu_features():
    for recipe in (CPU_DEFAULT, CPU_SMALL):
        assert not recipe.use_liger_kernel and not recipe.gradient_checkpointing


def test_cpu_recipe_follows_the_model_size(monkeypatch):
    """The rule in persona/recipe.py: up to 300M parameters lr 3e-3 for 2 epochs (SmolLM2-135M needs it to move);
    above, lr 5e-4 for 1 epoch (3e-3 wipes out Qwen2.5-0.5B's general answers)."""
    monkeypatch.setenv(CPU_DTYPE_ENV, "float32")
    smollm, qwen_05b, qwen_7b = 134_515_008, 630_167_424, 7_615_616_512
    small, default, large = (default_recipe("cpu", parameters=n) for n in (smollm, qwen_05b, qwen_7b))
    assert (small.learning_rate, small.num_train_epochs) == (3e-3, 2)
    assert (default.learning_rate, default.num_train_epochs) == (5e-4, 1)
    # above 300M: attention-only LoRA, replay rows kept close to the base model (KL x 3); SmolLM2 as measured
    assert default.target_modules == ("q_proj", "k_proj", "v_proj", "o_proj") and default.replay_kl_weight == 3.0
    assert small.target_modules == ("all-linear",) and small.replay_kl_weight == 0.0
    # and 1.25 replay rows per identity row where that recipe trains, half a row elsewhere
    assert [default_general_ratio("cpu", n) for n in (smollm, qwen_05b, qwen_7b, None)] == [0.5, 1.25, 1.25, 1.25]
    assert {default_general_ratio("cuda", n) for n in (smollm, qwen_05b, qwen_7b, None)} == {0.5}
    assert large == default and default_recipe("cpu") == default  # unknown size: the embedded default's recipe
    assert default_recipe("cpu", parameters=SMALL_MODEL_PARAMETERS) == small
    assert default_recipe("cpu", parameters=SMALL_MODEL_PARAMETERS + 1) == default
    for n in (smollm, qwen_05b, qwen_7b):  # the GPU recipes do not depend on the model
        assert default_recipe("cuda", parameters=n) is FAST_GPU
        assert default_recipe("cuda", "seed", parameters=n) is SEED_GPU


def test_cpu_dtype_is_bf16_where_the_cpu_has_bf16_instructions(tmp_path, monkeypatch):
    monkeypatch.delenv(CPU_DTYPE_ENV, raising=False)
    info = tmp_path / "cpuinfo"
    info.write_text("processor : 0\nflags : fpu sse avx512f avx512_bf16 fma\n")
    assert cpu_dtype(str(info))[0] == "bfloat16" and "avx512_bf16" in cpu_dtype(str(info))[1]
    info.write_text("processor : 0\nflags : fpu sse avx2 amx_bf16 amx_tile\n")
    assert cpu_dtype(str(info))[0] == "bfloat16"
    info.write_text("processor : 0\nflags : fpu sse avx2 fma\n")
    assert cpu_dtype(str(info)) == ("float32", "the CPU has no bf16 matrix instructions (amx_bf16, avx512_bf16)")
    assert cpu_dtype(str(tmp_path / "absent"))[0] == "float32"
    monkeypatch.setenv(CPU_DTYPE_ENV, "float32")  # the override wins
    info.write_text("flags : avx512_bf16\n")
    assert cpu_dtype(str(info)) == ("float32", f"${CPU_DTYPE_ENV}=float32")
    assert default_recipe("cpu").torch_dtype == "float32"
    monkeypatch.setenv(CPU_DTYPE_ENV, "bfloat16")
    assert default_recipe("cpu").torch_dtype == "bfloat16"
    assert resolve_dtype(CPU_DEFAULT, "cuda").torch_dtype == "bfloat16"
    monkeypatch.setenv(CPU_DTYPE_ENV, "fp8")
    with pytest.raises(ValueError, match="use bfloat16 or float32"):
        cpu_dtype(str(info))


def test_gpu_default_is_fast_and_seed_stays_selectable(monkeypatch):
    assert default_recipe("cuda") is FAST_GPU
    assert default_recipe("cuda", "seed") is SEED_GPU
    monkeypatch.setenv(RECIPE_ENV, "seed")
    assert default_recipe("cuda") is SEED_GPU
    assert default_recipe("cuda", "fast") is FAST_GPU  # the argument wins over the environment
    assert default_recipe("cpu") is SEED_GPU            # asked for by name, on any device
    monkeypatch.setenv(RECIPE_ENV, "turbo")
    with pytest.raises(ValueError, match="unknown recipe 'turbo'"):
        recipe_name()


def test_fast_recipe_keeps_the_seeds_optimization():
    same = ("learning_rate", "num_train_epochs", "warmup_ratio", "lora_rank", "lora_alpha", "lora_dropout",
            "target_modules", "torch_dtype", "max_length", "seed", "system")
    assert {k: getattr(FAST_GPU, k) for k in same} == {k: getattr(SEED_GPU, k) for k in same}
    assert FAST_GPU.samples_per_step == SEED_GPU.samples_per_step == 16
    assert FAST_GPU.gradient_accumulation_steps == 1 and FAST_GPU.gradient_checkpointing
    assert FAST_GPU.use_liger_kernel and FAST_GPU.liger_kernels == ("fused_linear_cross_entropy",)
    assert FAST_GPU.padding_free and not SEED_GPU.padding_free  # the seed's own layout stays the reference


def test_params_round_trip_and_overrides():
    for r in (FAST_GPU, SEED_GPU, CPU_DEFAULT):
        assert Recipe.from_params(r.as_params()) == r
        assert all(isinstance(v, (str, int, float, bool, type(None))) for v in r.as_params().values())
    r = FAST_GPU.with_overrides(liger_kernels="all", target_modules=["q_proj", "v_proj"], learning_rate=None)
    assert r.liger_kernels == ("all",) and r.target_modules == ("q_proj", "v_proj")
    assert r.learning_rate == FAST_GPU.learning_rate
    with pytest.raises(ValueError, match="unknown recipe field"):
        FAST_GPU.with_overrides(recipe="fast")
    # replay rows held to the base model (KL) need a row per sample: asking for them turns the packing off,
    # unless padding_free is asked for too (then persona.distill says it learns them as plain targets)
    assert not FAST_GPU.with_overrides(replay_kl_weight=2.0).padding_free
    assert FAST_GPU.with_overrides(replay_kl_weight=2.0, padding_free=True).padding_free
    assert FAST_GPU.with_overrides(replay_kl_weight=0.0).padding_free


@pytest.mark.parametrize("bs,ga,world,expect", [
    (16, 1, 1, (16, 1)), (16, 1, 2, (8, 1)), (16, 1, 8, (2, 1)), (1, 16, 2, (1, 8)), (4, 2, 8, (1, 1)),
    (2, 4, 4, (2, 1)), (2, 6, 4, (1, 3)),
])
def test_scale_for_world_keeps_samples_per_step(bs, ga, world, expect):
    r = scale_for_world(FAST_GPU.with_overrides(per_device_train_batch_size=bs, gradient_accumulation_steps=ga),
                        world)
    assert (r.per_device_train_batch_size, r.gradient_accumulation_steps) == expect
    assert r.samples_per_step * world == bs * ga


def test_scale_for_world_refuses_uneven_split():
    with pytest.raises(ValueError, match="cannot be split evenly over 2 GPUs"):
        scale_for_world(FAST_GPU.with_overrides(per_device_train_batch_size=3, gradient_accumulation_steps=1), 2)


# --- ms-swift arguments -----------------------------------------------------------------------------------------

def test_swift_arguments_fast_gpu():
    kw = swift_arguments(base(), "/d/train.jsonl", FAST_GPU, "cuda", "/tmp/out")
    assert kw["per_device_train_batch_size"] == 16 and kw["gradient_accumulation_steps"] == 1
    assert kw["gradient_checkpointing"] is True and kw["torch_dtype"] == "bfloat16"
    assert kw["use_liger_kernel"] is True
    assert kw["liger_kernel_config"] == {"rope": False, "rms_norm": False, "swiglu": False, "cross_entropy": False,
                                         "fused_linear_cross_entropy": True}
    assert kw["lora_dropout"] == 0.05 and kw["dataloader_num_workers"] == 0
    assert kw["save_steps"] >= 10**9 and kw["split_dataset_ratio"] == 0  # no mid-run checkpoints or evaluation
    assert kw["include_num_input_tokens_seen"] == "non_padding"
    assert "use_cpu" not in kw
    assert kw["padding_free"] is True  # one row of the micro-batch's samples (persona.packing)
    assert kw["attn_impl"] == "torch_varlen"  # PyTorch's varlen flash kernel over that row (persona.packing)
    assert (kw["model_type"], kw["template"]) == ("qwen2", "qwen2_5")


def test_swift_arguments_seed_and_cpu():
    seed = swift_arguments(base(), "/d", SEED_GPU, "cuda", "/o")
    assert "use_liger_kernel" not in seed and seed["gradient_accumulation_steps"] == 16
    cpu = swift_arguments(base(model_type=None, template=None), "/d", CPU_DEFAULT, "cpu", "/o")
    assert cpu["use_cpu"] is True and "use_liger_kernel" not in cpu and "model_type" not in cpu
    # a frozen output layer fed a non-contiguous slice is slow on a CPU (BENCHMARKS.md)
    assert cpu["use_logits_to_keep"] is False and "use_logits_to_keep" not in seed
    assert cpu["loss_scale"] == seed["loss_scale"] == "last_round"  # a row's history is context, not a target
    workers = swift_arguments(base(), "/d", FAST_GPU.with_overrides(dataloader_num_workers=2), "cuda", "/o")
    assert workers["dataloader_persistent_workers"] is True
    flash = swift_arguments(base(), "/d", FAST_GPU.with_overrides(attn_impl="flash_attn", padding_free=True,
                                                                  liger_kernels="all"), "cuda", "/o")
    assert flash["attn_impl"] == "flash_attn" and flash["padding_free"] is True
    assert "liger_kernel_config" not in flash  # 'all': Liger's own defaults


def test_extra_swift_arguments_from_environment(monkeypatch):
    monkeypatch.setenv(EXTRA_ARGS_ENV, json.dumps({"logging_nan_inf_filter": False, "lora_dropout": 0.1}))
    kw = swift_arguments(base(), "/d", FAST_GPU, "cuda", "/o")
    assert kw["logging_nan_inf_filter"] is False and kw["lora_dropout"] == 0.1
    monkeypatch.setenv(EXTRA_ARGS_ENV, "{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        swift_arguments(base(), "/d", FAST_GPU, "cuda", "/o")


def test_liger_kernel_config():
    assert liger_kernel_config(("all",)) is None
    assert liger_kernel_config(("rms_norm", "swiglu"))["swiglu"] is True
    with pytest.raises(ValueError, match="unknown Liger kernel"):
        liger_kernel_config(("flash",))


# --- the launcher -----------------------------------------------------------------------------------------------

def test_world_size_from_env():
    assert world_size_from_env("cuda", {}) == 1
    assert world_size_from_env("cuda", {NPROC_ENV: "4"}) == 4
    assert world_size_from_env("cpu", {NPROC_ENV: "4"}) == 1
    for bad in ("two", "0"):
        with pytest.raises(ValueError, match=NPROC_ENV):
            world_size_from_env("cuda", {NPROC_ENV: bad})


def test_launch_command_single_and_torchrun():
    assert launch_command("/w/job.json", 1, python="py") == ["py", "-m", "persona.train_worker", "/w/job.json"]
    cmd = launch_command("/w/job.json", 2, python="py")
    assert cmd[:3] == ["py", "-m", "torch.distributed.run"]
    assert cmd[cmd.index("--nproc_per_node") + 1] == "2" and "--standalone" in cmd
    assert cmd[-3:] == ["-m", "persona.train_worker", "/w/job.json"]


def test_child_env():
    one = child_env("cuda", 1, base={"PATH": "/bin", NPROC_ENV: "1"})
    assert one["CUDA_VISIBLE_DEVICES"] == "0"  # one process sees one GPU: no device_map over several
    assert one["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True" and NPROC_ENV not in one
    assert one["HF_HUB_OFFLINE"] == "1"
    mine = child_env("cuda", 1, base={"CUDA_VISIBLE_DEVICES": "3", "PYTORCH_CUDA_ALLOC_CONF": "x"})
    assert mine["CUDA_VISIBLE_DEVICES"] == "3" and mine["PYTORCH_CUDA_ALLOC_CONF"] == "x"
    two = child_env("cuda", 2, base={})
    assert two[NPROC_ENV] == "2" and "CUDA_VISIBLE_DEVICES" not in two
    cpu = child_env("cpu", 1, base={"MODELSCOPE_API_TOKEN": "secret", "HF_TOKEN": "secret"})
    assert "CUDA_VISIBLE_DEVICES" not in cpu and "PYTORCH_CUDA_ALLOC_CONF" not in cpu
    assert "MODELSCOPE_API_TOKEN" not in cpu and "HF_TOKEN" not in cpu  # the training child never logs in


def test_train_result_reads_old_and_new_worker_output(tmp_path):
    raw = {"log_history": [{"loss": 2.0, "step": 1, "num_input_tokens_seen": 100},
                           {"train_runtime": 4.0, "step": 1, "num_input_tokens_seen": 100}],
           "global_step": 1, "wall_seconds": 5.0, "peak_memory_gib": 1.5, "last_model_checkpoint": "x"}
    r = _result(raw, tmp_path)
    assert (r.train_seconds, r.num_tokens, r.tokens_per_second, r.world_size) == (4.0, 100, 25.0, 1)
    assert "log_history" not in r.summary()


# --- the pre-flight estimate -----------------------------------------------------------------------------------

def test_shape_counts_qwen25_7b():
    shape = ModelShape.from_config(QWEN25_7B)
    assert shape.parameters == 7_615_616_512          # Qwen2.5-7B's published parameter count
    assert shape.matmul_parameters() == 7_070_285_824
    assert lora_parameters(shape, 8) == 28 * 8 * (2 * (3584 + 3584) + 2 * (3584 + 512) + 3 * (3584 + 18944))
    assert lora_parameters(shape, 8, ["q_proj", "v_proj"]) == 28 * 8 * ((3584 + 3584) + (3584 + 512))


def test_estimate_parts_move_the_right_way():
    shape = ModelShape.from_config(QWEN25_7B)
    fast = estimate_for_recipe(shape, FAST_GPU, 100)
    assert fast.weights == shape.parameters * 2
    assert fast.lora_state == lora_parameters(shape, 8) * 16
    no_gc = estimate_for_recipe(shape, FAST_GPU.with_overrides(gradient_checkpointing=False), 100)
    no_liger = estimate_for_recipe(shape, FAST_GPU.with_overrides(use_liger_kernel=False), 100)
    seed = estimate_for_recipe(shape, SEED_GPU, 100)
    assert no_gc.activations > 5 * fast.activations   # every layer's activations instead of one layer's
    assert no_liger.logits > 10 * fast.logits           # the (tokens x vocabulary) logits come back
    assert seed.total < fast.total < no_liger.total < no_gc.total
    longer = estimate_for_recipe(shape, FAST_GPU, 400)
    assert longer.activations > 3 * fast.activations
    capped = estimate_for_recipe(shape, FAST_GPU.with_overrides(max_length=100), 400)
    assert capped.seq_len == 100
    full_liger = estimate_vram(shape, micro_batch=16, seq_len=100, gradient_checkpointing=True,
                               use_liger_kernel=True, liger_kernels=("all",))
    assert full_liger.activations < fast.activations


def test_check_fits_and_suggestions():
    shape = ModelShape.from_config(QWEN25_7B)
    est = estimate_for_recipe(shape, FAST_GPU.with_overrides(gradient_checkpointing=False), 100)
    preflight.check_fits(est, free_bytes=int(est.total * 1.2))  # fits: no error
    free = int(est.total * 0.8)
    hints = preflight.suggestions(shape, FAST_GPU.with_overrides(gradient_checkpointing=False), 100, free)
    assert hints and hints[0] == "gradient_checkpointing=True"
    with pytest.raises(PreflightError, match=r"needs about .* GiB .* has .* GiB free.*gradient_checkpointing=True"):
        preflight.check_fits(est, free, 24 * GIB, "GPU 0", hints)
    tiny = preflight.suggestions(shape, FAST_GPU, 100, 8 * GIB)
    assert any("a GPU with at least" in h for h in tiny)


def test_longest_sample_tokens(tmp_path):
    alpaca = tmp_path / "a.json"
    alpaca.write_text(json.dumps([{"instruction": "你是谁?", "input": "", "output": "我是助手。"},
                                  {"instruction": "q" * 50, "input": "", "output": "a"}]), encoding="utf-8")
    chat = tmp_path / "c.jsonl"
    chat.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": "x" * n},
                                                       {"role": "assistant", "content": "y"}]}) for n in (3, 9)))
    assert preflight.longest_sample_tokens(alpaca, per_message=0, fixed=0) == 51
    assert preflight.longest_sample_tokens(chat, system="sys", per_message=0, fixed=0) == 3 + len("user") + 9 + \
        len("assistant") + 1
    assert preflight.longest_sample_tokens(alpaca, count=lambda t: 1, per_message=0, fixed=0) == 2


def model_and_rows(tmp_path, monkeypatch) -> tuple[Path, Path]:
    """A folder with Qwen2.5-7B's config and four Alpaca rows of 20-400 words; no tokenizer: a token a character."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(QWEN25_7B))
    data = tmp_path / "a.json"
    data.write_text(json.dumps([{"instruction": " ".join(["word"] * n), "input": "", "output": "a"}
                                for n in (20, 400, 60, 300)]))
    monkeypatch.setattr(preflight, "tokenizer_counter", lambda path: None)
    return model, data


def test_padding_free_estimate_counts_the_longest_samples_end_to_end(tmp_path, monkeypatch):
    """A padding-free micro-batch is one row of its samples: the estimate takes the worst, the batch's longest
    samples together, instead of batch x the longest sample."""
    from persona.training import preflight_job

    assert preflight.packed_tokens([5, 50, 7, 40, 3], 2) == 90
    assert preflight.packed_tokens([5, 7], 16) == 12
    # many micro-batches of a large set: the expected largest random row, between the mean row and the worst one
    lengths = [100 + (i * 37) % 600 for i in range(1000)]
    mean_row, worst = 16 * sum(lengths) / len(lengths), sum(sorted(lengths)[-16:])
    expected = preflight.packed_tokens(lengths, 16, micro_batches=189)
    assert mean_row < expected < worst and expected < preflight.packed_tokens(lengths, 16, micro_batches=10**6)
    assert preflight.packed_tokens(lengths, 16, micro_batches=1) == worst
    model, data = model_and_rows(tmp_path, monkeypatch)
    recipe = FAST_GPU.with_overrides(per_device_train_batch_size=2)
    padded, packed = (preflight_job(base(model), str(data), recipe.with_overrides(padding_free=pf)) for pf in (0, 1))
    lengths = preflight.sample_tokens(data, recipe.system)
    assert padded["seq_len"] == max(lengths) and padded["estimate"]["micro_batch"] == 2
    assert packed["seq_len"] == sum(sorted(lengths)[-2:]) and packed["estimate"]["micro_batch"] == 1
    assert packed["total_bytes"] < padded["total_bytes"]  # 400 + 300 tokens, not 2 x 400
    # max_length caps each sample, not the packed row
    short = preflight_job(base(model), str(data), recipe.with_overrides(max_length=450))
    assert short["seq_len"] == sum(sorted(min(n, 450) for n in lengths)[-2:]) > 450
    assert short["estimate"]["seq_len"] == short["seq_len"]


# --- the refusal, end to end through the launcher (the child stops before loading any weight) ---------------------

@pytest.mark.slow
def test_train_lora_refuses_before_loading(tmp_path, monkeypatch):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(QWEN25_7B))
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "你是谁?"},
                                             {"role": "assistant", "content": "我是助手。"}]}) + "\n")
    monkeypatch.setenv("PERSONA_FAKE_FREE_VRAM_GIB", "10")
    root = str(Path(__file__).resolve().parent.parent)
    monkeypatch.setenv("PYTHONPATH", root + (":" + sys.path[0] if sys.path[0] else ""))
    target = tmp_path / "adapter"
    with pytest.raises(PreflightFailed, match=r"10\.0 GiB free.*a GPU with at least") as info:
        train_lora(base(model), data, FAST_GPU, target, "cuda")
    assert isinstance(info.value, TrainingError) and isinstance(info.value, PreflightError)
    assert not target.exists()


def test_worker_preflight_writes_its_refusal(tmp_path, monkeypatch):
    from persona import train_worker

    shape = ModelShape.from_config(QWEN25_7B)
    est = estimate_for_recipe(shape, FAST_GPU, 100)
    job = {"device": "cuda", "swift_args": {"output_dir": str(tmp_path)},
           "preflight": {"estimate": est.__dict__, "shape": shape.__dict__, "seq_len": 100,
                         "recipe": FAST_GPU.as_params(), "total_bytes": est.total}}
    job_file = tmp_path / "job.json"
    job_file.write_text(json.dumps(job))
    monkeypatch.setattr(preflight, "free_cuda_memory", lambda i: (4 * GIB, 24 * GIB, "GPU 0 (test)"))
    with pytest.raises(SystemExit) as exit_info:
        train_worker.main(str(job_file))
    assert exit_info.value.code == 3
    refusal = json.loads((tmp_path / PREFLIGHT_FILE).read_text())
    assert "4.0 GiB free of 24.0 GiB" in refusal["message"]
    monkeypatch.setenv("PERSONA_SKIP_PREFLIGHT", "1")
    train_worker.run_preflight(job, 0)  # skipped: no error


def test_replay_rows_add_their_logits_to_the_estimate_and_the_hints_offer_plain_targets(tmp_path):
    shape = ModelShape.from_config(QWEN25_7B)
    kl = FAST_GPU.with_overrides(replay_kl_weight=1.0)
    plain = estimate_for_recipe(shape, kl, 130)
    replay = estimate_for_recipe(shape, kl, 130, replay_rows=True)
    tokens = FAST_GPU.per_device_train_batch_size * 130
    assert replay.logits == tokens * shape.vocab * 24 and plain.logits < replay.logits / 50  # Liger keeps no logits
    assert estimate_for_recipe(shape, FAST_GPU, 130, replay_rows=True) == plain  # default: plain targets
    free = int(plain.total * 1.1)  # fits without the KL's logits, not with them
    hints = preflight.suggestions(shape, kl, 130, free, replay_rows=True)
    assert hints[0].startswith("replay_kl_weight=0")

    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"messages": []}) + "\n")
    assert not preflight.has_replay_rows(data)
    data.write_text(json.dumps({"messages": []}) + "\n" + json.dumps({"messages": [], "channel": "replay"}) + "\n")
    assert preflight.has_replay_rows(data)


def test_progress_comes_from_ms_swifts_logging_file(tmp_path):
    """Progress is read from the logging.jsonl ms-swift appends to, not from its printed dicts: records written
    before (an interrupted attempt's, in a resumed folder) are skipped, and a half-written record waits."""
    from persona.training import PROGRESS_FILE, ProgressLog

    log = tmp_path / PROGRESS_FILE
    log.write_text(json.dumps({"loss": 9.0, "global_step/max_steps": "1/4"}) + "\n")  # the earlier attempt
    progress = ProgressLog(tmp_path)
    assert progress.new() == []
    step2 = json.dumps({"loss": 2.5, "global_step/max_steps": "2/4", "elapsed_time": "3s"})
    with open(log, "a") as f:
        f.write(step2 + "\n" + json.dumps({"train_runtime": 5.0}) + "\n" + step2[:10])  # summary, then half a line
    assert progress.new() == [json.loads(step2)]  # the summary has no step; the half line waits
    with open(log, "a") as f:
        f.write(step2[10:] + "\n")
    assert progress.new() == [json.loads(step2)] and progress.new() == []
    assert ProgressLog(tmp_path / "elsewhere").new() == []  # no file yet: nothing


# --- gradient checkpointing only where the memory needs it (Recipe.checkpointing_if_needed) ------------------------

def test_the_fast_recipe_checkpoints_only_if_needed_unless_told(tmp_path, monkeypatch):
    from persona.training import preflight_job

    assert FAST_GPU.gradient_checkpointing and FAST_GPU.checkpointing_if_needed
    assert not SEED_GPU.checkpointing_if_needed and not CPU_DEFAULT.checkpointing_if_needed
    told = FAST_GPU.with_overrides(gradient_checkpointing=True)  # an explicit choice is kept, whatever the memory
    assert told.gradient_checkpointing and not told.checkpointing_if_needed
    assert FAST_GPU.with_overrides(learning_rate=1e-4).checkpointing_if_needed  # other overrides keep it
    model, data = model_and_rows(tmp_path, monkeypatch)
    job = preflight_job(base(model), str(data), FAST_GPU)
    assert job["without_checkpointing"]["activations"] > job["estimate"]["activations"]
    assert job["without_checkpointing"]["weights"] == job["estimate"]["weights"]
    assert "without_checkpointing" not in preflight_job(base(model), str(data), told)
    assert "without_checkpointing" not in preflight_job(base(model), str(data), SEED_GPU)


def test_the_training_child_turns_checkpointing_off_only_when_the_estimate_without_it_fits(tmp_path, monkeypatch,
                                                                                           capsys):
    import swift

    from persona import packing, train_worker

    shape = ModelShape.from_config(QWEN25_7B)
    on = estimate_for_recipe(shape, FAST_GPU, 2000)
    off = estimate_for_recipe(shape, FAST_GPU.with_overrides(gradient_checkpointing=False), 2000)
    assert off.total > on.total * 1.1
    job = {"device": "cuda", "swift_args": {"output_dir": str(tmp_path), "gradient_checkpointing": True},
           "preflight": {"estimate": on.__dict__, "without_checkpointing": off.__dict__, "shape": shape.__dict__,
                         "seq_len": 2000, "recipe": FAST_GPU.as_params(), "total_bytes": on.total}}
    job_file = tmp_path / "job.json"
    job_file.write_text(json.dumps(job))
    built = []

    class Stop(Exception):
        pass

    def fake_sft_main(args):
        built.append(args)
        raise Stop

    monkeypatch.setattr(packing, "sft_arguments", lambda cls, args: args)
    monkeypatch.setattr(swift, "sft_main", fake_sft_main)
    for free, checkpointing in ((off.total * 1.3, False),  # room for the run without it: off
                                (off.total * 1.1, True),   # fits without it, but not with the off-margin: kept
                                (on.total * 1.1, True)):   # room only with it
        monkeypatch.setattr(preflight, "free_cuda_memory", lambda i, f=free: (int(f), 80 * GIB, "GPU 0 (test)"))
        with pytest.raises(Stop):
            train_worker.main(str(job_file))
        assert built.pop()["gradient_checkpointing"] is checkpointing, free / GIB
        said = capsys.readouterr().out
        assert ("gradient checkpointing off: the estimate without it" in said) is (not checkpointing)
    job["preflight"].pop("without_checkpointing")  # a recipe told to checkpoint: no estimate without it, kept on
    job_file.write_text(json.dumps(job))
    monkeypatch.setattr(preflight, "free_cuda_memory", lambda i: (200 * GIB, 200 * GIB, "GPU 0 (test)"))
    with pytest.raises(Stop):
        train_worker.main(str(job_file))
    assert built.pop()["gradient_checkpointing"] is True
