"""Replay rows trained to keep the base model's next-token distribution, not to copy its greedy answer.

General-data replay (persona.mixing) puts the base model's own answers into the training data. Learned as plain
targets (cross-entropy), they sharpen the model towards its greedy tokens, which moves its other answers too: on
the embedded 135M model, more replay rows kept fewer of the base model's right answers (BENCHMARKS.md). Here a
replay row instead adds KL(base || adapter) over its answer tokens. The base is the same network with the LoRA
adapter switched off, so it costs one extra forward pass and no memory for a second model, and the term is zero
where the adapter has changed nothing, so it only resists drift.

It is off by default (Recipe.replay_kl_weight = 0). On the embedded default it kept 12 of the base model's 14
right general answers where plain targets kept 10, but the adapter then answered a third of the general questions
with its identity (in Chinese, where the base model's own distribution is spread out); plain targets: none.

Replay rows carry ms-swift's `channel` field ("replay"); ms-swift hands each batch's channels to the trainer.
"""
from __future__ import annotations

REPLAY_CHANNEL = "replay"


def replay_loss(logits, base_logits, labels, replay_rows, kl_weight: float, num_items=None):
    """Cross-entropy on the answer tokens of ordinary rows plus `kl_weight` x KL(base || model) on those of replay rows,
    summed over tokens and divided by `num_items` (default: the answer tokens in this batch).

    logits: (rows, tokens, vocabulary) of the model being trained; base_logits: the base model's logits for the replay
    rows only, in order; labels: (rows, tokens), -100 where there is no target; replay_rows: (rows,) booleans.
    Returns (loss, mean KL per replay answer token).
    """
    import torch
    import torch.nn.functional as F

    # Only answer positions are turned into fp32 distributions: the (positions x 152k vocabulary) tensors of a whole
    # batch cost more than the rest of the loss.
    logits, target = logits[:, :-1], labels[:, 1:]  # position t predicts token t + 1
    answer = target != -100
    plain = answer & ~replay_rows[:, None]
    total = F.cross_entropy(logits[plain].float(), target[plain], reduction="sum")
    kl_mean = total.new_zeros(())
    if replay_rows.any():
        kept = answer[replay_rows]
        logp = F.log_softmax(logits[replay_rows][kept].float(), dim=-1)
        base_logp = F.log_softmax(base_logits[:, :-1][kept].float(), dim=-1)
        kl = (base_logp.exp() * (base_logp - logp)).sum(-1)
        total = total + kl_weight * kl.sum()
        kl_mean = kl.detach().mean() if kl.numel() else kl_mean
    n = num_items if num_items is not None else answer.sum()
    return total / torch.as_tensor(n, device=total.device).clamp(min=1), kl_mean


def enable(kl_weight: float) -> bool:
    """Patch ms-swift's trainer so that batches with replay rows use replay_loss; others are left to ms-swift."""
    import torch
    from swift.trainers.seq2seq_trainer import Seq2SeqTrainer

    original = Seq2SeqTrainer.compute_loss
    if getattr(original, "_persona_replay", False):
        return False

    warned = []

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        channels = inputs.get("channel")
        if not channels or REPLAY_CHANNEL not in channels or "labels" not in inputs:
            return original(self, model, inputs, return_outputs, num_items_in_batch)
        if self.template.padding_free:  # rows are packed into one sequence: no per-row base comparison
            if not warned:
                print("[persona] padding_free packs rows together: replay rows are learned as plain targets (no KL)",
                      flush=True)
                warned.append(True)
            return original(self, model, inputs, return_outputs, num_items_in_batch)
        # ms-swift may have cut the labels to the positions that have a target (`logits_to_keep`): the model is
        # asked for the logits of the same positions, so logits and labels stay aligned.
        inputs = {k: v for k, v in inputs.items()
                  if k not in ("channel", "compute_loss_func", "loss_scale", "text_position_ids")}
        labels = inputs.pop("labels")
        rows = torch.tensor([c == REPLAY_CHANNEL for c in channels], device=labels.device)
        outputs = model(**inputs)
        replay_inputs = {k: v[rows] if k != "logits_to_keep" and torch.is_tensor(v) and v.shape[:1] == rows.shape
                         else v for k, v in inputs.items()}
        with torch.no_grad(), self.accelerator.unwrap_model(model).disable_adapter():
            base = model(**replay_inputs)
        loss, kl = replay_loss(outputs.logits, base.logits, labels, rows, kl_weight, num_items_in_batch)
        if (getattr(self.args, "average_tokens_across_devices", False) and self.model_accepts_loss_kwargs
                and num_items_in_batch is not None):
            loss = loss * self.accelerator.num_processes  # as ms-swift's own loss: the token count is global
        self.custom_metrics["train" if model.training else "eval"]["replay_kl"].update(kl)
        return (loss, outputs) if return_outputs else loss

    compute_loss._persona_replay = True
    Seq2SeqTrainer.compute_loss = compute_loss
    return True
