"""PEFT's LoRA forward with fewer kernels, for training steps that are bound by the CPU issuing kernels.

PEFT computes `result + lora_B(lora_A(dropout(x.to(fp32)))) * scaling` through three modules. Under bf16 autocast
with fp32 adapter weights (what ms-swift sets up) that is ~9 kernels per LoRA layer forward (casts of the input
and of both adapter weights, dropout, two matmuls, scale, add), ~9 again in the gradient-checkpointing
recomputation and ~12 in backward, each issued by Python. On a 7B model at 16 short samples per step the GPU
finishes them faster than the CPU issues them, so fewer of them shorten the step (−6 % train time and 0.16 GiB
less peak on the seed workload, BENCHMARKS.md).

`LoraDelta` computes the same function as one autograd node:

    forward:  xd = dropout(x); h = xd @ A^T; out = addmm(result, h, B^T, alpha=scaling)
    backward: dB = scaling * g^T h; u = scaling * g B; dA = u^T xd; dx = dropout_backward(u A)

in the compute dtype (bf16 under autocast). The fp32 adapter weights are cast once per optimizer step (the
gradient-checkpointing recomputation reuses the copies) and gradients are returned in fp32, as PEFT's autocast
path produces them. The dropout mask is drawn by the same torch RNG, so
gradient checkpointing replays it.

Only plain LoRA on `nn.Linear` with one active adapter takes this path; everything else (DoRA and other variants,
merged or disabled adapters, mixed-adapter batches, LoRA bias) runs PEFT's own forward.
"""
from __future__ import annotations

import torch

_PATCHED_ATTR = "_persona_fused_lora_original_forward"


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


_optimizer_steps = 0
_hook_handle = None


def _count_optimizer_step(optimizer, args, kwargs) -> None:
    global _optimizer_steps
    _optimizer_steps += 1


def _cast_cached(layer, name: str, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`weight.to(dtype)`, reused until an optimizer steps or the weight changes otherwise.

    Fused optimizers (AdamW `fused=True`, the Trainer's default on CUDA) update weights in place without moving
    their version counter, so every optimizer step invalidates the copies; the version counter and storage
    pointer catch other changes (load_state_dict, copy_)."""
    if weight.dtype == dtype:
        return weight
    cache = layer.__dict__.setdefault("_persona_cast_cache", {})
    key = (name, dtype)
    stamp = (_optimizer_steps, weight._version, weight.data_ptr())
    hit = cache.get(key)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    cast = weight.detach().to(dtype)
    cache[key] = (stamp, cast)
    return cast


class LoraDelta(torch.autograd.Function):
    """result + scaling * dropout(x) @ A^T @ B^T, with gradients for x, result, A and B."""

    @staticmethod
    def forward(ctx, x, result, weight_a, weight_b, a, b, scaling: float, p: float):
        # weight_a/weight_b: the adapter parameters (for gradients); a/b: their compute-dtype copies.
        shape = result.shape
        x2 = x.reshape(-1, x.shape[-1])
        if x2.dtype != a.dtype:
            x2 = x2.to(a.dtype)
        if p > 0:
            xd, mask = torch.native_dropout(x2, p, True)
        else:
            xd, mask = x2, None
        h = xd @ a.t()
        r2 = result.reshape(-1, shape[-1])
        out = torch.addmm(r2.to(h.dtype) if r2.dtype != h.dtype else r2, h, b.t(), alpha=scaling)
        ctx.save_for_backward(xd, h, a, b, mask)
        ctx.scaling, ctx.p = scaling, p
        ctx.x_shape, ctx.x_dtype, ctx.result_dtype = x.shape, x.dtype, result.dtype
        ctx.weight_dtypes = (weight_a.dtype, weight_b.dtype)
        return out.view(shape).to(result.dtype)

    @staticmethod
    def backward(ctx, grad):
        xd, h, a, b, mask = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1]).to(h.dtype)
        grad_b = (g.t() @ h).mul_(ctx.scaling) if ctx.needs_input_grad[3] else None
        u = (g @ b).mul_(ctx.scaling)
        grad_a = (u.t() @ xd) if ctx.needs_input_grad[2] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_xd = u @ a
            if mask is not None:
                grad_xd = torch.ops.aten.native_dropout_backward(grad_xd, mask, 1.0 / (1.0 - ctx.p))
            grad_x = grad_xd.view(ctx.x_shape).to(ctx.x_dtype)
        grad_result = grad.to(ctx.result_dtype) if ctx.needs_input_grad[1] else None
        if grad_a is not None:
            grad_a = grad_a.to(ctx.weight_dtypes[0])
        if grad_b is not None:
            grad_b = grad_b.to(ctx.weight_dtypes[1])
        return grad_x, grad_result, grad_a, grad_b, None, None, None, None


def _fusable(layer, args, kwargs) -> str | None:
    """The active adapter's name when this call can take the fused path, else None."""
    if layer.disable_adapters or layer.merged or args or kwargs:
        return None
    active = layer.active_adapters
    if len(active) != 1:
        return None
    name = active[0]
    if name not in layer.lora_A or name in getattr(layer, "lora_variant", {}):
        return None
    if getattr(layer, "lora_bias", {}).get(name) or not isinstance(layer.base_layer, torch.nn.Linear):
        return None
    if getattr(layer.lora_A[name], "bias", None) is not None or getattr(layer.lora_B[name], "bias", None) is not None:
        return None
    return name


def _fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    name = _fusable(self, args, kwargs)
    if name is None:
        return getattr(type(self), _PATCHED_ATTR)(self, x, *args, **kwargs)
    result = self.base_layer(x)
    weight_a, weight_b = self.lora_A[name].weight, self.lora_B[name].weight
    dtype = _compute_dtype(x)
    dropout = self.lora_dropout[name]
    p = float(dropout.p) if isinstance(dropout, torch.nn.Dropout) and dropout.training else 0.0
    with torch.autocast(x.device.type, enabled=False):
        a = _cast_cached(self, "A", weight_a, dtype)
        b = _cast_cached(self, "B", weight_b, dtype)
        return LoraDelta.apply(x, result, weight_a, weight_b, a, b, float(self.scaling[name]), p)


def enable() -> bool:
    """Route PEFT LoRA Linear layers through LoraDelta in this process. Returns False when PEFT is missing."""
    try:
        from peft.tuners.lora.layer import Linear
    except ImportError:
        return False
    global _hook_handle
    if not hasattr(Linear, _PATCHED_ATTR):
        setattr(Linear, _PATCHED_ATTR, Linear.forward)
        Linear.forward = _fused_forward
    if _hook_handle is None:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        _hook_handle = register_optimizer_step_post_hook(_count_optimizer_step)
    return True


def disable() -> None:
    try:
        from peft.tuners.lora.layer import Linear
    except ImportError:
        return
    global _hook_handle
    if _hook_handle is not None:
        _hook_handle.remove()
        _hook_handle = None
    original = getattr(Linear, _PATCHED_ATTR, None)
    if original is not None:
        Linear.forward = original
        delattr(Linear, _PATCHED_ATTR)
