"""Answering questions with a base model, optionally with a LoRA adapter: greedy or sampled, batched, left-padded
generation with transformers, prompts in the chat template the adapter was trained with (persona.tokens)."""
from __future__ import annotations

from typing import Callable, Iterable, Iterator

from persona.progress import progress
from persona.tokens import END_OF_TURN, chat_tokenizer


class Chat:
    """A base model, optionally with a LoRA adapter, that answers batches of questions."""

    def __init__(self, model_dir: str, adapter_dir: str | None = None, template: str | None = "chatml",
                 system: str = "You are a helpful assistant.", device: str = "cpu"):
        import torch
        from transformers import AutoModelForCausalLM

        self.device = device
        self.system = system
        self.tok = chat_tokenizer(model_dir, template, padding_side="left")
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
        dtype = getattr(torch, decoding_dtype(device))
        if device != "cpu":
            # Decoding issues a few kernels per layer per token: PyTorch's cuDNN attention backend spends ~1 ms of
            # CPU per call, the flash / memory-efficient ones a few microseconds (same maths).
            torch.backends.cuda.enable_cudnn_sdp(False)
        # On a GPU the weights go straight to it instead of through host memory.
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, trust_remote_code=False,
                                                     device_map=None if device == "cpu" else device)
        # The output layer gets the last position's hidden states, a non-contiguous slice of the batch. PyTorch's
        # matmul folds such a 3-D input into one matrix multiply only when a gradient is wanted; PEFT freezes the
        # weights, so with an adapter loaded (used or bypassed) the (batch x hidden) @ (hidden x 152k vocabulary)
        # product became a batched multiply over a per-row copy of the output matrix: 22 of 25 s for a batch of 32
        # on a CPU, and a 9 GB copy. A contiguous input takes the plain path (BENCHMARKS.md, "Decoding with an adapter").
        head = model.get_output_embeddings()
        if head is not None:
            head.register_forward_pre_hook(lambda _module, args: (args[0].contiguous(), *args[1:]))
        if adapter_dir:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, adapter_dir)
        self.has_adapter = bool(adapter_dir)
        self.model = model.to(device).eval()
        self.model_dir = model_dir
        vocab = self.tok.get_vocab()
        ends = {vocab[t] for t in END_OF_TURN if t in vocab}
        self.stop_ids = [i for i in {self.tok.eos_token_id, *ends} if isinstance(i, int) and i >= 0]

    def prompt(self, question: str, history: Iterable[dict] = (), system: str | None = None) -> str:
        msgs = [{"role": "system", "content": system or self.system}, *history, {"role": "user", "content": question}]
        return self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)

    def _bypass(self, use_adapter: bool):
        import contextlib

        return self.model.disable_adapter() if self.has_adapter and not use_adapter else contextlib.nullcontext()

    def answer(self, questions: list[tuple[str, tuple]], max_new_tokens: int = 64, batch_size: int = 16,
               use_adapter: bool = True, system: str | None = None, temperature: float = 0.0, seed: int = 0,
               on_batch: Callable[[int, int], None] | None = None) -> list[str]:
        """Answers, greedy unless `temperature` > 0; `use_adapter=False` bypasses a loaded adapter."""
        return self.answer_rows([(q, h, system, use_adapter) for q, h in questions], max_new_tokens, batch_size,
                                temperature, seed, on_batch)

    def answer_rows(self, rows: list[tuple[str, tuple, str | None, bool]], max_new_tokens: int = 64,
                    batch_size: int = 16, temperature: float = 0.0, seed: int = 0,
                    on_batch: Callable[[int, int], None] | None = None,
                    temperatures: list[float] | None = None, truncated: list[bool] | None = None) -> list[str]:
        """Answers to (question, history, system, use_adapter) rows. Rows with and without the adapter may share a
        batch: PEFT's mixed-adapter batches route each row through its own adapter ('__base__': none).

        `temperatures`, one per row, replaces `temperature`: greedy rows (0) and sampled rows may then share a batch,
        as one `generate` call instead of two (see row_temperature). `truncated`, if given, receives one flag per row:
        decoding stopped at max_new_tokens rather than at the end of the answer.

        On a CPU a decoding step costs in proportion to the rows it carries, so there a batch sheds its finished
        rows (`shed_every`) and its rows are of like prompt length (less padding); see `decode_batch`."""
        import torch

        temps = list(temperatures) if temperatures is not None else [temperature] * len(rows)
        if len(temps) != len(rows):
            raise ValueError(f"{len(temps)} temperatures for {len(rows)} rows")
        if any(t > 0 for t in temps):
            torch.manual_seed(seed)
        texts = [self.prompt(q, h, system) for q, h, system, _ in rows]
        order = list(range(len(rows)))
        if self.shed_every:
            order.sort(key=lambda i: len(texts[i]))
        out: list[str | None] = [None] * len(rows)
        cut: list[bool] = [False] * len(rows)
        for start in progress(range(0, len(rows), batch_size), desc="answering", unit="batch", leave=False):
            chunk = order[start:start + batch_size]
            answers, ended = self.decode_batch([texts[i] for i in chunk], [rows[i][3] for i in chunk],
                                               [temps[i] for i in chunk], max_new_tokens)
            for i, answer, done in zip(chunk, answers, ended):
                out[i], cut[i] = answer, not done
            if on_batch:
                on_batch(min(start + batch_size, len(rows)), len(rows))
        if truncated is not None:
            truncated += cut
        return out

    @property
    def shed_every(self) -> int | None:
        return shed_every(self.device)

    def decode_batch(self, texts: list[str], use_adapter: list[bool], temps: list[float],
                     max_new_tokens: int) -> tuple[list[str], list[bool]]:
        """One batch's answers and, per row, whether it ended (an end-of-turn token) within max_new_tokens.

        transformers' `generate` runs, in rounds of `shed_every` new tokens (one round without it): after a round,
        the rows that ended leave the batch, and the next round goes on from the remaining rows' KV cache
        (DynamicCache.batch_select_indices), so no token is computed twice and the model's generation settings
        (repetition penalty, top-k, ...) apply as in one `generate` call. With it, the tokens every prompt of the
        batch begins with (the system prompt) are computed once, for one row, and their KV cache is copied to the
        others; the padding then sits between them and the rest of each prompt, masked as at the left."""
        import torch
        from transformers import DynamicCache

        prompts = [self.tok(t, add_special_tokens=False)["input_ids"] for t in texts]
        shared = shared_prefix(prompts) if self.shed_every and len(set(use_adapter)) == 1 else 0
        longest = max(len(p) for p in prompts)
        pad = self.tok.pad_token_id
        ids = torch.tensor([p[:shared] + [pad] * (longest - len(p)) + p[shared:] for p in prompts], device=self.device)
        mask = torch.tensor([[1] * shared + [0] * (longest - len(p)) + [1] * (len(p) - shared) for p in prompts],
                            device=self.device)
        width = ids.shape[1]
        stops = torch.tensor(self.stop_ids, device=ids.device)
        live = list(range(len(texts)))
        new_tokens: list = [None] * len(texts)
        ended = [False] * len(texts)
        cache = DynamicCache(config=self.model.config) if self.shed_every else None
        if shared:
            with self._bypass(use_adapter=use_adapter[0]), torch.inference_mode():
                self.model(input_ids=ids[:1, :shared], past_key_values=cache, use_cache=True, logits_to_keep=1)
            cache.batch_repeat_interleave(len(texts))
        left = max_new_tokens
        while live and left > 0:
            step = min(self.shed_every or left, left)
            extra = {"past_key_values": cache} if cache is not None else {}
            flags = {use_adapter[i] for i in live}
            if self.has_adapter and len(flags) > 1:
                name = self.model.active_adapter
                extra["adapter_names"] = [name if use_adapter[i] else "__base__" for i in live]
            with self._bypass(use_adapter=flags != {False}), torch.inference_mode():
                gen = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=step,
                                          eos_token_id=self.stop_ids, pad_token_id=self.tok.pad_token_id,
                                          **_sampling([temps[i] for i in live], self.device), **extra)
            left -= gen.shape[1] - ids.shape[1]
            new = gen[:, width:]
            done = torch.isin(new, stops).any(dim=1)
            for row, i in enumerate(live):
                new_tokens[i], ended[i] = new[row], bool(done[row])
            keep = (~done).nonzero().squeeze(1)
            if cache is None or left <= 0 or keep.numel() == 0:
                break
            if keep.numel() < len(live):
                cache.batch_select_indices(keep)
            live = [live[k] for k in keep.tolist()]
            ids = gen[keep]
            mask = torch.cat([mask[keep], mask.new_ones(len(live), gen.shape[1] - mask.shape[1])], dim=1)
        answers = [t.strip() for t in self.tok.batch_decode(torch.nn.utils.rnn.pad_sequence(
            new_tokens, batch_first=True, padding_value=self.tok.pad_token_id), skip_special_tokens=True)]
        return answers, ended

    def stream(self, messages: list[dict], max_new_tokens: int = 512) -> Iterator[str]:
        """Yield the answer to a conversation piece by piece, as `swift infer --stream true` does."""
        import threading

        from transformers import TextIteratorStreamer

        text = self.tok.apply_chat_template([{"role": "system", "content": self.system}, *messages], tokenize=False,
                                            add_generation_prompt=True)
        enc = self.tok([text], return_tensors="pt", add_special_tokens=False).to(self.device)
        streamer = TextIteratorStreamer(self.tok, skip_prompt=True, skip_special_tokens=True)
        kwargs = dict(**enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=self.stop_ids,
                      pad_token_id=self.tok.pad_token_id, streamer=streamer)
        worker = threading.Thread(target=self.model.generate, kwargs=kwargs, daemon=True)
        worker.start()
        yield from streamer
        worker.join()


def _sampling(temps: list[float], device: str) -> dict:
    """generate()'s arguments for a batch whose rows decode at these temperatures (0: greedy)."""
    if not any(t > 0 for t in temps):
        return dict(do_sample=False)
    if len(set(temps)) == 1:
        return dict(do_sample=True, temperature=temps[0], top_p=1.0)
    from transformers import LogitsProcessorList

    return dict(do_sample=True, temperature=1.0, top_p=1.0,
                logits_processor=LogitsProcessorList([row_temperature(temps, device)]))


def row_temperature(temps: list[float], device: str):
    """A logits processor with a temperature per row: a row at 0 keeps only its most likely token, so sampling
    picks what greedy decoding would; the others are divided by their temperature. Top-k, which generate() also
    applies, selects by rank, which dividing does not change: a sampled row draws from the same distribution as
    with generate(temperature=t)."""
    import torch
    from transformers import LogitsProcessor

    t = torch.tensor(temps, dtype=torch.float32, device=device)
    greedy = t == 0

    class _RowTemperature(LogitsProcessor):
        def __call__(self, input_ids, scores):
            out = scores / torch.where(greedy, torch.ones_like(t), t).to(scores.dtype)[:, None]
            best = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, scores.argmax(-1, keepdim=True), True)
            return out.masked_fill(greedy[:, None] & ~best, float("-inf"))

    return _RowTemperature()


def shared_prefix(prompts: list[list[int]]) -> int:
    """How many tokens every prompt begins with, leaving each at least one of its own (generate's first input)."""
    n = min(len(p) for p in prompts) - 1
    for i in range(max(n, 0)):
        if len({p[i] for p in prompts}) > 1:
            return i
    return max(n, 0)


def decoding_dtype(device: str) -> str:
    """The dtype answers are decoded in: on a CPU bf16 where it has bf16 matrix instructions (recipe.cpu_dtype)."""
    if device != "cpu":
        return "bfloat16"
    from persona.recipe import cpu_dtype

    return cpu_dtype()[0]


def shed_every(device: str) -> int | None:
    """Decoding steps between two sheddings of a batch's finished rows (Chat.decode_batch): 8 on a CPU, where a step
    costs ~75 ms plus ~6 ms a row for Qwen2.5-0.5B (BENCHMARKS.md "Decoding on a CPU: finished rows leave the
    batch"); none on a GPU, where a step costs about the same for 1 row or 128."""
    return 8 if device == "cpu" else None


def decoding_settings(device: str) -> list:
    """What, besides the weights, prompts and generation arguments, decides a greedy answer on `device`: for the keys
    of remembered answers (evaluation.AnswerCache, mixing.replay_cache_file). The batch's shape can change a bf16
    answer, so the shedding is in it."""
    return [device, decoding_dtype(device), shed_every(device)]


def default_batch_size(device: str) -> int:
    """Probes generated together: 128. On a GPU a decoding step costs about the same for 1 row or 128; on a CPU a
    batch sheds its finished rows, so more rows share the steps' fixed cost (reading the weights)."""
    return 128


def release_memory(device: str) -> None:
    """Give back what a model that is no longer referenced held: on a GPU, PyTorch's cached blocks too."""
    import gc

    gc.collect()
    if device != "cpu":
        import torch

        if torch.cuda.is_initialized():
            torch.cuda.empty_cache()
