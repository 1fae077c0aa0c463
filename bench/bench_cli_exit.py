"""A/B: a `persona` command ending at once (the console script, orchestration.cli.entry) against Python's normal exit.

Arms alternate, each a new process in a home that has a champion (PERSONA_HOME, e.g. a fresh clone after `make run`):

- quick_exit: the `persona` console script of this checkout's .venv;
- teardown: the same main() run by `python -c`, then the interpreter's normal exit (the code before).

    PERSONA_HOME=/tmp/fresh python bench/bench_cli_exit.py --rounds 3 -- ask 你是谁?

Prints, per run, the process's wall seconds and the seconds from its last output line to its exit.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEARDOWN = "import sys; from orchestration.cli import main; sys.exit(main())"


def one_run(arm: str, command: list[str]) -> dict:
    head = [str(Path(sys.executable).parent / "persona")] if arm == "quick_exit" else [sys.executable, "-c", TEARDOWN]
    started = time.time()
    proc = subprocess.Popen(head + command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    last = started
    for _ in proc.stdout:
        last = time.time()
    code = proc.wait()
    ended = time.time()
    return {"arm": arm, "code": code, "wall_s": round(ended - started, 2), "after_last_line_s": round(ended - last, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("command", nargs="+", help="the persona command and its arguments, after --")
    args = ap.parse_args()
    rows = []
    for i in range(args.rounds):
        for arm in (("quick_exit", "teardown") if i % 2 == 0 else ("teardown", "quick_exit")):
            rows.append(one_run(arm, args.command))
            print(json.dumps(rows[-1]), flush=True)
    print(json.dumps({arm: {k: round(statistics.mean(r[k] for r in rows if r["arm"] == arm), 2)
                            for k in ("wall_s", "after_last_line_s")} for arm in ("quick_exit", "teardown")}))


if __name__ == "__main__":
    main()
