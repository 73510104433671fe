"""A trainer that hangs (no step for stallMinutes, the process alive, the GPU idle): the watchdog stops the pod.

The hang is the emulator's fault (emulator/pod_process.py): after step 2 the training step blocks forever.
"""

from __future__ import annotations

import time

import pytest

STALL_MINUTES = 0.1  # 6 s


@pytest.fixture
def faults(faults):
    faults.hang_after_step = 2
    return faults


def test_the_watchdog_stops_a_hung_trainers_pod(emulated):
    driver = emulated.driver(train={"steps": 20}, limits={"stallMinutes": STALL_MINUTES})
    outputs, _ = driver.up()
    pod_id = outputs["podId"]
    emulated.wait_for_log(pod_id, r"emulator fault: hanging after step 2", timeout=60)
    hung_at = time.monotonic()
    billed_at_hang = emulated.runtime.billed_seconds(pod_id)
    assert emulated.runtime.wait_until_stopped(pod_id, timeout=STALL_MINUTES * 60 + 30)
    stopped_after = time.monotonic() - hung_at
    billed_after_hang = emulated.runtime.bill(pod_id).closed_seconds - billed_at_hang
    print(f"hang: pod stopped {stopped_after:.1f} s after the hang (stall limit {STALL_MINUTES * 60:.0f} s), "
          f"{billed_after_hang} s billed after it")
    assert stopped_after < STALL_MINUTES * 60 + 10
    assert billed_after_hang <= STALL_MINUTES * 60 + 10
    status = emulated.status(outputs["volumeId"], outputs["runId"])
    assert status["state"] == "stalled" and "after step 2" in status["message"]
    assert len(emulated.runtime.bill(pod_id).containers) == 1  # stopped, not restarted into the same hang
    driver.destroy()
