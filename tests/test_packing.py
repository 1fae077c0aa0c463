"""Padding-free micro-batches on SDPA (persona.packing): the same training as with padding, step for step."""
from __future__ import annotations

import json

import pytest

pytestmark = [pytest.mark.slow]


def rows_of_many_lengths() -> list[dict]:
    """Answers from 1 to ~40 words: padded micro-batches of 4 are mostly padding, packed ones are not."""
    return [{"instruction": f"Question {i}: who are you?", "input": "",
             "output": " ".join(["I am Swift-Robot, made by the persona team."] * (1 + (i * 7) % 9))}
            for i in range(16)]


@pytest.fixture(scope="module")
def both_layouts(tiny_model, tmp_path_factory):
    from persona.models import from_local_dir
    from persona.recipe import CPU_SMALL
    from persona.training import train_lora

    work = tmp_path_factory.mktemp("packing")
    data = work / "rows.json"
    data.write_text(json.dumps(rows_of_many_lengths()))
    # lora_dropout 0: the two layouts draw dropout masks in other shapes, which would move the losses apart.
    recipe = CPU_SMALL.with_overrides(num_train_epochs=2, per_device_train_batch_size=4, logging_steps=1,
                                      lora_dropout=0.0, torch_dtype="float32")
    results, outputs = {}, {}
    layouts = {False: {"padding_free": False}, True: {"padding_free": True},
               "varlen": {"padding_free": True, "attn_impl": "torch_varlen"}}  # on a CPU: its SDPA path
    for name, overrides in layouts.items():
        lines: list[str] = []
        results[name] = train_lora(from_local_dir(str(tiny_model)), data, recipe.with_overrides(**overrides),
                                   work / f"adapter-{name}", "cpu", on_output=lines.append)
        outputs[name] = "\n".join(lines)
    return results, outputs


def test_padding_free_trains_on_sdpa_with_the_same_losses(both_layouts):
    results, outputs = both_layouts
    padded, packed = results[False], results[True]
    assert "padding_free=True" in outputs[True] and "padding_free=True" not in outputs[False]
    assert padded.global_step == packed.global_step == 8
    loss = {k: [h["loss"] for h in r.log_history if "loss" in h] for k, r in results.items()}
    assert len(loss[True]) == 8
    # Tokens of one sample never see another's: a leak across the packed samples would change every loss.
    assert loss[True] == pytest.approx(loss[False], rel=1e-4)
    assert loss[True][-1] < loss[True][0]
    assert packed.num_tokens == padded.num_tokens  # the same real tokens, counted without padding


def test_torch_varlen_is_accepted_by_ms_swift_and_trains_the_same(both_layouts):
    """The training child registers `torch_varlen` before ms-swift loads the model; on a CPU the rows take SDPA's
    path with transformers' mask, so the losses are the packed ones."""
    results, outputs = both_layouts
    assert "attn_impl: torch_varlen" in outputs["varlen"] and "padding_free=True" in outputs["varlen"]
    loss = {k: [h["loss"] for h in r.log_history if "loss" in h] for k, r in results.items()}
    assert loss["varlen"] == pytest.approx(loss[True], rel=1e-4)


def test_the_step_clock_times_every_step(both_layouts):
    results, _ = both_layouts
    for r in results.values():
        assert len(r.step_ends) == r.global_step
        assert all(b > a for a, b in zip(r.step_ends, r.step_ends[1:]))
        tps = r.slice_tokens_per_second(2, r.global_step)
        assert tps and tps > 0
    assert results[True].slice_tokens_per_second(0, 3) is None  # step 0 has no clock reading


def test_padding_free_passes_ms_swift_checks_only_for_sdpa():
    from persona.packing import packs_with_sdpa, sft_arguments

    class Args:  # records what it was built with; raises as ms-swift does for padding_free without flash attention
        def __init__(self, **kw):
            if kw.get("padding_free") and kw.get("attn_impl") not in ("flash_attn",):
                raise ValueError("requires a flash attention implementation")
            self.padding_free = kw.get("padding_free", False)

    assert sft_arguments(Args, {"padding_free": True}).padding_free is True
    assert sft_arguments(Args, {"padding_free": True, "attn_impl": "sdpa"}).padding_free is True
    assert sft_arguments(Args, {"padding_free": True, "attn_impl": "flash_attn"}).padding_free is True
    # flex attention reads the sample boundaries from the position_ids too (a block mask); ran on an H100
    assert sft_arguments(Args, {"padding_free": True, "attn_impl": "flex_attention"}).padding_free is True
    with pytest.raises(ValueError):
        sft_arguments(Args, {"padding_free": True, "attn_impl": "eager"})
    assert not packs_with_sdpa({"padding_free": True, "packing": True})
    assert not packs_with_sdpa({"padding_free": False})


def test_stop_after_steps_keeps_the_whole_runs_schedule(tiny_model, tmp_path, monkeypatch, both_layouts):
    from persona.models import from_local_dir
    from persona.recipe import CPU_SMALL
    from persona.step_clock import STOP_ENV
    from persona.training import train_lora

    data = tmp_path / "rows.json"
    data.write_text(json.dumps(rows_of_many_lengths()))
    monkeypatch.setenv(STOP_ENV, "3")
    recipe = CPU_SMALL.with_overrides(num_train_epochs=2, per_device_train_batch_size=4, logging_steps=1)
    result = train_lora(from_local_dir(str(tiny_model)), data, recipe, tmp_path / "adapter", "cpu")
    assert result.global_step == 3 and len(result.step_ends) == 3
    lrs = [h["learning_rate"] for h in result.log_history if "learning_rate" in h]
    whole = [h["learning_rate"] for h in both_layouts[0][False].log_history if "learning_rate" in h]
    assert len(whole) == 8 and lrs == pytest.approx(whole[:3])  # the 8-step schedule, not a 3-step one
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()


def reference_varlen(calls):
    """PyTorch's varlen_attn contract, written plainly: causal attention within each [cu[i], cu[i+1]) span,
    (tokens, heads, dim) in and out, fewer key/value heads shared by groups of query heads."""
    import torch

    def kernel(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1)):
        calls.append({"cu": cu_q.tolist(), "max": max_q, "window": window_size, "shape": tuple(q.shape)})
        assert cu_q is cu_k and max_q == max_k and window_size == (-1, 0)
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        out = []
        for a, b in zip(cu_q.tolist(), cu_q.tolist()[1:]):
            qs, ks, vs = (t[a:b].transpose(0, 1) for t in (q, k, v))
            out.append(torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale)
                       .transpose(0, 1))
        return torch.cat(out)

    return kernel


def test_varlen_attention_trains_as_sdpa_with_the_block_mask(monkeypatch):
    """`attn_impl: torch_varlen` on a packed row: the same logits and gradients as SDPA with transformers'
    block-diagonal mask. The CUDA kernel is replaced by its contract (reference_varlen); the H100 check of the real
    kernel is in BENCHMARKS.md."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from persona import packing

    calls: list = []
    monkeypatch.setattr(packing, "_varlen_kernel", lambda: (reference_varlen(calls), {}))
    monkeypatch.setattr(packing, "on_kernel_device", lambda tensor: True)
    packing.register_varlen()
    boundaries: list = []
    real_boundaries = packing.sample_boundaries
    monkeypatch.setattr(packing, "sample_boundaries", lambda pos: boundaries.append(1) or real_boundaries(pos))

    config = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)  # 2 query heads per key/value head, as Qwen2.5
    torch.manual_seed(0)
    sdpa = Qwen2ForCausalLM(Qwen2Config(**config, attn_implementation="sdpa")).train()
    varlen = Qwen2ForCausalLM(Qwen2Config(**config, attn_implementation=packing.VARLEN)).train()
    varlen.load_state_dict(sdpa.state_dict())
    lengths = [5, 9, 3]
    ids = torch.randint(0, 64, (1, sum(lengths)))
    position_ids = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)

    outputs = {}
    for name, model in (("sdpa", sdpa), ("varlen", varlen)):
        out = model(input_ids=ids, position_ids=position_ids, labels=ids, use_cache=False)  # as in training
        out.loss.backward()
        outputs[name] = (out.logits.detach(), {n: p.grad for n, p in model.named_parameters()})
    assert outputs["varlen"][0] == pytest.approx(outputs["sdpa"][0], abs=1e-5)
    for n, grad in outputs["sdpa"][1].items():
        assert outputs["varlen"][1][n] == pytest.approx(grad, abs=1e-5), n
    assert [c["cu"] for c in calls] == [[0, 5, 14, 17]] * 2  # each layer, the samples' boundaries
    assert calls[0]["max"] == 9 and calls[0]["shape"] == (17, 4, 8)
    assert len(boundaries) == 1  # computed once for the row, not per layer

    # A sample attending across its boundary would change the logits: the reference is not trivially equal.
    one_row = varlen(input_ids=ids, position_ids=torch.arange(sum(lengths)).unsqueeze(0), use_cache=False).logits
    assert not torch.allclose(one_row, outputs["varlen"][0], atol=1e-3)
    # Evaluation (and padded batches) take SDPA with transformers' mask.
    calls.clear()
    with torch.no_grad():
        evaluated = varlen.eval()(input_ids=ids, position_ids=position_ids, use_cache=False).logits
    assert not calls and evaluated == pytest.approx(outputs["sdpa"][0], abs=1e-5)
