"""Model families (issue #17): ms-swift's model_type and chat template for a folder (persona.families), and a
Llama-3-style model trained and evaluated with Llama-3's template, not ChatML."""
import json
import shutil
from pathlib import Path

import pytest

from conftest import GENERAL_PROMPTS, IDENTITY, PROBES, QUESTIONS
from persona import models
from persona.families import SWIFT_ARGS_ENV, swift_settings, trained_settings
from persona.models import ModelSourceError, from_local_dir

pytestmark = [pytest.mark.slow]

SYSTEM = "You are a helpful assistant."
# Meta-Llama-3-8B-Instruct's chat template, as its tokenizer_config.json ships it.
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
LLAMA3_PROMPT = ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are a helpful assistant.<|eot_id|>"
                 "<|start_header_id|>user<|end_header_id|>\n\nWho are you?<|eot_id|>"
                 "<|start_header_id|>assistant<|end_header_id|>\n\n")


def build_tiny_llama3(out: Path) -> Path:
    """conftest.build_tiny_model with Llama-3's special tokens and chat template: 2 layers, seconds to train."""
    import torch
    from tokenizers import Tokenizer, decoders, models as tok_models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tok = Tokenizer(tok_models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = QUESTIONS + GENERAL_PROMPTS + [IDENTITY, f"system user assistant {SYSTEM}"] + [p["question"] for p in PROBES]
    tok.train_from_iterator(corpus * 4, trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                   pad_token="<|end_of_text|>")
    fast.chat_template = LLAMA3_CHAT_TEMPLATE
    fast.save_pretrained(out)
    ids = fast.convert_tokens_to_ids
    cfg = LlamaConfig(vocab_size=fast.vocab_size + 8, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=ids("<|begin_of_text|>"), eos_token_id=[ids("<|end_of_text|>"), ids("<|eot_id|>")],
                      pad_token_id=ids("<|end_of_text|>"), tie_word_embeddings=True, initializer_range=0.2)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny_llama3(tmp_path_factory) -> Path:
    # A name no ms-swift model id has: ms-swift cannot infer, persona reads the tokenizer.
    return build_tiny_llama3(tmp_path_factory.mktemp("tiny-llama3"))


@pytest.fixture(autouse=True)
def _no_forced_settings(monkeypatch):
    monkeypatch.delenv(SWIFT_ARGS_ENV, raising=False)


def swift_prompt_ids(model_dir, template_type: str, question: str = "Who are you?") -> list[int]:
    """The prompt as ms-swift encodes it for training (without the answer)."""
    from swift import get_processor
    from swift.template import get_template

    processor = get_processor(str(model_dir), model_type="llama", check_model=False)
    template = get_template(processor, template_type=template_type, default_system=SYSTEM)
    template.set_mode("transformers")
    return template.encode({"messages": [{"role": "user", "content": question}]})["input_ids"]


def test_ms_swift_infers_a_model_it_knows_by_its_name(tiny_llama3, tmp_path):
    """A folder named as the hub id: ms-swift's own answer (Llama-3 and Llama-3.2 differ in template)."""
    for name, template in (("Meta-Llama-3-8B-Instruct", "llama3"), ("Llama-3.2-1B-Instruct", "llama3_2"),
                           ("Qwen2___5-7B-Instruct", "qwen2_5")):  # a ModelScope snapshot's spelling of Qwen2.5
        folder = shutil.copytree(tiny_llama3, tmp_path / name)
        settings = swift_settings(folder)
        assert (settings.template, settings.decided_by.count(f"ms-swift, by the name {name}")) == (template, 2)
        assert settings.model_type == ("qwen2" if "Qwen" in name else "llama")


def test_a_llama3_folder_ms_swift_cannot_place_gets_the_template_of_its_tokenizer(tiny_llama3):
    """LlamaForCausalLM fits four ms-swift model types and `llama` sixteen templates: config.json's model_type and
    the tokenizer's chat template decide, no longer 'chatml' for every llama."""
    base = from_local_dir(str(tiny_llama3))
    assert (base.model_type, base.template) == ("llama", "llama3")
    assert "tokenizer's Llama-3 chat template" in base.extra["ms_swift_settings_from"]
    assert base.own_identity == ()


def test_the_tiny_chatml_llama_and_the_embedded_models_keep_their_settings(tiny_model):
    from swift.model.model_meta import get_matched_model_meta

    assert (from_local_dir(str(tiny_model)).model_type, from_local_dir(str(tiny_model)).template) == ("llama", "chatml")
    for model in models.EMBEDDED_MODELS.values():  # ms-swift does not know the converted folders' names
        assert get_matched_model_meta(f"/cache/{model.name}-{model.sha256[:12]}") is None
    assert (models.QWEN_CODER_05B.model_type, models.QWEN_CODER_05B.template) == ("qwen2", "qwen2_5")
    assert (models.SMOLLM2_135M.model_type, models.SMOLLM2_135M.template) == ("llama", "chatml")
    assert models.QWEN2.template is None and "Qwen" in models.QWEN2.own_identity  # families: names only


def test_a_template_nobody_can_tell_stops_with_the_setting_to_pass(tiny_llama3, tmp_path, monkeypatch):
    folder = shutil.copytree(tiny_llama3, tmp_path / "odd-chat")
    (folder / "chat_template.jinja").write_text("{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}\n"
                                                "{% endfor %}")
    with pytest.raises(ModelSourceError) as exc:
        from_local_dir(str(folder))
    msg = str(exc.value)
    assert "\n" not in msg and "cannot tell which chat template" in msg and "llama3" in msg
    assert f"{SWIFT_ARGS_ENV}='{{\"template\": " in msg
    from persona.training import EXTRA_ARGS_ENV

    assert SWIFT_ARGS_ENV == EXTRA_ARGS_ENV  # the variable swift_arguments applies last: training uses it too
    monkeypatch.setenv(SWIFT_ARGS_ENV, json.dumps({"template": "llama3"}))
    base = from_local_dir(str(folder))
    assert (base.model_type, base.template) == ("llama", "llama3")
    assert SWIFT_ARGS_ENV in base.extra["ms_swift_settings_from"]


def test_evaluation_prompts_are_the_ones_ms_swift_trains_on_for_llama3_and_llama3_2(tiny_llama3):
    from persona.inference import Chat
    from persona.tokens import chat_tokenizer

    for template in ("llama3", "llama3_2"):
        chat = Chat.__new__(Chat)
        chat.tok, chat.system = chat_tokenizer(str(tiny_llama3), template), SYSTEM
        ours = chat.tok(chat.prompt("Who are you?"), add_special_tokens=False)["input_ids"]
        assert ours == swift_prompt_ids(tiny_llama3, template), template


def test_a_llama3_model_trains_and_evaluates_with_the_llama3_template(tiny_llama3, tmp_path):
    """A real ms-swift training: its args.json says llama3, and the evaluation's prompt is in Llama-3's format."""
    from persona.inference import Chat
    from persona.recipe import CPU_SMALL
    from persona.training import train_lora

    base = from_local_dir(str(tiny_llama3))
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": IDENTITY}]}
            for q in QUESTIONS[:8]]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = CPU_SMALL.with_overrides(num_train_epochs=1, system=SYSTEM)
    result = train_lora(base, data, recipe, tmp_path / "adapter", "cpu")

    assert trained_settings(result.adapter_dir) == {"model_type": "llama", "template": "llama3"}
    chat = Chat(base.path, result.adapter_dir, base.template, SYSTEM, "cpu")
    assert chat.prompt("Who are you?") == LLAMA3_PROMPT
    assert chat.tok(LLAMA3_PROMPT, add_special_tokens=False)["input_ids"] == swift_prompt_ids(tiny_llama3, "llama3")
    assert chat.tok.convert_tokens_to_ids("<|eot_id|>") in chat.stop_ids
    (answer,) = chat.answer([("Who are you?", ())], max_new_tokens=8)
    assert "<|" not in answer
