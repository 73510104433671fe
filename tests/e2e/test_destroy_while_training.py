"""`pulumi destroy` while the pod trains: the pod is gone and bills nothing; the kept volume and its
checkpoints are intact (the trainer checkpoints on SIGTERM on its way out)."""

from __future__ import annotations

from safetensors.torch import load_file

from training import checkpoints


def test_destroy_while_training_keeps_the_volume_and_its_checkpoints(emulated):
    driver = emulated.driver(keep_volume=True, train={"steps": 2000, "checkpointEvery": 5})
    outputs, _ = driver.up()
    pod_id, volume_id = outputs["podId"], outputs["volumeId"]
    paths = emulated.volume_paths(volume_id, outputs["runId"])
    emulated.wait_for_checkpoint(paths)

    assert driver.destroy().counts == {"delete": 1, "retain": 1}
    assert emulated.api.pods == {} and emulated.runtime.billing_pods() == []
    assert emulated.runtime.wait_until_stopped(pod_id, timeout=15)  # the trainer process has ended too
    assert list(emulated.api.volumes) == [volume_id]

    status = emulated.status(volume_id, outputs["runId"])
    newest = checkpoints.latest(paths)
    print(f"destroy while training: trainer {status['state']} at step {status['step']}, newest checkpoint {newest.name}")
    assert status["state"] == "interrupted" and newest.name == f"step-{status['step']}"
    assert load_file(newest / "lora.safetensors")  # complete and readable
    assert all((entry / checkpoints.TRAINER_FILE).is_file() for entry in paths.checkpoints.glob("step-*"))
