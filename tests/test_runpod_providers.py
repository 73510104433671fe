"""The RunPod dynamic providers against emulator/runpod.py over real HTTP on 127.0.0.1.

Each provider goes through what the Pulumi host does with it: pickled by Pulumi's own serializer, unpickled,
then `configure()`d with the stack config; the tests then drive check/create/read/diff/update/delete.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import pickle
import subprocess
import sys

import dill
import grpc
import pytest
from google.protobuf import struct_pb2
from pulumi.dynamic import Config, ConfigureRequest
from pulumi.dynamic.dynamic import serialize_provider
from pulumi.output import Unknown
from pulumi.runtime import rpc
from pulumi.runtime.proto import provider_pb2, provider_pb2_grpc

from cloudapi.runpod_rest import RunpodError
from emulator.runpod import RunpodApi
from emulator.server import Fault, serve
from infra.runpod_backend.pod import PodProvider
from infra.runpod_backend.provider import RunpodProvider
from infra.runpod_backend.volume import NetworkVolumeProvider

API_KEY = "rpa_test_key_0123456789abcdef"
GPU = "NVIDIA GeForce RTX 4090"


@pytest.fixture(scope="module")
def server():
    emulator = RunpodApi(api_key=API_KEY)
    with serve(emulator) as base_url:
        yield emulator, base_url


@pytest.fixture
def api(server, monkeypatch):
    emulator, base_url = server
    emulator.reset()
    monkeypatch.setenv("RUNPOD_API_BASE_URL", base_url)
    monkeypatch.delenv("RUNPOD_API_KEY", raising=False)
    return emulator


def hosted(provider: RunpodProvider, api_key: str | None = API_KEY) -> RunpodProvider:
    """The provider as the Pulumi host runs it: serialized as Pulumi does, unpickled, configured."""
    revived = dill.loads(base64.b64decode(serialize_provider(provider)))
    config = {"lorastack:runpodApiKey": api_key} if api_key else {}
    revived.configure(ConfigureRequest(Config(config, "lorastack")))
    return revived


def volume_provider(**options) -> NetworkVolumeProvider:
    return hosted(NetworkVolumeProvider(**{"backoff": 0.01, "timeout": 5.0, **options}))


def pod_provider(**options) -> PodProvider:
    return hosted(PodProvider(**{"backoff": 0.01, "timeout": 5.0, **options}))


def volume_props(**changes) -> dict:
    return {"name": "lorastack-test", "sizeGb": 20, "dataCenter": "EU-RO-1", "keepOnDestroy": True, **changes}


def pod_props(volume_id: str | None = None, **changes) -> dict:
    return {
        "name": "lorastack-test",
        "image": "ghcr.io/lorastack/trainer:0.1.0",
        "gpuTypeId": GPU,
        "gpuCount": 1,
        "cloud": "SECURE",
        "dataCenterIds": ["EU-RO-1"],
        "containerDiskGb": 20,
        "env": {"LORASTACK_MANAGED": "1", "LORASTACK_SPEC": '{"steps":10}', "HF_TOKEN": "hf_secret"},
        "networkVolumeId": volume_id,
        "volumeMountPath": "/workspace",
        **changes,
    }


def posts(api: RunpodApi, path: str) -> int:
    return sum(1 for method, seen in api.requests if method == "POST" and seen == path)


# --- NetworkVolume ---


def test_volume_create_read_update_and_keep_on_destroy(api):
    provider = volume_provider()
    assert provider.check({}, volume_props()).failures == []
    created = provider.create(volume_props())
    assert created.outs["volumeId"] == created.id and created.outs["size"] == 20
    assert api.volumes[created.id].data_center == "EU-RO-1"

    assert provider.read(created.id, created.outs).outs["size"] == 20

    bigger = volume_props(name="lorastack-renamed", sizeGb=50)
    diff = provider.diff(created.id, created.outs, bigger)
    assert diff.changes and diff.replaces == []
    updated = provider.update(created.id, created.outs, bigger)
    assert updated.outs["size"] == 50
    assert (api.volumes[created.id].name, api.volumes[created.id].size) == ("lorastack-renamed", 50)

    provider.delete(created.id, updated.outs)  # keepOnDestroy: true
    assert created.id in api.volumes


def test_volume_moved_to_another_data_center_is_replaced(api):
    provider = volume_provider()
    olds = provider.create(volume_props()).outs
    diff = provider.diff(olds["volumeId"], olds, volume_props(dataCenter="US-TX-3"))
    assert diff.changes and diff.replaces == ["dataCenter"]
    assert provider.diff(olds["volumeId"], olds, volume_props()).changes is False


def test_volume_shrink_is_refused_with_a_clear_message(api):
    failures = volume_provider().check(volume_props(sizeGb=100), volume_props(sizeGb=40)).failures
    assert [f.property for f in failures] == ["sizeGb"]
    assert "cannot shrink" in failures[0].reason and "100 GB -> 40 GB" in failures[0].reason


def test_volume_check_rejects_bad_inputs_and_skips_unknowns(api):
    provider = volume_provider()
    failures = provider.check({}, volume_props(sizeGb=5, dataCenter="MARS-1", name="")).failures
    assert sorted(f.property for f in failures) == ["dataCenter", "name", "sizeGb"]
    assert provider.check({}, volume_props(name=Unknown(), sizeGb=Unknown())).failures == []


def test_volume_deleted_when_not_kept_and_delete_is_idempotent(api):
    provider = volume_provider()
    created = provider.create(volume_props(keepOnDestroy=False))
    provider.delete(created.id, created.outs)
    assert created.id not in api.volumes
    provider.delete(created.id, created.outs)  # already gone: no error
    assert provider.read(created.id, created.outs).id == ""


def test_volume_delete_waits_for_a_terminated_pod_to_release_it(api):
    provider = volume_provider()
    created = provider.create(volume_props(keepOnDestroy=False))
    api.inject(Fault(409, count=2, method="DELETE", path_prefix="/v2/network-volumes"))  # still mounted, twice
    provider.delete(created.id, created.outs)
    assert created.id not in api.volumes


def test_volume_delete_gives_up_on_a_volume_a_live_pod_still_mounts(api):
    provider = volume_provider()
    volume = provider.create(volume_props(keepOnDestroy=False))
    pod_provider().create(pod_props(volume.id))
    provider.release_wait_s = 0.2
    with pytest.raises(RunpodError) as caught:
        provider.delete(volume.id, volume.outs)
    assert caught.value.status == 409 and volume.id in api.volumes


def test_volume_create_adopts_a_kept_volume_and_grows_it(api):
    provider = volume_provider()
    kept = provider.create(volume_props(sizeGb=10))
    again = provider.create(volume_props(sizeGb=30))
    assert again.id == kept.id and again.outs["size"] == 30
    assert len(api.volumes) == 1 and posts(api, "/v2/network-volumes") == 1


# --- Pod ---


def make_volume() -> str:
    return volume_provider().create(volume_props()).id


def test_pod_create_read_update_delete(api):
    volume_id = make_volume()
    provider = pod_provider()
    props = pod_props(volume_id)
    assert provider.check({}, props).failures == []
    created = provider.create(props)
    live = api.pods[created.id]
    assert live.status == "RUNNING" and live.data_center_id == "EU-RO-1" and live.network_volume_id == volume_id
    assert live.mounts == {"network": [{"volumeId": volume_id, "path": "/workspace"}]}
    assert live.env["LORASTACK_SPEC"] == '{"steps":10}'
    assert created.outs["podId"] == created.id and created.outs["costPerHour"] == pytest.approx(0.59)

    assert provider.read(created.id, created.outs).outs["image"] == props["image"]

    newer = pod_props(volume_id, image="ghcr.io/lorastack/trainer:0.2.0", env={**props["env"], "LORASTACK_SPEC": '{"steps":20}'})
    diff = provider.diff(created.id, created.outs, newer)
    assert diff.changes and diff.replaces == []
    updated = provider.update(created.id, created.outs, newer)
    live = api.pods[created.id]
    assert (live.image, live.env["LORASTACK_SPEC"]) == ("ghcr.io/lorastack/trainer:0.2.0", '{"steps":20}')
    assert updated.outs["status"] == "RUNNING"

    provider.delete(created.id, updated.outs)
    assert created.id not in api.pods
    provider.delete(created.id, updated.outs)  # already gone: no error
    assert provider.read(created.id, updated.outs).id == ""


@pytest.mark.parametrize("key, value", [
    ("gpuTypeId", "NVIDIA L40S"), ("gpuCount", 2), ("cloud", "COMMUNITY"), ("dataCenterIds", ["US-TX-3"]),
    ("networkVolumeId", "other"),
])
def test_pod_fixed_settings_replace(api, key, value):
    olds = pod_props("vol1")
    diff = pod_provider().diff("pod1", olds, {**olds, key: value})
    assert diff.changes and diff.replaces == [key]


def test_a_stopped_pod_with_a_new_spec_is_started_again(api):
    provider = pod_provider()
    created = provider.create(pod_props(make_volume()))
    api.pods[created.id].status = "EXITED"  # the trainer stopped its pod after the last run
    newer = {**created.outs, "env": {**created.outs["env"], "LORASTACK_SPEC": '{"steps":30}'}}
    assert provider.update(created.id, created.outs, newer).outs["status"] == "RUNNING"


def test_pod_check_names_each_bad_input(api):
    bad = pod_props("vol1", image="ghcr.io/lorastack/trainer:latest", gpuTypeId="NVIDIA GTX 9999", cloud="COMMUNITY",
                    env={"LORASTACK_SPEC": "{}"}, dataCenterIds=["MARS-1"])
    failures = {f.property: f.reason for f in pod_provider().check({}, bad).failures}
    assert set(failures) == {"image", "gpuTypeId", "cloud", "env", "dataCenterIds"}
    assert "SECURE" in failures["cloud"] and "LORASTACK_MANAGED=1" in failures["env"]
    assert pod_provider().check({}, pod_props(Unknown(), image=Unknown(), env=Unknown())).failures == []


def test_api_rule_violations_surface_as_clear_errors(api):
    volume_id = make_volume()  # in EU-RO-1
    with pytest.raises(RunpodError) as caught:
        pod_provider().create(pod_props(volume_id, dataCenterIds=["US-TX-3"]))
    assert caught.value.status == 400 and "EU-RO-1" in str(caught.value) and "dataCenterIds" in str(caught.value)
    with pytest.raises(RunpodError, match="unknown GPU type"):
        pod_provider().create(pod_props(volume_id, gpuTypeId="NVIDIA GTX 9999"))
    assert posts(api, "/v2/pods") == 2 and api.pods == {}  # a 4xx is not retried


@pytest.mark.parametrize("status", [429, 503])
def test_create_retries_bursts_without_duplicates(api, status):
    api.inject(Fault(status, count=3, method="POST", path_prefix="/v2/pods"))
    api.inject(Fault(status, count=2, method="GET", path_prefix="/v2/pods"))
    created = pod_provider().create(pod_props())
    assert list(api.pods) == [created.id]
    assert posts(api, "/v2/pods") == 4  # three refused, one created


def test_create_after_a_timeout_adopts_the_pod_instead_of_making_a_second(api):
    # the POST outlives the client's timeout but still creates the pod on the server
    api.inject(Fault(0, method="POST", path_prefix="/v2/pods", delay=0.5))
    created = pod_provider(timeout=0.2, backoff=0.8).create(pod_props())
    assert list(api.pods) == [created.id]
    assert posts(api, "/v2/pods") == 1


def test_a_create_that_lands_well_after_the_timeout_is_still_adopted(api):
    # the server answers after the client gave up, and later than the next retry's backoff
    api.inject(Fault(0, method="POST", path_prefix="/v2/pods", delay=0.5))
    created = pod_provider(timeout=0.3, backoff=0.01).create(pod_props())
    assert list(api.pods) == [created.id]
    assert posts(api, "/v2/pods") == 1


@pytest.mark.parametrize("status, failing_looks", [(0, 4), (502, 2)], ids=["reset", "502"])
def test_a_lost_create_answer_and_a_failing_look_up_still_give_one_pod(api, monkeypatch, status, failing_looks):
    # the server creates the pod, then the answer is lost; the API then fails the look-ups that follow (after a
    # reset, more 500s in a row than one call's retries absorb: the create keeps watching for its pod)
    api.inject(Fault(status, method="POST", path_prefix="/v2/pods", after_work=True))
    dispatch = api.dispatch

    def struggling_after_the_create(request):
        response = dispatch(request)
        if (request.method, request.path) == ("POST", "/v2/pods"):
            api.inject(Fault(500, count=failing_looks, method="GET", path_prefix="/v2/pods"))
        return response

    monkeypatch.setattr(api, "dispatch", struggling_after_the_create)
    created = pod_provider(retries=2, timeout=0.3).create(pod_props())
    assert list(api.pods) == [created.id]
    assert posts(api, "/v2/pods") == 1


def test_volume_create_after_a_timeout_makes_no_duplicate(api):
    api.inject(Fault(0, method="POST", path_prefix="/v2/network-volumes", delay=0.5))
    created = volume_provider(timeout=0.2, backoff=0.8).create(volume_props())
    assert list(api.volumes) == [created.id]


def test_the_api_key_stays_out_of_pickles_and_outputs(api):
    provider = pod_provider()  # configured with the key, as in the Pulumi host
    created = provider.create(pod_props())
    assert API_KEY.encode() not in dill.dumps(provider, recurse=True)
    assert API_KEY.encode() not in pickle.dumps(provider)
    assert API_KEY.encode() not in base64.b64decode(serialize_provider(provider))
    assert API_KEY not in json.dumps(created.outs)
    assert API_KEY not in repr(provider.client())


def test_the_key_comes_from_the_environment_when_config_has_none(api, monkeypatch):
    monkeypatch.setenv("RUNPOD_API_KEY", API_KEY)
    assert hosted(NetworkVolumeProvider(backoff=0.01), api_key=None).create(volume_props()).id in api.volumes


def test_without_a_key_the_error_says_how_to_set_one(api):
    with pytest.raises(ValueError, match="config set --secret runpodApiKey"):
        hosted(NetworkVolumeProvider(), api_key=None).create(volume_props())


def test_a_wrong_key_is_refused(api):
    with pytest.raises(RunpodError) as caught:
        hosted(NetworkVolumeProvider(backoff=0.01), api_key="wrong").create(volume_props())
    assert caught.value.status == 401


# --- through the real provider host, as the Pulumi engine drives it ---


@pytest.fixture
def provider_host(api):
    """`python -m pulumi.dynamic`, the process the engine starts for dynamic resources, spoken to over gRPC."""
    environment = {key: value for key, value in os.environ.items() if key != "RUNPOD_API_KEY"}
    process = subprocess.Popen([sys.executable, "-m", "pulumi.dynamic"], stdout=subprocess.PIPE, text=True, env=environment)
    try:
        port = int(process.stdout.readline())
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield provider_pb2_grpc.ResourceProviderStub(channel)
    finally:
        process.terminate()
        process.wait(timeout=10)


def struct(properties: dict) -> struct_pb2.Struct:
    loop = asyncio.new_event_loop()  # not asyncio.run: that unsets the current loop Pulumi's mocks use later
    try:
        return loop.run_until_complete(rpc.serialize_properties(properties, {}))
    finally:
        loop.close()


def test_through_the_pulumi_provider_host(api, provider_host):
    provider_host.Configure(provider_pb2.ConfigureRequest(args=struct({"lorastack:runpodApiKey": API_KEY})))
    volume_inputs = {"__provider": serialize_provider(NetworkVolumeProvider(backoff=0.01)), **volume_props()}
    checked = provider_host.Check(provider_pb2.CheckRequest(urn="urn:volume", olds=struct({}), news=struct(volume_inputs)))
    assert list(checked.failures) == []  # sizeGb arrives as 20.0: numbers cross the wire as doubles
    volume = provider_host.Create(provider_pb2.CreateRequest(urn="urn:volume", properties=checked.inputs))
    assert api.volumes[volume.id].size == 20

    pod_inputs = {"__provider": serialize_provider(PodProvider(backoff=0.01)), **pod_props(volume.id)}
    checked = provider_host.Check(provider_pb2.CheckRequest(urn="urn:pod", olds=struct({}), news=struct(pod_inputs)))
    pod = provider_host.Create(provider_pb2.CreateRequest(urn="urn:pod", properties=checked.inputs))
    assert api.pods[pod.id].gpu_count == 1 and api.pods[pod.id].disk == 20
    assert API_KEY not in str(rpc.deserialize_properties(pod.properties))

    moved = struct({**pod_inputs, "gpuTypeId": "NVIDIA L40S"})
    diff = provider_host.Diff(provider_pb2.DiffRequest(id=pod.id, urn="urn:pod", olds=pod.properties, news=moved))
    assert list(diff.replaces) == ["gpuTypeId"]
    provider_host.Delete(provider_pb2.DeleteRequest(id=pod.id, urn="urn:pod", properties=pod.properties))
    assert api.pods == {}
