"""The wall-clock time at the end of every optimizer step, so that throughput can be read over any slice of steps
(bench/bench_train.py times the seed recipe over a fixed slice after warm-up: its whole run exceeds a command).

An ms-swift trainer callback registered by name in the training child (persona.train_worker); the child writes the
times into its result file (TrainResult.step_ends: seconds since the Trainer's on_train_begin, one per step).

With $PERSONA_STOP_AFTER_STEPS=N the training ends after step N, on the learning-rate schedule of the whole run
(max_steps would shorten the schedule): a benchmark's slice of a run too long to finish, with the same losses as
the first N steps of the whole run.
"""
from __future__ import annotations

import os
import time

CALLBACK = "persona_step_clock"
STOP_ENV = "PERSONA_STOP_AFTER_STEPS"
STEP_ENDS: list[float] = []


def register() -> None:
    """Make the callback known to ms-swift by name (SftArguments(callbacks=[CALLBACK]))."""
    from swift.callbacks import TrainerCallback, callbacks_map

    class StepClock(TrainerCallback):
        def __init__(self, args, trainer):
            super().__init__(args, trainer)
            self.began = time.monotonic()

        def on_train_begin(self, args, state, control, **kwargs):
            self.began = time.monotonic()
            STEP_ENDS.clear()

        def on_step_end(self, args, state, control, **kwargs):
            STEP_ENDS.append(round(time.monotonic() - self.began, 4))
            stop = int(os.environ.get(STOP_ENV) or 0)
            if stop and state.global_step >= stop:
                control.should_training_stop = control.should_save = True  # (the adapter of the slice)
            return control

    callbacks_map[CALLBACK] = StepClock
