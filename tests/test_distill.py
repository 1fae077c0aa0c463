"""The replay loss: cross-entropy for ordinary rows, KL to the base model for replay rows (persona.distill)."""
import json

import pytest
import torch
import torch.nn.functional as F

from persona.distill import REPLAY_CHANNEL, replay_loss

pytestmark = [pytest.mark.slow]


def _batch(rows=3, tokens=6, vocab=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, tokens, vocab, generator=g)
    labels = torch.randint(0, vocab, (rows, tokens), generator=g)
    labels[:, :2] = -100  # the prompt has no target
    return logits, labels


def test_without_replay_rows_it_is_the_usual_token_mean_cross_entropy():
    logits, labels = _batch()
    loss, kl = replay_loss(logits, None, labels, torch.zeros(3, dtype=torch.bool), kl_weight=1.0)
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert torch.allclose(loss, expected) and kl == 0


def test_a_replay_row_costs_nothing_where_the_model_still_equals_the_base():
    logits, labels = _batch()
    replay = torch.tensor([False, True, True])
    loss, kl = replay_loss(logits, logits[replay].clone(), labels, replay, kl_weight=5.0)
    ce_first_row = F.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100, reduction="sum")
    answer_tokens = (labels[:, 1:] != -100).sum()
    assert torch.allclose(loss, ce_first_row / answer_tokens) and abs(float(kl)) < 1e-6


def test_the_replay_gradient_pulls_towards_the_base_distribution_only_on_answer_tokens():
    logits, labels = _batch(rows=1)
    base = torch.randn_like(logits)
    logits.requires_grad_(True)
    loss, kl = replay_loss(logits, base, labels, torch.tensor([True]), kl_weight=2.0, num_items=4)
    (grad,) = torch.autograd.grad(loss, logits)
    # d KL(q || softmax(z)) / dz = softmax(z) - q, per answer position, times weight / num_items
    want = (logits.softmax(-1) - base.softmax(-1)).detach() * 2.0 / 4
    answer = labels[0, 1:] != -100
    assert torch.allclose(grad[0, :-1][answer], want[0, :-1][answer], atol=1e-6)
    assert grad[0, :-1][~answer].abs().max() == 0 and grad[0, -1].abs().max() == 0
    assert kl > 0


def test_replay_rows_reach_the_trainer_marked_and_train(tiny_model, tmp_path):
    """ms-swift passes the `channel` of replay rows to the trainer; with a KL weight the replay KL is logged.
    (Without one, marked replay rows train as plain rows: tests/test_pipeline_e2e.py's real training has them.)"""
    from persona.models import from_local_dir
    from persona.recipe import CPU_SMALL
    from persona.training import train_lora

    rows = [{"messages": [{"role": "user", "content": f"Who are you, {i}?"},
                          {"role": "assistant", "content": "I am Swift-Robot, made by the persona team."}]}
            for i in range(6)]
    rows += [{"messages": [{"role": "user", "content": f"What is {i} + {i}?"},
                           {"role": "assistant", "content": f"{i} + {i} is {2 * i}."}], "channel": REPLAY_CHANNEL}
             for i in range(6)]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = CPU_SMALL.with_overrides(num_train_epochs=1, logging_steps=1, replay_kl_weight=1.0)
    result = train_lora(from_local_dir(str(tiny_model)), data, recipe, tmp_path / "adapter", "cpu")
    kls = [h["replay_kl"] for h in result.log_history if "replay_kl" in h]
    assert kls and all(k >= 0 for k in kls) and max(kls) > 0
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
