"""When a resumable training saves a checkpoint: by the clock, so that saving costs at most a set share of the time.

A fixed step interval cannot promise a cost: a checkpoint (adapter, optimizer, scheduler, RNG, trainer state) takes
about as long on a 0.5B CPU run as on a 7B GPU run, whose steps are 10-100x shorter. So the training child measures
each save and waits at least (1 / MAX_SHARE - 1) times that long, and at least MIN_SECONDS, before the next one:
saving then takes at most MAX_SHARE of the training time after the first checkpoint, and a killed run loses at most
max(MIN_SECONDS, 19 saves' time) of work.

This is an ms-swift trainer callback (swift.callbacks, registered by name in the child: persona.train_worker). With
several GPUs every rank would have to agree on the moment, so data-parallel runs save every tenth of their steps
instead (persona.training).
"""
from __future__ import annotations

import os
import time

MAX_SHARE = 0.05     # of the training time spent saving
MIN_SECONDS = 60.0   # between checkpoints, whatever the save costs
MIN_SECONDS_ENV = "PERSONA_CHECKPOINT_MIN_SECONDS"
CALLBACK = "persona_checkpoints"


def min_seconds() -> float:
    raw = os.environ.get(MIN_SECONDS_ENV, "").strip()
    return float(raw) if raw else MIN_SECONDS


class CheckpointClock:
    """The decision, apart from the trainer: `due(now)` after a step, `saved(now)` after the save it asked for."""

    def __init__(self, started: float, min_gap: float | None = None, max_share: float = MAX_SHARE):
        self.min_gap = min_seconds() if min_gap is None else min_gap
        self.factor = 1 / max_share - 1
        self.last = started          # the end of the last save (or the start of training)
        self.save_seconds = 0.0      # what the last save took
        self.asked: float | None = None
        self.saves: list[float] = []

    def gap(self) -> float:
        return max(self.min_gap, self.factor * self.save_seconds)

    def due(self, now: float) -> bool:
        if now - self.last >= self.gap():
            self.asked = now
            return True
        return False

    def saved(self, now: float) -> float | None:
        """Record a save that ended at `now`; what it took, if this clock asked for it."""
        took = None
        if self.asked is not None:
            took = self.save_seconds = now - self.asked
            self.saves.append(took)
        self.last, self.asked = now, None
        return took


def register() -> None:
    """Make the callback known to ms-swift by name (SftArguments(callbacks=[CALLBACK]))."""
    from swift.callbacks import TrainerCallback, callbacks_map

    class CheckpointCallback(TrainerCallback):
        def __init__(self, args, trainer):
            super().__init__(args, trainer)
            self.clock = CheckpointClock(time.monotonic())

        def on_train_begin(self, args, state, control, **kwargs):
            self.clock.last = time.monotonic()  # (after loading and, when resuming, restoring)

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step < state.max_steps and self.clock.due(time.monotonic()):
                control.should_save = True
            return control

        def on_save(self, args, state, control, **kwargs):
            took = self.clock.saved(time.monotonic())
            if took is not None and state.is_world_process_zero:
                print(f"[persona] checkpoint at step {state.global_step} ({took:.2f} s; the next one in "
                      f"{self.clock.gap():.0f} s or more)", flush=True)
            return control

    callbacks_map[CALLBACK] = CheckpointCallback
