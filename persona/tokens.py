"""Tokenizers as ms-swift trains with them: the chat template, and token counts of conversations (curation's
length check, the pre-flight's estimate)."""
from __future__ import annotations

from pathlib import Path

# ms-swift's 'chatml' template (swift/template/templates/utils.py), as a transformers chat template.
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def chat_tokenizer(model_dir: str, template: str | None, **kw):
    """The base tokenizer with the chat template ms-swift trains with."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir, **kw)
    if template == "chatml" or not tok.chat_template:
        tok.chat_template = CHATML
    return tok


def counting_tokenizer(model_dir: str, template: str | None):
    """`chat_tokenizer` for counting tokens, without importing torch where it can (AutoTokenizer imports it: 5 s on
    a GPU machine, before the training could start). A folder with a tokenizer.json is read by
    PreTrainedTokenizerFast, which tokenizes with that file as AutoTokenizer's class for the model does; the class
    adds decoding defaults, which counting does not use."""
    if not Path(model_dir, "tokenizer.json").is_file():
        return chat_tokenizer(model_dir, template)
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(model_dir)
    if template == "chatml" or not tok.chat_template:
        tok.chat_template = CHATML
    return tok


def token_counter(model_dir: str, template: str | None, system: str = "You are a helpful assistant."):
    """Tokens of one conversation as trained: system prompt, turns and template tokens."""
    tok = counting_tokenizer(model_dir, template)

    def count(messages: list[dict]) -> int:
        msgs = messages if messages[0]["role"] == "system" else [{"role": "system", "content": system}, *messages]
        return len(tok(tok.apply_chat_template(msgs, tokenize=False), add_special_tokens=False)["input_ids"])

    return count
