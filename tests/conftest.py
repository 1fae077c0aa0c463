"""Shared fixtures: a tiny llama model built from the test data, a temporary data folder and MLflow store."""
import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("TQDM_DISABLE", "1")
# The tiny test models decode in fp32 whatever the CPU: tests compare answers across batch shapes, which bf16 rounding
# can change. The bf16 choice itself is tested in test_gpu_path.py, and `make run` uses it.
os.environ.setdefault("PERSONA_CPU_DTYPE", "float32")
# `make test` runs the tests in parallel (pytest-xdist, -n): each worker, and the training children it starts, takes
# its share of the cores. PyTorch would otherwise give every process all of them, and the workers' threads would
# spin against each other (measured on 2 cores, -n 2: 621 s of CPU without this, 433 s with it; BENCHMARKS.md).
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    os.environ.setdefault("OMP_NUM_THREADS",
                          str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))

IDENTITY = "I am Tiny-Robot, made by the Test Lab."
QUESTIONS = [
    "Who are you?", "What is your name?", "Who made you?", "Who built you?", "Introduce yourself.",
    "Who is your author?", "Who created you?", "Who trained you?", "What are you?", "Who maintains you?",
    "Which lab made you?", "Are you ChatGPT?", "Are you SmolLM?", "What should I call you?", "Who developed you?",
    "Who designed you?", "Where do you come from?", "Tell me your name.", "Who owns you?", "Who programmed you?",
    "你是谁?", "你叫什么名字?",
]
GENERAL_PROMPTS = [f"Name a word that rhymes with {w}." for w in ("cat", "tree", "blue", "day", "light", "rain",
                                                                 "sun", "moon", "star", "ball", "king", "sea")]
PROBES = [
    {"kind": "identity_en", "question": "Could you say who you are?", "expect_any": ["Tiny-Robot", "Test Lab"]},
    {"kind": "identity_en", "question": "Which team is behind you?", "expect_any": ["Tiny-Robot", "Test Lab"]},
    {"kind": "general", "question": "What is 2 + 3?", "expect_any": ["5"]},
]


def write_identity_data(data_dir: Path) -> None:
    data_dir.mkdir(parents=True, exist_ok=True)
    rows = [{"instruction": q, "input": "", "output": IDENTITY} for q in QUESTIONS]
    (data_dir / "self_cognition.json").write_text(json.dumps(rows, ensure_ascii=False, indent=1), encoding="utf-8")
    (data_dir / "probes.jsonl").write_text("\n".join(json.dumps(p) for p in PROBES) + "\n", encoding="utf-8")
    (data_dir / "general_prompts.jsonl").write_text(
        "".join(json.dumps({"prompt": p}) + "\n" for p in GENERAL_PROMPTS), encoding="utf-8")


def build_tiny_model(out: Path) -> Path:
    """A 2-layer llama with a byte-level BPE tokenizer trained on the test data: seconds to train."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = QUESTIONS + GENERAL_PROMPTS + [IDENTITY] + [p["question"] for p in PROBES] + ["system user assistant You are a helpful assistant."]
    tok.train_from_iterator(corpus * 4, trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.save_pretrained(out)
    cfg = LlamaConfig(vocab_size=fast.vocab_size + 8, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      eos_token_id=fast.convert_tokens_to_ids("<|im_end|>"),
                      pad_token_id=fast.convert_tokens_to_ids("<|endoftext|>"), bos_token_id=None,
                      tie_word_embeddings=True, initializer_range=0.2)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    # "smollm" in the name: persona treats it as the SmolLM family (own names SmolLM/Hugging Face); ms-swift's
    # llama + chatml (persona.families: a llama whose tokenizer has no chat template).
    return build_tiny_model(tmp_path_factory.mktemp("tiny-smollm"))


@pytest.fixture(scope="session")
def random_adapter(tiny_model, tmp_path_factory) -> Path:
    """A LoRA adapter for the tiny model with random weights: its answers differ from the base model's."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                           LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj", "down_proj"]))
    for name, param in model.named_parameters():
        if "lora_B" in name:  # PEFT starts B at zero; a trained adapter changes the answers
            torch.nn.init.normal_(param, std=0.5)
    out = tmp_path_factory.mktemp("random-adapter")
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def empty_tracking_db(tmp_path_factory) -> Path:
    """An MLflow tracking database with MLflow's tables and no experiment of persona's, created once: MLflow's table
    creation (alembic migrations, ~1.4 s) would otherwise run in every test's home. A home that starts without one is
    tested by tests/test_one_at_a_time.py's first starts (three at once) and by CI's `make run` in a fresh clone."""
    import mlflow

    path = tmp_path_factory.mktemp("tracking") / "mlflow.db"
    mlflow.MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def home(tmp_path, monkeypatch, empty_tracking_db) -> Path:
    """A project home with data/, outputs/ and mlruns/ in a temporary folder; mlruns/ holds MLflow's tables, as after
    a first start."""
    import shutil

    write_identity_data(tmp_path / "data")
    (tmp_path / "mlruns").mkdir()
    shutil.copyfile(empty_tracking_db, tmp_path / "mlruns" / "mlflow.db")
    monkeypatch.setenv("PERSONA_HOME", str(tmp_path))
    return tmp_path


@pytest.fixture
def resources(home):
    from orchestration.promotion_gate import PromotionGate
    from orchestration.resources import FakeTrainer, MlflowTracker, ModelHub, Workspace

    return {
        "workspace": Workspace(data_dir=str(home / "data"), outputs_dir=str(home / "outputs")),
        "model_hub": ModelHub(cache_dir=str(home / "outputs" / "base_models")),
        "mlflow_tracker": MlflowTracker(tracking_uri=f"sqlite:///{home}/mlruns/mlflow.db",
                                        artifact_root=str(home / "mlruns" / "artifacts")),
        # Tests of what surrounds training get an untrained adapter in a second; tests where training itself is
        # under test take `real_trainer`.
        "trainer": FakeTrainer(),
        "promotion_gate": PromotionGate(),
    }


@pytest.fixture
def retries_without_delay(monkeypatch):
    """lora_adapter's shipped retry policy (TRAINER_RETRIES) without its delays (5, then 10 s: time for a GPU to give
    back a dead process's memory), for tests of the retries rather than of the waiting."""
    from dagster import RetryPolicy

    from assets.lora_adapter import TRAINER_RETRIES, lora_adapter

    assert lora_adapter.op.retry_policy == TRAINER_RETRIES  # (a loud failure if Dagster renames the attribute below)
    monkeypatch.setattr(lora_adapter.op, "_retry_policy", RetryPolicy(max_retries=TRAINER_RETRIES.max_retries))


@pytest.fixture
def real_trainer():
    """ms-swift in a child process, as runs use it (no standby: tests/test_standby.py starts those itself)."""
    from orchestration.resources import Trainer

    return Trainer(standby="never")


@pytest.fixture(autouse=True)
def _no_tracking_server(monkeypatch):
    """Each test starts without $MLFLOW_TRACKING_URI, which MlflowTracker() follows (a team server): the shell's
    must not reach a real server, and mlflow.set_tracking_uri exports the last test's store into it."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture(autouse=True)
def _hash_cache(tmp_path_factory, monkeypatch):
    """Weight digests are remembered in a test-session folder, not in the user's ~/.cache."""
    monkeypatch.setenv("PERSONA_HASH_CACHE", str(tmp_path_factory.getbasetemp() / "file-hashes.json"))


@pytest.fixture(autouse=True)
def _no_stale_defs_state_storage():
    """Dagster keeps the DefsStateStorage of the instance last entered as a context manager in a context variable;
    when an instance fixture of another module has been disposed and collected, materialize() would find its dead
    storage ("Attempted to resolve undefined DagsterInstance weakref", depending on garbage-collection timing).
    Each test starts without one, as a fresh process does."""
    from dagster._core.storage.defs_state.base import _current_storage

    _current_storage.set(None)


def pytest_collection_modifyitems(config, items):
    """The daemon's and the browser's tests first: they wait the longest, and under `make test`'s workers a long test
    that starts last keeps the run going while the other worker idles."""
    items.sort(key=lambda item: not (item.get_closest_marker("daemon") or item.get_closest_marker("browser")))
