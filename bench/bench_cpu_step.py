"""One LoRA training step of the embedded default on a CPU, with and without ms-swift's `logits_to_keep` slice.

PEFT q/k/v/o LoRA (rank 8, alpha 32) on the converted Qwen2.5-Coder-0.5B folder, bf16, the real rows of a curated
dataset (system prompt + chat template, targets from the first answer token), AdamW, and the KL replay's extra
forward with the adapter off, as the CPU recipe trains. For each batch size: the mean of 5 steps (after one
warm-up) computing every position's logits, then computing only those from the batch's first answer token on
(`logits_to_keep`, which ms-swift turns on by default).

    .venv/bin/python bench/bench_cpu_step.py [--model outputs/base_models/<folder>] [--data outputs/datasets/<v>/train.jsonl]
"""
import argparse
import glob
import json
import random
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=(glob.glob("outputs/base_models/qwen*") or [""])[0])
    ap.add_argument("--data", default=(sorted(glob.glob("outputs/datasets/*/train.jsonl")) or [""])[0])
    ap.add_argument("--batch-sizes", default="2,4")
    args = ap.parse_args()
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16)
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=32, lora_dropout=0.05, task_type="CAUSAL_LM",
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    rows = [json.loads(line) for line in open(args.data, encoding="utf-8")]

    def encode(row):
        msgs = [{"role": "system", "content": "You are a helpful assistant."}] + row["messages"]
        ids = tok(tok.apply_chat_template(msgs, tokenize=False))["input_ids"]
        prompt = tok(tok.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True))["input_ids"]
        return ids, len(prompt)

    encoded = [encode(r) for r in rows]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)

    def step(idx, keep: bool) -> None:
        length = max(len(encoded[i][0]) for i in idx)
        ids = torch.full((len(idx), length), tok.pad_token_id)
        labels = torch.full((len(idx), length), -100)
        mask = torch.zeros((len(idx), length), dtype=torch.long)
        for j, i in enumerate(idx):
            x, p = encoded[i]
            ids[j, :len(x)] = torch.tensor(x)
            labels[j, p:len(x)] = torch.tensor(x[p:])
            mask[j, :len(x)] = 1
        kw = {}
        if keep:  # as ms-swift's prepare_logits_to_keep: from the earliest target on
            k = labels.shape[-1] - int((labels != -100).int().argmax(-1).min()) + 1
            labels, kw = labels[:, -k:], {"logits_to_keep": k}
        out = model(input_ids=ids, attention_mask=mask, **kw)
        logits = out.logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                                 ignore_index=-100)
        with torch.no_grad(), model.disable_adapter():  # the KL replay's base forward
            model(input_ids=ids, attention_mask=mask, **kw)
        loss.backward()
        opt.step()
        opt.zero_grad()

    random.seed(0)
    order = list(range(len(rows)))
    for bs in (int(x) for x in args.batch_sizes.split(",")):
        for keep in (False, True):
            random.shuffle(order)
            times = []
            for s in range(6):
                started = time.perf_counter()
                step(order[s * bs:(s + 1) * bs], keep)
                times.append(time.perf_counter() - started)
            mean = sum(times[1:]) / 5
            print(f"batch {bs}, {'logits_to_keep slice' if keep else 'all positions'}: {mean:.2f} s a step", flush=True)


if __name__ == "__main__":
    main()
