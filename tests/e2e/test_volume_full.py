"""The volume runs out of space mid-run: a clear error in status.json and the log, the pod stopped (not
restarted), and the newest complete checkpoint intact.

Simulated: the emulator's quota (emulator/pod_process.py) fails a checkpoint file write with ENOSPC once the
volume's directory holds more than the quota, which the test sets, after the first checkpoint, to what is on
the volume then. Small writes such as status.json are not checked.
"""

from __future__ import annotations

import os

import pytest
from safetensors.torch import load_file

from training import checkpoints


@pytest.fixture
def faults(faults):
    faults.volume_quotas = True
    return faults


def used_bytes(directory) -> int:
    return sum(os.path.getsize(os.path.join(folder, name)) for folder, _, names in os.walk(directory) for name in names)


def test_a_full_volume_fails_clearly_and_keeps_the_newest_checkpoint(emulated):
    driver = emulated.driver(train={"steps": 400, "checkpointEvery": 4, "keepCheckpoints": 1})
    outputs, _ = driver.up()
    pod_id, volume_id = outputs["podId"], outputs["volumeId"]
    paths = emulated.volume_paths(volume_id, outputs["runId"])
    emulated.wait_for_checkpoint(paths)
    volume = emulated.runtime.volume_dir(volume_id)
    emulated.runtime.set_volume_quota(volume_id, used_bytes(volume) + 1024)  # full from here on

    assert emulated.runtime.wait_until_stopped(pod_id, timeout=60)
    status = emulated.status(volume_id, outputs["runId"])
    newest = checkpoints.latest(paths)
    print(f"volume full: {status['message']}")
    assert status["state"] == "failed" and "volume is full" in status["message"]
    assert f"{newest.name}, is intact" in status["message"]
    assert load_file(newest / "lora.safetensors") and (newest / "optimizer.pt").is_file()
    assert any("volume is full" in line for line in emulated.logs(pod_id))
    assert len(emulated.runtime.bill(pod_id).containers) == 1
    driver.destroy()
