"""persona's processes (the training child, the `persona` command) end at once when their work is done
(persona.quick_exit.exit_now), yet nothing Python does at exit for the program is lost: non-daemon threads finish,
atexit functions run, buffered output arrives."""
import subprocess
import sys
import textwrap

import pytest

PROGRAM = textwrap.dedent("""
    import atexit, sys, threading, time
    from persona.quick_exit import exit_now

    atexit.register(lambda: print("atexit ran"))
    threading.Thread(target=lambda: (time.sleep(0.3), print("thread finished"))).start()
    sys.stdout.write("buffered, no newline")
    exit_now(int(sys.argv[1]))
    print("never printed")
""")


@pytest.mark.parametrize("code", [0, 3])
def test_exit_now_keeps_threads_atexit_and_output_and_returns_the_code(code):
    done = subprocess.run([sys.executable, "-c", PROGRAM, str(code)], capture_output=True, text=True, timeout=60)
    assert done.returncode == code, done.stderr
    out = done.stdout
    assert "buffered, no newline" in out and "thread finished" in out and "atexit ran" in out
    assert out.index("thread finished") < out.index("atexit ran")  # threads first, as Python's own exit does
    assert "never printed" not in out
