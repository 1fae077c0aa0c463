"""LoRA layers under bf16 autocast without PEFT's float32 copy of their input (persona.adapter_casts)."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest


class CastCounter:
    """Counts the dtype casts (aten._to_copy) that run inside it."""

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                import torch

                if func is torch.ops.aten._to_copy.default:
                    counter.casts += 1
                return func(*args, **(kwargs or {}))

        self.casts = 0
        self.mode = Mode()
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)


def tiny_peft_model():
    """Two bf16 linear layers with float32 LoRA weights, as ms-swift trains a bf16 model."""
    import torch
    from peft import LoraConfig, get_peft_model
    from torch import nn

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32)).to(torch.bfloat16)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=16, target_modules=["0", "2"], lora_dropout=0.0,
                                            init_lora_weights=False))
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return model


def step(model, x):
    import torch

    model.zero_grad()
    with CastCounter() as counter:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = model(x)
        y.float().square().sum().backward()
    return y.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad], counter.casts


def test_without_the_input_copy_the_products_and_gradients_are_the_same_with_fewer_casts():
    import torch

    from persona.adapter_casts import keep_input_dtype

    model = tiny_peft_model()
    x = torch.randn(8, 32, dtype=torch.bfloat16)
    y_before, grads_before, casts_before = step(model, x)
    assert keep_input_dtype(model) == 2
    y_after, grads_after, casts_after = step(model, x)
    assert torch.equal(y_before, y_after)  # autocast multiplied the same bf16 values either way
    for before, after in zip(grads_before, grads_after):
        assert before.dtype == after.dtype == torch.float32  # the adapter still trains in float32
        assert torch.equal(before, after)
    assert casts_after == casts_before - 3 * 2  # per layer: the copy, autocast's cast back, the copy's backward


def test_the_callback_leaves_layers_alone_without_mixed_precision():
    pytest.importorskip("swift")
    from swift.callbacks import callbacks_map

    from persona import adapter_casts

    adapter_casts.register()
    callback = callbacks_map[adapter_casts.CALLBACK](None, None)
    state = SimpleNamespace(is_world_process_zero=True)
    model = tiny_peft_model()
    callback.on_train_begin(SimpleNamespace(bf16=False, fp16=False), state, None, model=model)
    layers = [m for m in model.modules() if hasattr(m, "cast_input_dtype_enabled")]
    assert layers and all(m.cast_input_dtype_enabled for m in layers)  # float32 training: bf16 input can't meet it
    callback.on_train_begin(SimpleNamespace(bf16=True, fp16=False), state, None, model=model)
    assert not any(m.cast_input_dtype_enabled for m in layers)


def test_the_recipe_switch_reaches_ms_swift_as_a_callback(tiny_model):
    from persona.adapter_casts import CALLBACK
    from persona.models import from_local_dir
    from persona.recipe import FAST_GPU
    from persona.training import swift_arguments

    base = from_local_dir(str(tiny_model))
    assert FAST_GPU.lora_input_cast is False
    assert CALLBACK in swift_arguments(base, "d.json", FAST_GPU, "cuda", "/tmp/o")["callbacks"]
    kept = FAST_GPU.with_overrides(lora_input_cast=True)
    assert CALLBACK not in swift_arguments(base, "d.json", kept, "cuda", "/tmp/o").get("callbacks", [])


@pytest.mark.slow
def test_a_bf16_training_child_trains_the_same_without_the_copy(tiny_model, tmp_path):
    """ms-swift's own trainer, bf16 on a CPU (autocast): the callback runs and the losses stay the same."""
    from persona.models import from_local_dir
    from persona.recipe import CPU_SMALL
    from persona.training import train_lora

    rows = [{"instruction": f"Question {i}: who are you?", "input": "",
             "output": " ".join(["I am Swift-Robot, made by the persona team."] * (1 + i % 3))} for i in range(8)]
    data = tmp_path / "rows.json"
    data.write_text(json.dumps(rows))
    recipe = CPU_SMALL.with_overrides(num_train_epochs=1, per_device_train_batch_size=2, logging_steps=1,
                                      lora_dropout=0.0, torch_dtype="bfloat16")
    losses, outputs = {}, {}
    for cast in (True, False):
        lines: list[str] = []
        result = train_lora(from_local_dir(str(tiny_model)), data, recipe.with_overrides(lora_input_cast=cast),
                            tmp_path / f"adapter-{cast}", "cpu", on_output=lines.append)
        losses[cast] = [h["loss"] for h in result.log_history if "loss" in h]
        outputs[cast] = "\n".join(lines)
    assert "take their bf16 input as is" in outputs[False]
    assert "take their bf16 input as is" not in outputs[True]
    assert len(losses[False]) == 4
    assert losses[False] == pytest.approx(losses[True], rel=1e-3)
