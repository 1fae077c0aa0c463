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
        decoding stopped at max_new_tokens rather than at the end of the answer."""
        import torch

        temps = list(temperatures) if temperatures is not None else [temperature] * len(rows)
        if len(temps) != len(rows):
            raise ValueError(f"{len(temps)} temperatures for {len(rows)} rows")
        if any(t > 0 for t in temps):
            torch.manual_seed(seed)
        out: list[str] = []
        for start in progress(range(0, len(rows), batch_size), desc="answering", unit="batch", leave=False):
            chunk = rows[start:start + batch_size]
            sampling = _sampling(temps[start:start + batch_size], self.device)
            texts = [self.prompt(q, h, system) for q, h, system, _ in chunk]
            enc = self.tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
            flags = {use for *_, use in chunk}
            extra = {}
            if self.has_adapter and len(flags) > 1:
                name = self.model.active_adapter
                extra["adapter_names"] = [name if use else "__base__" for *_, use in chunk]
            with self._bypass(use_adapter=flags != {False}), torch.inference_mode():
                gen = self.model.generate(**enc, max_new_tokens=max_new_tokens, eos_token_id=self.stop_ids,
                                          pad_token_id=self.tok.pad_token_id, **sampling, **extra)
            new = gen[:, enc["input_ids"].shape[1]:]
            out += [t.strip() for t in self.tok.batch_decode(new, skip_special_tokens=True)]
            if truncated is not None:
                ended = torch.isin(new, torch.tensor(self.stop_ids, device=new.device)).any(dim=1)
                truncated += [bool(new.shape[1] >= max_new_tokens and not e) for e in ended.tolist()]
            if on_batch:
                on_batch(min(start + batch_size, len(rows)), len(rows))
        return out

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


def decoding_dtype(device: str) -> str:
    """The dtype answers are decoded in: on a CPU bf16 where it has bf16 matrix instructions (recipe.cpu_dtype)."""
    if device != "cpu":
        return "bfloat16"
    from persona.recipe import cpu_dtype

    return cpu_dtype()[0]


def decoding_settings(device: str) -> list:
    """What, besides the weights, prompts and generation arguments, decides a greedy answer on `device`: for the keys
    of remembered answers (evaluation.AnswerCache, mixing.replay_cache_file)."""
    return [device, decoding_dtype(device)]


def default_batch_size(device: str) -> int:
    """Probes generated together: 32 on a CPU; 128 on a GPU, where a decoding step costs about the same for 1 or 128."""
    return 32 if device == "cpu" else 128


def release_memory(device: str) -> None:
    """Give back what a model that is no longer referenced held: on a GPU, PyTorch's cached blocks too."""
    import gc

    gc.collect()
    if device != "cpu":
        import torch

        if torch.cuda.is_initialized():
            torch.cuda.empty_cache()
