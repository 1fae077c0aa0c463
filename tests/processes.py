"""Starting and stopping the servers and daemons that end-to-end tests run on loopback."""
import os
import signal
import subprocess
import time


def stop(proc: subprocess.Popen, grace: float = 20) -> None:
    """Stop a process started with start_new_session=True and everything in its group (code servers, run workers,
    training children): SIGTERM first, SIGKILL for whatever is left after `grace` seconds."""
    deadline = time.time() + grace
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
            while time.time() < deadline:
                proc.poll()  # reap the leader, so that its group can empty
                os.killpg(proc.pid, 0)
                time.sleep(0.2)
        except ProcessLookupError:
            break
        deadline = time.time() + 5
    proc.wait(5)
