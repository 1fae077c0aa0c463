"""A/B of the embedded GGUF's conversion, alternating in one process, then a byte comparison of the folders:
- defaults: transformers' defaults (the tokenizer and the model each read the config again, and the provenance
  with gguf.GGUFReader);
- two_readers: persona.models.convert_gguf without one_gguf_reader (one config read, handed to the tokenizer and
  the model, but the weights' load builds its own gguf.GGUFReader);
- ours: persona.models.convert_gguf as it is.

    .venv/bin/python bench/bench_convert.py [--model embedded:smollm2-135m] [--rounds 2] [--arms two_readers ours]
"""
import argparse
import contextlib
import hashlib
import shutil
import tempfile
import time
from pathlib import Path

import persona.models
from persona.models import assemble_gguf, convert_gguf, embedded_model, gguf_provenance


def defaults(gguf: Path, out: Path) -> None:
    """The conversion as it was: GGUFReader for the provenance, AutoTokenizer and the model each on their own."""
    import torch
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.initialization import no_init_weights

    GGUFReader(str(gguf)).fields.get("general.name")
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
    cfg = loaded.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    cfg.dtype = torch.bfloat16
    with no_init_weights():
        clean = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    clean.load_state_dict(loaded.state_dict(), strict=True)
    clean.save_pretrained(out)
    tok.save_pretrained(out)


def ours(gguf: Path, out: Path) -> None:
    gguf_provenance(gguf)
    convert_gguf(gguf, out)


def two_readers(gguf: Path, out: Path) -> None:
    kept = persona.models.one_gguf_reader
    persona.models.one_gguf_reader = contextlib.nullcontext
    try:
        ours(gguf, out)
    finally:
        persona.models.one_gguf_reader = kept


ARMS = {"defaults": defaults, "two_readers": two_readers, "ours": ours}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(dir="/tmp"))
    gguf = work / "gguf" / "model.gguf"
    gguf.parent.mkdir()
    assemble_gguf(embedded_model(args.model), gguf)
    times = {name: [] for name in args.arms}
    for _ in range(args.rounds):
        for name, fn in ((name, ARMS[name]) for name in args.arms):
            shutil.rmtree(work / name, ignore_errors=True)
            started = time.perf_counter()
            fn(gguf, work / name)
            times[name].append(round(time.perf_counter() - started, 1))
            print(name, times[name][-1], "s", flush=True)
    digest = {name: {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted((work / name).iterdir())}
              for name in times}
    same = all(d == digest[args.arms[0]] for d in digest.values())
    print("seconds:", times, "| same files byte for byte:", same)
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
