"""The pod is lost mid-run (preemption, host failure): a new pod on the same volume resumes from the newest
checkpoint, and the steps lost are at most the checkpoint interval."""

from __future__ import annotations

import pytest

from .conftest import probe_steps

CHECKPOINT_EVERY = 4
STEPS = 16


@pytest.fixture
def faults(faults):
    faults.probe_steps = True  # `emulator-probe: step N` after each step: exactly how far the lost trainer got
    return faults


def test_a_new_pod_resumes_from_the_last_checkpoint(emulated):
    driver = emulated.driver(train={"steps": STEPS, "checkpointEvery": CHECKPOINT_EVERY, "keepCheckpoints": 2})
    outputs, _ = driver.up()
    lost_pod = outputs["podId"]
    emulated.wait_for_log(lost_pod, r"emulator-probe: step ([6-9]|1\d)$", timeout=90)
    log_when_lost = emulated.runtime.lose_host(lost_pod)
    reached = max(probe_steps(log_when_lost))

    assert driver.refresh().counts == {"gone": 1}  # `pulumi up --refresh`: the lost pod leaves the state
    resumed_driver = emulated.driver(wait=True, train={"steps": STEPS, "checkpointEvery": CHECKPOINT_EVERY,
                                                       "keepCheckpoints": 2})
    outputs, operations = resumed_driver.up()
    assert operations.counts == {"same": 1, "create": 1}  # the volume is kept, a new pod made
    new_pod = outputs["podId"]
    assert new_pod != lost_pod and outputs["run"]["state"] == "succeeded" and outputs["run"]["step"] == STEPS
    resumed_from = min(probe_steps(emulated.logs(new_pod))) - 1
    lost = reached - resumed_from
    print(f"preemption: the lost trainer reached step {reached}, the new pod resumed from {resumed_from}: "
          f"{lost} steps lost (checkpointEvery {CHECKPOINT_EVERY})")
    assert resumed_from > 0 and 0 <= lost <= CHECKPOINT_EVERY
    resumed_driver.destroy()
