"""The shipped Definitions with one resource changed, for the daemon test (tests/test_sensor_daemon_e2e.py): its
trainer is the FakeTrainer, held until the test releases it.

The daemon test is about the sensor, the run queue and the training pool under a real daemon, not about training
(tests/test_pipeline_e2e.py and the fault tests train for real). A held fake makes "a second edit queues while the
first run trains" certain, where a real training had to be long enough to see it (40 epochs, ~30 s of CPU).
"""
import os
import time
from pathlib import Path

from dagster import Definitions

import orchestration.definitions as shipped_module
from orchestration.resources import FakeTrainer

RELEASE = "release-training"  # in PERSONA_HOME: the held training goes on once this file exists


class HeldFakeTrainer(FakeTrainer):
    def train(self, *args, **kwargs):
        release, deadline = Path(os.environ["PERSONA_HOME"]) / RELEASE, time.time() + 300
        while not release.exists():
            if time.time() > deadline:
                raise TimeoutError(f"the test never wrote {release}")
            time.sleep(0.2)
        return super().train(*args, **kwargs)


def with_held_trainer(shipped: Definitions) -> Definitions:
    return Definitions(assets=shipped.assets, asset_checks=shipped.asset_checks, jobs=shipped.jobs,
                       sensors=shipped.sensors, schedules=shipped.schedules, executor=shipped.executor,
                       resources={**shipped.resources, "trainer": HeldFakeTrainer()})


defs = with_held_trainer(shipped_module.defs)  # one Definitions at module scope, as Dagster requires
