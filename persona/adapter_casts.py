"""Under bf16 mixed precision, LoRA layers take their input as it comes instead of a float32 copy of it.

PEFT keeps the adapter's weights in float32 and casts each LoRA layer's input to their dtype before the dropout and
the two small matrix multiplies (peft's `_cast_input_dtype`). Under autocast, which is how a bf16 recipe trains,
those multiplies cast the input straight back to bf16: per LoRA layer and forward pass, a float32 copy of the input,
the dropout on twice the bytes, a cast back, and the two casts' backward. On the 7B shape that is ~1,200 kernel
launches of a ~10,000-launch step that the CPU cannot issue fast enough (BENCHMARKS.md, the profile of the packed
step). Without the copy the dropout runs on the bf16 input and autocast multiplies it by the bf16-cast weights, as
it did before: the same products, the weights and their gradients still in float32.

The switch is PEFT's own: the `cast_input_dtype_enabled` attribute of its tuner layers, the one its helper
`peft.helpers.disable_input_dtype_casting` sets. A trainer callback registered by name in the training child
(persona.train_worker) sets it when training begins, and only under mixed precision (bf16 or fp16): without
autocast, a bf16 input could not meet float32 weights.
"""
from __future__ import annotations

CALLBACK = "persona_lora_input_as_is"


def keep_input_dtype(model) -> int:
    """Turn PEFT's input cast off in every tuner layer of `model`; returns how many layers were changed."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    for layer in layers:
        layer.cast_input_dtype_enabled = False
    return len(layers)


def register() -> None:
    """Make the callback known to ms-swift by name (SftArguments(callbacks=[CALLBACK]))."""
    from swift.callbacks import TrainerCallback, callbacks_map

    class LoraInputAsIs(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            if model is not None and (args.bf16 or args.fp16):
                count = keep_input_dtype(model)
                if state.is_world_process_zero:
                    print(f"[persona] {count} LoRA layers take their bf16 input as is (no float32 copy)", flush=True)

    callbacks_map[CALLBACK] = LoraInputAsIs
