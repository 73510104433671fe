"""emulator/runpod.py through raw HTTP: the shapes of the reference spec and the rules RunPod enforces."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

from emulator.runpod import PodRuntime, RunpodApi
from emulator.server import serve
from infra.runpod_backend import catalog

KEY = "rpa_emulator_test_key"
AUTH = {"Authorization": f"Bearer {KEY}"}
GPU = "NVIDIA GeForce RTX 4090"
# The required properties of the reference spec's schemas (shared/reference/runpod-rest-v2-openapi.json).
REQUIRED = {
    "Pod": {"actions", "args", "cloud", "cost", "createdAt", "cudaVersion", "dataCenterId", "disk", "env",
            "globalNetworking", "id", "image", "locked", "mounts", "name", "ports", "registry", "runtime", "ssh",
            "startedAt", "status", "template"},
    "NetworkVolume": {"dataCenter", "id", "name", "size", "type"},
    "GpuType": {"community", "id", "manufacturer", "maxCount", "memory", "name", "pool", "price", "secure"},
    "DataCenter": {"compliance", "globalNetwork", "id", "name", "networkVolumeTypes", "region"},
}


@pytest.fixture(scope="module")
def server():
    api = RunpodApi(api_key=KEY)
    with serve(api) as base_url:
        yield api, base_url


@pytest.fixture
def http(server):
    api, base_url = server
    api.reset()

    class Http:
        emulator = api

        def __getattr__(self, method):
            def call(path, body=None, headers=AUTH, **kwargs):
                return requests.request(method.upper(), base_url + path, json=body, headers=headers, timeout=10, **kwargs)
            return call

    return Http()


def make_volume(http, data_center="EU-RO-1", size=20) -> dict:
    response = http.post("/v2/network-volumes", {"name": "vol", "size": size, "dataCenter": data_center})
    assert response.status_code == 201, response.text
    return response.json()


def pod_body(**changes) -> dict:
    return {"name": "lorastack-t", "image": "ghcr.io/lorastack/trainer:0.1.0", "gpu": {"id": GPU, "count": 1}, **changes}


def mounted(volume_id: str) -> dict:
    return {"network": [{"volumeId": volume_id, "path": "/workspace"}]}


def make_pod(http, **changes) -> dict:
    response = http.post("/v2/pods", pod_body(**changes))
    assert response.status_code == 201, response.text
    return response.json()


def events(text: str) -> list[tuple[str, dict]]:
    parsed = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        parsed.append((lines["id"], json.loads(lines["data"])))
    return parsed


# --- auth ---


def test_bearer_auth_is_required(http):
    response = http.get("/v2/pods", headers={})
    assert response.status_code == 401
    assert response.json() == {"title": "Unauthorized", "status": 401, "detail": "missing bearer token"}
    assert response.headers["Content-Type"] == "application/problem+json"
    assert http.get("/v2/pods", headers={"Authorization": "Bearer nope"}).status_code == 401
    pod = make_pod(http)  # a pod's own RUNPOD_API_KEY works too (the trainer stops its pod with it)
    own = {"Authorization": f"Bearer {http.emulator.pod_api_key(pod['id'])}"}
    assert http.get(f"/v2/pods/{pod['id']}", headers=own).status_code == 200


# --- catalog ---


def test_gpu_catalog_has_the_spec_shape_and_the_price_table(http):
    gpus = {gpu["id"]: gpu for gpu in http.get("/v2/catalog/gpus").json()["gpus"]}
    assert set(gpus) == set(catalog.RUNPOD_GPUS)
    for gpu in gpus.values():
        assert REQUIRED["GpuType"] <= set(gpu)
    assert gpus[GPU]["price"] == {"secure": 0.59, "community": 0.34} and gpus[GPU]["memory"] == 24
    assert gpus["NVIDIA L4"]["community"] is False and gpus["NVIDIA L4"]["price"]["community"] is None
    assert http.get(f"/v2/catalog/gpus/{GPU}").json()["name"] == "RTX 4090"
    # what the RunPod catalog makes of the live prices
    assert catalog.runpod_usd_per_hour(GPU, 2, "SECURE", gpus) == (pytest.approx(1.18), "RunPod GPU catalog API (live)")


def test_data_centers_come_from_the_price_table(http):
    centers = http.get("/v2/catalog/datacenters").json()["dataCenters"]
    assert [dc["id"] for dc in centers] == list(catalog.RUNPOD_DATA_CENTERS)
    assert all(REQUIRED["DataCenter"] <= set(dc) for dc in centers)
    assert {dc["id"]: dc["region"] for dc in centers}["EU-RO-1"] == "EUROPE"


# --- pods ---


def test_pod_lifecycle_status_actions_and_cost(http):
    created = http.post("/v2/pods", pod_body(gpu={"id": GPU, "count": 2}, env={"A": "1"}))
    assert created.status_code == 201
    pod = created.json()
    assert REQUIRED["Pod"] <= set(pod)
    assert pod["status"] == "PROVISIONING" and pod["actions"] == ["stop", "terminate"] and pod["startedAt"] is None
    assert pod["cost"] == pytest.approx(2 * 0.59) and pod["cloud"] == "SECURE"

    running = http.get(f"/v2/pods/{pod['id']}").json()
    assert running["status"] == "RUNNING" and running["actions"] == ["stop", "restart", "terminate"]
    assert running["startedAt"] and running["runtime"]["uptime"] >= 0
    assert [p["id"] for p in http.get("/v2/pods").json()["pods"]] == [pod["id"]]

    stopped = http.post(f"/v2/pods/{pod['id']}/action", {"action": "stop"}).json()
    assert (stopped["status"], stopped["cost"], stopped["actions"], stopped["runtime"]) == (
        "EXITED", 0.0, ["start", "terminate"], None)
    refused = http.post(f"/v2/pods/{pod['id']}/action", {"action": "restart"})
    assert refused.status_code == 409 and "EXITED" in refused.json()["detail"]
    assert http.post(f"/v2/pods/{pod['id']}/action", {"action": "start"}).json()["status"] == "RUNNING"

    terminated = http.post(f"/v2/pods/{pod['id']}/action", {"action": "terminate"})
    assert terminated.status_code == 204 and terminated.content == b""
    assert http.get(f"/v2/pods/{pod['id']}").status_code == 404
    assert http.delete(f"/v2/pods/{pod['id']}").status_code == 404


def test_unknown_properties_are_refused_with_the_spec_errors(http):
    response = http.post("/v2/pods", pod_body(bogus=1, gpu={"id": GPU, "colour": "red"}))
    assert response.status_code == 400
    assert response.json()["errors"] == [
        "$: additional properties 'bogus' not allowed", "$.gpu: additional properties 'colour' not allowed",
    ]
    assert http.post("/v2/network-volumes", {"name": "v", "size": 10, "dataCenter": "EU-RO-1", "x": 1}).status_code == 400
    assert http.post("/v2/pods/none/action", {"action": "stop", "force": True}).status_code == 400


def test_contract_violations_are_422(http):
    missing = http.post("/v2/pods", {"image": "i:1", "gpu": {"id": GPU}})
    assert missing.status_code == 422 and "$: missing required property 'name'" in missing.json()["errors"]
    typed = http.post("/v2/pods", pod_body(env={"A": 1}, disk="big"))
    assert typed.status_code == 422
    assert set(typed.json()["errors"]) == {"$.env.A: expected a string", "$.disk: expected an integer"}
    assert http.post("/v2/pods", pod_body(image=None) | {"image": ""}).status_code == 422


def test_unknown_gpu_is_refused(http):
    response = http.post("/v2/pods", pod_body(gpu={"id": "NVIDIA GTX 9999"}))
    assert response.status_code == 400 and "unknown GPU type" in response.json()["detail"]
    assert http.post("/v2/pods", pod_body(gpu={"id": "NVIDIA L4"}, cloud="COMMUNITY")).status_code == 400


def test_a_pod_runs_in_its_volumes_data_center(http):
    volume = make_volume(http, "EU-RO-1")
    elsewhere = http.post("/v2/pods", pod_body(mounts=mounted(volume["id"]), dataCenterIds=["US-TX-3"]))
    assert elsewhere.status_code == 400 and "EU-RO-1" in elsewhere.json()["detail"]
    placed = make_pod(http, mounts=mounted(volume["id"]))
    assert placed["dataCenterId"] == "EU-RO-1"
    listed = make_pod(http, mounts=mounted(volume["id"]), dataCenterIds=["US-TX-3", "EU-RO-1"])
    assert listed["dataCenterId"] == "EU-RO-1"


def test_community_cloud_cannot_mount_a_network_volume(http):
    volume = make_volume(http)
    response = http.post("/v2/pods", pod_body(mounts=mounted(volume["id"]), cloud="COMMUNITY"))
    assert response.status_code == 400 and "SECURE" in response.json()["detail"]
    assert http.post("/v2/pods", pod_body(mounts=mounted("missing"))).status_code == 400


def test_patch_pod_rules(http):
    volume = make_volume(http)
    pod = make_pod(http, mounts=mounted(volume["id"]), env={"A": "1", "B": "2"})
    patched = http.patch(f"/v2/pods/{pod['id']}", {"image": "ghcr.io/lorastack/trainer:0.2.0", "env": {"C": "3"}}).json()
    assert patched["image"].endswith(":0.2.0") and patched["env"] == {"C": "3"} and patched["status"] == "RUNNING"
    other = make_volume(http)
    assert http.patch(f"/v2/pods/{pod['id']}", {"mounts": mounted(other["id"])}).status_code == 400
    assert http.patch(f"/v2/pods/{pod['id']}", {"mounts": {"network": []}}).status_code == 400
    moved = http.patch(f"/v2/pods/{pod['id']}", {"mounts": {"network": [{"volumeId": volume["id"], "path": "/data"}]}})
    assert moved.json()["mounts"]["network"][0]["path"] == "/data"
    assert http.patch(f"/v2/pods/{pod['id']}", {"gpu": {"id": GPU}}).status_code == 400  # not mutable
    assert http.patch("/v2/pods/missing", {"name": "x"}).status_code == 404


# --- network volumes ---


def test_volume_shape_and_size_rules(http):
    volume = make_volume(http, size=50)
    assert REQUIRED["NetworkVolume"] <= set(volume) and volume["type"] == "STANDARD"
    assert http.get(f"/v2/network-volumes/{volume['id']}").json() == volume
    shrink = http.patch(f"/v2/network-volumes/{volume['id']}", {"size": 40})
    assert shrink.status_code == 400 and "cannot be reduced" in shrink.json()["detail"]
    assert http.patch(f"/v2/network-volumes/{volume['id']}", {"size": 80, "name": "bigger"}).json()["size"] == 80
    assert http.patch(f"/v2/network-volumes/{volume['id']}", {}).status_code == 422
    for size in (9, 4097):
        assert http.post("/v2/network-volumes", {"name": "v", "size": size, "dataCenter": "EU-RO-1"}).status_code == 422
    assert http.post("/v2/network-volumes", {"name": "v", "size": 10, "dataCenter": "MARS-1"}).status_code == 400
    assert http.post("/v2/network-volumes", {"name": "v", "size": 10}).status_code == 422
    assert [v["id"] for v in http.get("/v2/network-volumes").json()["networkVolumes"]] == [volume["id"]]


def test_a_mounted_volume_cannot_be_deleted(http):
    volume = make_volume(http)
    pod = make_pod(http, mounts=mounted(volume["id"]))
    http.post(f"/v2/pods/{pod['id']}/action", {"action": "stop"})
    refused = http.delete(f"/v2/network-volumes/{volume['id']}")
    assert refused.status_code == 409 and pod["id"] in refused.json()["detail"]
    assert http.delete(f"/v2/pods/{pod['id']}").status_code == 204
    assert http.delete(f"/v2/network-volumes/{volume['id']}").status_code == 204
    assert http.get(f"/v2/network-volumes/{volume['id']}").status_code == 404


# --- logs ---


def test_logs_are_server_sent_events_with_tail_source_and_resume(http):
    pod = make_pod(http)
    for n in range(5):
        http.emulator.append_log(pod["id"], f"step {n}")
    http.post(f"/v2/pods/{pod['id']}/action", {"action": "stop"})  # a stopped pod's stream ends after the backfill

    response = http.get(f"/v2/pods/{pod['id']}/logs", params={"tail": 2, "source": "container"})
    assert response.headers["Content-Type"] == "text/event-stream"
    tail = events(response.text)
    assert [data["line"] for _, data in tail] == ["step 3", "step 4"]
    assert all(set(data) == {"ts", "source", "line"} and data["source"] == "container" for _, data in tail)
    assert tail[0][0].startswith(tail[0][1]["ts"])  # the event id is the ts (plus a sequence number)

    everything = events(http.get(f"/v2/pods/{pod['id']}/logs").text)
    assert {data["source"] for _, data in everything} == {"system", "container"}
    resumed = events(http.get(f"/v2/pods/{pod['id']}/logs", headers={**AUTH, "Last-Event-ID": tail[0][0]}).text)
    assert [data["line"] for _, data in resumed] == ["step 4", "stopping pod"]
    assert http.get(f"/v2/pods/{pod['id']}/logs", params={"tail": 5001}).status_code == 422


def test_a_live_log_stream_follows_until_the_pod_stops(http):
    pod = make_pod(http)
    received: list[str] = []
    connected = threading.Event()

    def follow() -> None:
        with http.get(f"/v2/pods/{pod['id']}/logs", params={"tail": 0, "source": "container"}, stream=True) as response:
            connected.set()  # headers are in: the backfill is decided, what follows is live
            for raw in response.iter_lines(decode_unicode=True):
                if raw.startswith("data:"):
                    received.append(json.loads(raw[5:])["line"])

    reader = threading.Thread(target=follow)
    reader.start()
    assert connected.wait(timeout=5)
    http.emulator.append_log(pod["id"], "live line")
    http.post(f"/v2/pods/{pod['id']}/action", {"action": "stop"})
    reader.join(timeout=5)
    assert not reader.is_alive() and received == ["live line"]


# --- the runtime hook ---


class RecordingRuntime(PodRuntime):
    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def on_start(self, pod: dict) -> None:
        self.calls.append(("start", pod["status"]))
        self.api.append_log(pod["id"], f"training {pod['env'].get('LORASTACK_RUN_ID')}")
        self.api.set_status(pod["id"], "RUNNING")

    def on_stop(self, pod: dict) -> None:
        self.calls.append(("stop", pod["status"]))

    def on_terminate(self, pod: dict) -> None:
        self.calls.append(("terminate", pod["status"]))


def test_a_runtime_sees_each_transition_and_drives_the_pod():
    runtime = RecordingRuntime()
    api = RunpodApi(api_key=KEY, runtime=runtime)
    with serve(api) as base_url:
        pod = requests.post(f"{base_url}/v2/pods", json=pod_body(env={"LORASTACK_RUN_ID": "r1"}), headers=AUTH, timeout=5).json()
        assert api.pods[pod["id"]].status == "RUNNING"
        assert [line.line for line in api.pods[pod["id"]].logs if line.source == "container"] == ["training r1"]
        requests.post(f"{base_url}/v2/pods/{pod['id']}/action", json={"action": "restart"}, headers=AUTH, timeout=5)
        api.set_status(pod["id"], "EXITED")  # the process exited
        assert requests.get(f"{base_url}/v2/pods/{pod['id']}", headers=AUTH, timeout=5).json()["cost"] == 0.0
        requests.delete(f"{base_url}/v2/pods/{pod['id']}", headers=AUTH, timeout=5)
    assert runtime.calls == [
        ("start", "PROVISIONING"), ("stop", "STARTING"), ("start", "STARTING"), ("terminate", "TERMINATED"),
    ]


def test_provisioning_takes_the_configured_time():
    api = RunpodApi(provisioning_seconds=1.0)
    with serve(api) as base_url:
        headers = {"Authorization": "Bearer any-key-works"}
        pod = requests.post(f"{base_url}/v2/pods", json=pod_body(), headers=headers, timeout=5).json()
        assert requests.get(f"{base_url}/v2/pods/{pod['id']}", headers=headers, timeout=5).json()["status"] == "PROVISIONING"
        deadline = time.monotonic() + 5
        while api.pods[pod["id"]].status != "RUNNING" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert requests.get(f"{base_url}/v2/pods/{pod['id']}", headers=headers, timeout=5).json()["status"] == "RUNNING"


def test_runs_standalone():
    process = subprocess.Popen(
        [sys.executable, "-m", "emulator.runpod", "--port", "0", "--api-key", KEY],
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1],
    )
    try:
        banner = process.stdout.readline()
        base_url = banner.split("export RUNPOD_API_BASE_URL=")[1].rstrip(")\n")
        assert requests.get(f"{base_url}/v2/catalog/gpus", headers=AUTH, timeout=5).status_code == 200
        assert requests.get(f"{base_url}/v2/pods", timeout=5).status_code == 401
    finally:
        process.terminate()
        process.wait(timeout=5)
