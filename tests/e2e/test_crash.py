"""A trainer that crashes, or a spec refused at start: the pod is stopped within seconds, never restarted,
and the error is in the pod's log and in status.json."""

from __future__ import annotations

import json
import time

from contract.naming import run_id
from infra.runpod_backend.component import pod_env
from infra.stack_files import load_stack

STOPPED_WITHIN_S = 30  # from create to stopped, on two shared cores (the trainer's imports take most of it)


def test_an_invalid_spec_stops_the_pod_without_restarts(emulated):
    """A pod whose spec the trainer refuses (an image older than the stack's schema, a hand-edited env)."""
    client = emulated.client
    volume = client.create_volume({"name": "lorastack-demo", "size": 10, "dataCenter": "US-TX-3"})
    config = load_stack("demo")
    env = pod_env("demo", config, {})
    spec = json.loads(env["LORASTACK_SPEC"])
    env["LORASTACK_SPEC"] = json.dumps({**spec, "steps": 0, "learningRate": 5})
    began = time.monotonic()
    pod = client.create_pod({
        "name": "lorastack-demo", "image": config.image.ref, "gpu": {"id": config.runpod.gpu_type, "count": 1},
        "cloud": "SECURE", "dataCenterIds": ["US-TX-3"], "env": env,
        "mounts": {"network": [{"volumeId": volume["id"], "path": "/workspace"}]},
    })
    assert emulated.runtime.wait_until_stopped(pod["id"], timeout=STOPPED_WITHIN_S)
    stopped_after = time.monotonic() - began
    bill = emulated.runtime.bill(pod["id"])
    print(f"invalid spec: pod stopped {stopped_after:.1f} s after create, billed {bill.closed_seconds} s")
    assert client.get_pod(pod["id"])["status"] == "EXITED"
    assert len(bill.containers) == 1 and bill.containers[0].exit_code == 2  # started once, never again
    assert any("steps = 0" in line for line in emulated.logs(pod["id"]))
    status = emulated.status(volume["id"], run_id("demo", config.train))
    assert status["state"] == "failed" and "steps = 0" in status["message"] and "learningRate = 5" in status["message"]


def test_a_trainer_that_crashes_stops_its_pod_without_restarts(emulated):
    driver = emulated.driver(train={"baseModel": "/workspace/models/not-there"})
    began = time.monotonic()
    outputs, _ = driver.up()
    pod_id = outputs["podId"]
    assert emulated.runtime.wait_until_stopped(pod_id, timeout=STOPPED_WITHIN_S)
    stopped_after = time.monotonic() - began
    bill = emulated.runtime.bill(pod_id)
    print(f"crash: pod stopped {stopped_after:.1f} s after up, billed {bill.closed_seconds} s")
    assert emulated.api.pods[pod_id].status == "EXITED" and len(bill.containers) == 1
    assert bill.containers[0].exit_code != 0
    status = emulated.status(outputs["volumeId"], outputs["runId"])
    assert status["state"] == "failed" and "not-there" in status["message"]
    assert any("not-there" in line for line in emulated.logs(pod_id))
    driver.destroy()
