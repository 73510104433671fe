"""The trainer stopping its own pod (cloudapi.hosts.RunpodHost) against emulator/runpod.py over HTTP.

A 409 to the stop is read through the pod's status: "already stopped" only when it no longer runs. A locked
pod (RunPod answers 409 and the container would restart and bill on) is asked again until it stops or the
patience runs out, and then the trainer says so and reports failure (the reaper's turn).
"""

from __future__ import annotations

import threading

import pytest

from cloudapi.hosts import RunpodHost
from cloudapi.runpod_rest import RunpodClient
from emulator.runpod import RunpodApi
from emulator.server import serve

API_KEY = "rpa_host_test_key_0123456789"


@pytest.fixture
def pod():
    api = RunpodApi(api_key=API_KEY)
    with serve(api) as base_url:
        client = RunpodClient(API_KEY, base_url=base_url, backoff=0.01)
        created = client.create_pod({"name": "lorastack-host", "image": "ghcr.io/lorastack/trainer:0.1.0",
                                     "gpu": {"id": "NVIDIA GeForce RTX 4090", "count": 1}, "cloud": "SECURE",
                                     "env": {"LORASTACK_MANAGED": "1"}})
        said: list[str] = []
        host = RunpodHost({"RUNPOD_POD_ID": created["id"], "RUNPOD_API_KEY": API_KEY, "RUNPOD_API_BASE_URL": base_url},
                          said.append)
        yield api, client, created["id"], host, said


def test_a_locked_pod_is_asked_again_until_it_stops(pod):
    api, client, pod_id, host, said = pod
    client.update_pod(pod_id, {"locked": True})
    unlock = threading.Timer(0.5, lambda: client.update_pod(pod_id, {"locked": False}))
    unlock.start()
    assert host.stop(retries=0, backoff_s=0.05, keep_trying_s=30)
    assert client.get_pod(pod_id)["status"] == "EXITED"
    assert any("refused to stop while RUNNING" in line for line in said)
    assert "stop requested" in said[-1]


def test_a_pod_that_stays_locked_is_reported_not_taken_for_stopped(pod):
    api, client, pod_id, host, said = pod
    client.update_pod(pod_id, {"locked": True})
    assert not host.stop(retries=0, backoff_s=0.05, keep_trying_s=0.3)
    assert client.get_pod(pod_id)["status"] == "RUNNING"
    assert "refuses to stop" in said[-1] and "reaper" in said[-1]


def test_a_409_for_a_pod_already_stopped_is_a_stop(pod):
    api, client, pod_id, host, said = pod
    client.pod_action(pod_id, "stop")
    assert host.stop(retries=0, backoff_s=0.05, keep_trying_s=30)
    assert said == [f"pod {pod_id} is already stopped (EXITED)"]
