"""The volume runs out of space mid-run: a clear error in status.json and the log, the pod stopped (not
restarted), and the newest complete checkpoint intact. The advised fix works: grow `sizeGb`, `up`, and the
stopped pod starts again and the run resumes from that checkpoint to its end.

Simulated: the emulator's quota (emulator/pod_process.py) fails a checkpoint file write once the volume's
directory holds more than the quota, which the test sets, after the first checkpoint, to what is on the volume
then; growing the volume through the API adds its gigabytes to the quota. The failure comes in both forms a
full disk takes: Python's OSError(ENOSPC), and the RuntimeError torch.save's C++ writer raises instead
("PytorchStreamWriter failed writing file ...: file write failed"). Small writes such as status.json are not
checked.
"""

from __future__ import annotations

import os
import time

import pytest
from safetensors.torch import load_file

from training import checkpoints


@pytest.fixture(params=["ENOSPC", "torch RuntimeError"])
def faults(request, faults):
    faults.volume_quotas = True
    faults.full_volume_as_torch = request.param == "torch RuntimeError"
    return faults


def used_bytes(directory) -> int:
    return sum(os.path.getsize(os.path.join(folder, name)) for folder, _, names in os.walk(directory) for name in names)


def test_a_full_volume_fails_clearly_and_growing_it_resumes_the_run(emulated):
    train = {"steps": 40, "checkpointEvery": 4, "keepCheckpoints": 1}
    driver = emulated.driver(train=train)
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
    stopped_at = int(newest.name.split("-")[1])

    # the advice: grow the volume, `pulumi up`
    grown, operations = emulated.driver(train=train, volume_gb=20).up()
    assert grown["podId"] == pod_id and operations.counts == {"update": 2}  # the volume, then the pod
    deadline = time.monotonic() + 120
    while not paths.done.exists():
        assert time.monotonic() < deadline, f"the run did not resume to its end: {emulated.logs(pod_id)[-10:]}"
        time.sleep(0.2)
    assert emulated.runtime.wait_until_stopped(pod_id, timeout=60)
    status = emulated.status(volume_id, outputs["runId"])
    assert status["state"] == "succeeded" and status["step"] == 40
    assert len(emulated.runtime.bill(pod_id).containers) == 2
    assert any(f"step {stopped_at}" in line or f"step-{stopped_at}" in line for line in emulated.logs(pod_id)
               if "resum" in line.lower()), "the second container did not resume from the intact checkpoint"
    driver.destroy()
