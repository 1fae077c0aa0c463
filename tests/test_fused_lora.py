"""persona.fused_lora computes PEFT's LoRA forward and gradients as one autograd node (the fast GPU recipe)."""
import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch.utils.checkpoint import checkpoint

from persona import fused_lora


class TwoLayers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q = torch.nn.Linear(32, 48, bias=False)
        self.o = torch.nn.Linear(48, 32, bias=True)

    def forward(self, x):
        return self.o(torch.relu(self.q(x)))


def lora_model(dtype=torch.float32, dropout=0.0):
    torch.manual_seed(0)
    model = get_peft_model(TwoLayers().to(dtype), LoraConfig(r=4, lora_alpha=16, lora_dropout=dropout,
                                                             target_modules=["q", "o"]))
    g = torch.Generator().manual_seed(1)
    for module in model.modules():
        if hasattr(module, "lora_B"):  # PEFT starts B at zero; a trained B exercises every term
            module.lora_B["default"].weight.data.copy_(torch.randn(module.lora_B["default"].weight.shape, generator=g) * 0.1)
    return model.train()


def run(model, x, fused, autocast=False, use_checkpoint=False):
    (fused_lora.enable if fused else fused_lora.disable)()
    try:
        xx = x.clone().requires_grad_(True)
        torch.manual_seed(7)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = checkpoint(model, xx, use_reentrant=False) if use_checkpoint else model(xx)
        y.float().pow(2).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        return y.detach().float(), xx.grad.float(), grads
    finally:
        fused_lora.disable()


def rel(a, b):
    return ((a.float() - b.float()).norm() / (a.float().norm() + 1e-12)).item()


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_fp32_matches_peft_exactly(dropout):
    x = torch.randn(3, 5, 32)
    y1, gx1, g1 = run(lora_model(dropout=dropout), x, fused=False)
    y2, gx2, g2 = run(lora_model(dropout=dropout), x, fused=True)
    assert torch.allclose(y1, y2, atol=1e-6) and torch.allclose(gx1, gx2, atol=1e-6)
    assert g1.keys() == g2.keys() and len(g1) == 4
    for name in g1:
        assert torch.allclose(g1[name], g2[name], atol=1e-6), name


def test_bf16_autocast_matches_peft_within_rounding_and_keeps_fp32_gradients():
    x = torch.randn(3, 5, 32)
    y1, gx1, g1 = run(lora_model(torch.bfloat16), x, fused=False, autocast=True)
    y2, gx2, g2 = run(lora_model(torch.bfloat16), x, fused=True, autocast=True)
    assert rel(y1, y2) < 1e-2 and rel(gx1, gx2) < 1e-2
    for name in g1:
        assert g2[name].dtype == torch.float32 and rel(g1[name], g2[name]) < 1e-2, name


def test_gradient_checkpointing_replays_the_same_dropout_mask():
    x = torch.randn(3, 5, 32)
    y1, gx1, g1 = run(lora_model(dropout=0.3), x, fused=True)
    y2, gx2, g2 = run(lora_model(dropout=0.3), x, fused=True, use_checkpoint=True)
    assert torch.allclose(y1, y2) and torch.allclose(gx1, gx2, atol=1e-6)
    for name in g1:
        assert torch.allclose(g1[name], g2[name], atol=1e-6), name


def test_training_steps_track_peft_and_refresh_the_cast_weights():
    x = torch.randn(4, 6, 32)
    models = {fused: lora_model(torch.bfloat16) for fused in (False, True)}
    for fused, model in models.items():
        # fused=True: the CUDA default of the Trainer, which updates weights without moving their version counter
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, fused=True)
        for _ in range(3):
            (fused_lora.enable if fused else fused_lora.disable)()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(x).float().pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
        fused_lora.disable()
    ref, fast = (dict(models[f].named_parameters()) for f in (False, True))
    for name, p in ref.items():
        if p.requires_grad:
            assert rel(p.detach(), fast[name].detach()) < 2e-2, name
    # after the optimizer moved the weights, the next forward casts them again instead of reusing the old copy
    layer = models[True].base_model.model.q
    weight = layer.lora_A["default"].weight
    stale = layer._persona_cast_cache[("A", torch.bfloat16)][1]
    assert not torch.equal(stale, weight.detach().to(torch.bfloat16))
    fused_lora.enable()
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            models[True](x)
    finally:
        fused_lora.disable()
    assert torch.equal(layer._persona_cast_cache[("A", torch.bfloat16)][1], weight.detach().to(torch.bfloat16))


def test_inference_disabled_and_merged_adapters_take_peft_path():
    model = lora_model().eval()
    x = torch.randn(2, 3, 32)
    with torch.no_grad():
        fused_lora.disable()
        expected, base = model(x), None
        with model.disable_adapter():
            base = model(x)
        fused_lora.enable()
        try:
            assert torch.allclose(model(x), expected, atol=1e-6)
            with model.disable_adapter():
                assert torch.allclose(model(x), base)
            model.merge_adapter()
            assert torch.allclose(model(x), expected, atol=1e-5)
        finally:
            fused_lora.disable()


def test_enable_is_idempotent_and_disable_restores_peft():
    from peft.tuners.lora.layer import Linear

    original = Linear.forward
    assert fused_lora.enable() and fused_lora.enable()
    assert Linear.forward is not original
    fused_lora.disable()
    assert Linear.forward is original
