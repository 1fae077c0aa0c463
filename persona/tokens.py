"""Tokenizers as ms-swift trains with them: the chat template, and token counts of conversations (curation's
length check, the pre-flight's estimate)."""
from __future__ import annotations

from pathlib import Path

# ms-swift's 'chatml' template (swift/template/templates/utils.py), as a transformers chat template.
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# ms-swift's 'llama3' (Llama-3) and 'llama3_2' (Llama-3.1 to 3.3) templates (swift/template/templates/llama.py).
# Llama-3's own chat templates also strip each message (`| trim`); ms-swift does not, nor do these. ms-swift's
# llama3_2 dates its system turn on the day it is imported; this one on the day it is rendered.
LLAMA3 = (
    "<|begin_of_text|>{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
LLAMA3_2 = (
    "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
    "Today Date: {{ strftime_now('%d %b %Y') }}\n\n"
    "{% if messages and messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}{% endif %}<|eot_id|>"
    "{% for m in messages if m['role'] != 'system' %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
# The templates persona formats exactly as ms-swift does; for others (qwen2_5, ...) the tokenizer's own chat
# template, which ms-swift's template for that model reproduces.
SWIFT_TEMPLATES = {"chatml": CHATML, "llama3": LLAMA3, "llama3_2": LLAMA3_2}
END_OF_TURN = ("<|im_end|>", "<|eot_id|>")  # ChatML's and Llama-3's


def use_template(tok, template: str | None):
    """Give `tok` the chat template of ms-swift's `template`; None: its own, else ChatML."""
    if template in SWIFT_TEMPLATES:
        tok.chat_template = SWIFT_TEMPLATES[template]
    elif not tok.chat_template:
        tok.chat_template = CHATML
    return tok


def chat_tokenizer(model_dir: str, template: str | None, **kw):
    """The base tokenizer with the chat template ms-swift trains with."""
    from transformers import AutoTokenizer

    return use_template(AutoTokenizer.from_pretrained(model_dir, **kw), template)


def counting_tokenizer(model_dir: str, template: str | None):
    """`chat_tokenizer` for counting tokens, without importing torch where it can (AutoTokenizer imports it: 5 s on
    a GPU machine, before the training could start). A folder with a tokenizer.json is read by
    PreTrainedTokenizerFast, which tokenizes with that file as AutoTokenizer's class for the model does; the class
    adds decoding defaults, which counting does not use."""
    if not Path(model_dir, "tokenizer.json").is_file():
        return chat_tokenizer(model_dir, template)
    from transformers import PreTrainedTokenizerFast

    return use_template(PreTrainedTokenizerFast.from_pretrained(model_dir), template)


def token_counter(model_dir: str, template: str | None, system: str = "You are a helpful assistant."):
    """Tokens of one conversation as trained: system prompt, turns and template tokens."""
    tok = counting_tokenizer(model_dir, template)

    def count(messages: list[dict]) -> int:
        msgs = messages if messages[0]["role"] == "system" else [{"role": "system", "content": system}, *messages]
        return len(tok(tok.apply_chat_template(msgs, tokenize=False), add_special_tokens=False)["input_ids"])

    return count
